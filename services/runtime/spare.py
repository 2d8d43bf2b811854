"""A warm spare of a service process.

`python -m services.runtime.spare MODULE` imports what `python -m MODULE` needs (the
module's package: grpc, protobuf, numpy, tritonclient... seconds of CPU), then waits for
one line on stdin saying which replica it becomes::

    {"env": {"SWITCHBOARD_RAG_PORT": "7064", ...}, "log": "/run/logs/rag-1.log"}

and then runs MODULE as `python -m MODULE` would, with that environment and its output
appended to that log. The control plane keeps one spare per service kind, so that a
replica that dies is replaced by a process whose imports are done: recovery costs the
service's own start, not the interpreter's.

Stdin closed without a line (the control plane is gone) ends the spare. The code a
spare runs is the code on disk when it started: the control plane discards spares when
it rolls a service out."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import runpy
import sys
from collections.abc import Mapping, Sequence


def preload(module: str) -> None:
    """Imports `module`'s package (the module itself, when it is one): what running it
    needs, without running it (a plain module's body runs once, as `__main__`)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise SystemExit(f"no module named {module!r}")
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    importlib.import_module(package)


def become(env: Mapping[str, str], log: str) -> None:
    """Takes the replica's environment, and its log as stdout and stderr."""
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m services.runtime.spare MODULE", file=sys.stderr)
        return 2
    (module,) = args
    preload(module)
    line = sys.stdin.readline()
    if not line:
        return 0  # nobody will ever need it
    order = json.loads(line)
    become(order["env"], order["log"])
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
