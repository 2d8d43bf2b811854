"""Processes the launcher starts: spawn with a log file, record by PID, stop by PID."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

# Children started by this process, kept so they are reaped (not left as zombies) on stop.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessRecord:
    """One process the launcher started; `created` guards against PID reuse."""

    name: str
    pid: int
    created: float
    argv: tuple[str, ...]
    log: str

    def process(self) -> psutil.Process | None:
        """The live process, or None when it is gone (or the PID now belongs to another)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.created) > 0.5 or proc.status() == "zombie":
                return None
            return proc
        except psutil.Error:
            return None


class StateFile:
    """The run directory's record of what is running (`state.json`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"

    def load(self) -> list[ProcessRecord]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text())
            return [ProcessRecord(**{**r, "argv": tuple(r["argv"])}) for r in raw["processes"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s: %s", self.path, exc)
            return []

    def save(self, records: Sequence[ProcessRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": [asdict(r) for r in records]}, indent=2))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    as_user: Mapping[str, Any] | None = None,
) -> ProcessRecord:
    """Starts `argv` in its own session (so its children can be stopped with it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            **(as_user or {}),
        )
    _children[proc.pid] = proc
    created = psutil.Process(proc.pid).create_time()
    return ProcessRecord(name, proc.pid, created, tuple(argv), str(log))


def stop(record: ProcessRecord, *, timeout: float = 15.0) -> bool:
    """SIGTERM the process (and its session's group), SIGKILL after `timeout`.

    Returns True when the process had still been running.
    """
    proc = record.process()
    if proc is None:
        return False
    _signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.process() is None:
            break
        time.sleep(0.05)
    else:
        logger.warning("%s (pid %d) ignored SIGTERM; killing", record.name, record.pid)
        _signal_group(record.pid, signal.SIGKILL)
    # children left in the group (e.g. Triton's Python-backend stubs)
    _signal_group(record.pid, signal.SIGKILL)
    _wait_group_gone(record.pid, timeout=5.0)
    child = _children.pop(record.pid, None)
    try:
        if child is not None:
            child.wait(timeout=5)
        else:
            proc.wait(timeout=5)
    except (psutil.Error, subprocess.TimeoutExpired):
        pass
    return True


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """Waits until no live (non-zombie) process is left in the group; signals are
    delivered asynchronously, late on a loaded machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive = True
                    break
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive:
            return
        time.sleep(0.02)
    logger.warning("processes of group %d still alive after SIGKILL", pgid)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_owner(host: str, port: int) -> str | None:
    """A description of who listens on `host:port`, or None when it is free."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    try:
                        return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                    except psutil.Error:
                        return f"pid {conn.pid}"
    except psutil.Error:
        pass
    return "another process"


def _ephemeral_start() -> int:
    """Where the kernel starts picking ports for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port_base(*, host: str, span: int) -> int:
    """A random base port with `span` free ports above it, below the ephemeral range
    (an outgoing connection could otherwise take one of them before it is bound)."""
    import random

    top = min(45_000, _ephemeral_start()) - span
    for _ in range(200):
        base = random.randrange(10_000, top, 100)
        if all(port_owner(host, base + i) is None for i in range(span)):
            return base
    raise RuntimeError("no free port range found")


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
