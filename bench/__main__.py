"""`python -m bench` runs every benchmark; `python -m bench NAME...` runs the ones named."""

from __future__ import annotations

import importlib
import signal
import sys
import time
import traceback
from typing import NoReturn

from bench import BENCHMARKS
from bench._common import missed_targets, print_table


def _stop(signum: int, frame: object) -> NoReturn:
    # SIGTERM unwinds like Ctrl-C, so every benchmark stops what it started
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    names = [a.replace("_", "-") for a in argv] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _stop)
    failed, summary, missed = [], [], []
    started = time.monotonic()
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        began = time.monotonic()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run()
        except Exception:  # noqa: BLE001 - report it, run the others
            traceback.print_exc()
            failed.append(name)
            continue
        summary.append((name, f"{time.monotonic() - began:.0f}s"))
        missed += [f"{name}: {m}" for m in missed_targets(result)]
    print_table(f"done in {time.monotonic() - started:.0f}s", ("benchmark", "took"), summary)
    for line in missed:
        print(f"  target missed: {line}")
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
