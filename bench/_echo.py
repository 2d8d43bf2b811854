"""`python -m bench._echo`: a local HTTP echo for tool benchmarks; prints its port.

POST /echo answers the JSON body it was sent, and the Idempotency-Key it carried; GET
/timings says when each call arrived and when its reply left (`timings()`).
`started()` runs it for a benchmark; `tool_env()` registers it as the `echo` tool of the
execution processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from aiohttp import web

from bench._common import stop_process

TOOLS = Path(__file__).parents[1] / "services" / "execution" / "tools.yaml"


_TIMINGS: dict[str, tuple[int, int]] = {}
"""Idempotency key -> (request arrived, reply sent), this process's monotonic ns."""
_MOST_TIMINGS = 200_000


async def _echo(request: web.Request) -> web.Response:
    arrived = time.monotonic_ns()
    body = await request.json()
    key = request.headers.get("Idempotency-Key", "")
    response = web.json_response({"echo": body, "key": key})
    if len(_TIMINGS) >= _MOST_TIMINGS:
        _TIMINGS.clear()
    _TIMINGS[key] = (arrived, time.monotonic_ns())
    return response


async def _timings(request: web.Request) -> web.Response:
    return web.json_response(_TIMINGS)


def timings(port: int) -> dict[str, tuple[int, int]]:
    """When each call (by idempotency key) arrived at the echo and when its reply left,
    in the echo's monotonic nanoseconds (the last call per key)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/timings", timeout=30) as reply:
        return {key: (t[0], t[1]) for key, t in json.load(reply).items()}


async def _main() -> None:
    app = web.Application()
    app.router.add_post("/echo", _echo)
    app.router.add_get("/timings", _timings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


@contextmanager
def started() -> Iterator[int]:
    """The echo in its own process; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench._echo"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        stop_process(process)


def tool_env(port: int, run_dir: Path, *, steps_per_worker: int) -> dict[str, str]:
    """The environment for the execution processes: the default tool registry plus the
    echo as the `echo` HTTP tool, `steps_per_worker` steps at once per worker, no warm
    sandboxes (tool steps need none)."""
    config = yaml.safe_load(TOOLS.read_text())
    config["allowed_hosts"] = [f"127.0.0.1:{port}"]
    config["tools"]["echo"] = {
        "kind": "http",
        "url": f"http://127.0.0.1:{port}/echo",
        "timeout": "5s",
    }
    tools = run_dir / "tools.yaml"
    tools.write_text(yaml.safe_dump(config))
    return {
        "SWITCHBOARD_EXECUTION_TOOLS": str(tools),
        "SWITCHBOARD_EXECUTION_WORKERS": str(steps_per_worker),
        "SWITCHBOARD_EXECUTION_SANDBOX_POOL": "0",
    }


if __name__ == "__main__":
    asyncio.run(_main())
