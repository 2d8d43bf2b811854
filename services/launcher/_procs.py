"""Processes the launcher starts: spawn with a log file, record by PID, stop by PID."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

logger = logging.getLogger(__name__)

# Children started by this process, kept so they are reaped (not left as zombies) on stop.
_children: dict[int, subprocess.Popen[bytes]] = {}
# pidfds of recorded processes, by (pid, created): readable once the process has exited
_exit_fds: dict[tuple[int, float], int] = {}
_exit_fds_lock = threading.Lock()


@dataclass(frozen=True)
class ProcessRecord:
    """One process the launcher started; `created` guards against PID reuse."""

    name: str
    pid: int
    created: float
    """When the process started, in seconds since the machine booted: unlike a wall-clock
    time, it never moves when the system clock is set (psutil's wall-clock create time
    does, and a step of the clock made every running process look like another's). A
    value over 1e8 is a wall-clock time (records written before) and is compared as one."""
    argv: tuple[str, ...]
    log: str

    def process(self) -> psutil.Process | None:
        """The live process, or None when it is gone (or the PID now belongs to another)."""
        try:
            proc = psutil.Process(self.pid)
            if not self._started_with(proc) or proc.status() == "zombie":
                return None
            return proc
        except psutil.Error:
            return None

    def pid_reused(self) -> bool:
        """Whether the PID now names another process than the recorded one (not when
        nothing has it, nor when it is the recorded process's zombie)."""
        try:
            return not self._started_with(psutil.Process(self.pid))
        except psutil.Error:
            return False

    def _started_with(self, proc: psutil.Process) -> bool:
        wall = self.created > _WALL_CLOCK
        started = proc.create_time() if wall else started_since_boot(self.pid)
        return abs(started - self.created) <= 0.5

    def started_at(self) -> float:
        """When the process started, as a wall-clock time (for uptimes)."""
        if self.created > _WALL_CLOCK:
            return self.created
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - self.created)


_WALL_CLOCK = 1e8
"""A `created` above this is a wall-clock time, not seconds since boot (3 years)."""
_TICKS = os.sysconf("SC_CLK_TCK")


def started_since_boot(pid: int) -> float:
    """When process `pid` started, in seconds since boot (/proc/PID/stat's starttime:
    unaffected by the system clock). Raises psutil.NoSuchProcess if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    # the name (field 2) may hold spaces and parentheses: count from its last ")"
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19]) / _TICKS


def record_json(record: ProcessRecord) -> dict[str, Any]:
    return {**asdict(record), "argv": list(record.argv)}


def record_from_json(raw: Mapping[str, Any]) -> ProcessRecord:
    return ProcessRecord(**{**raw, "argv": tuple(raw["argv"])})


def recorded_replicas(path: Path) -> list[ProcessRecord]:
    """The processes the control plane's `replicas.json` records (`down` stops them by
    PID, whether or not the control plane is still there)."""
    try:
        raw = json.loads(path.read_text())
        return [record_from_json(r["record"]) for r in raw["replicas"] if r.get("record")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


class StateFile:
    """The run directory's record of what is running (`state.json`).

    The launcher and the control plane (which restarts the mesh's own NATS server) both
    change it: every change is a read-modify-write under an exclusive lock on
    `state.json.lock` (`update`).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"

    def load(self) -> list[ProcessRecord]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text())
            return [record_from_json(r) for r in raw["processes"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s: %s", self.path, exc)
            return []

    def save(self, records: Sequence[ProcessRecord]) -> None:
        with self._locked():
            self._write(records)

    def update(
        self, change: Callable[[list[ProcessRecord]], Sequence[ProcessRecord]]
    ) -> list[ProcessRecord]:
        """Replaces the records with `change(records)`, atomically with respect to every
        other `update` and `save`; returns the new records."""
        with self._locked():
            records = list(change(self.load()))
            self._write(records)
            return records

    def clear(self) -> None:
        with self._locked():
            self.path.unlink(missing_ok=True)

    def _write(self, records: Sequence[ProcessRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": [asdict(r) for r in records]}, indent=2))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    as_user: Mapping[str, Any] | None = None,
    stdin_pipe: bool = False,
) -> ProcessRecord:
    """Starts `argv` in its own session (so its children can be stopped with it); with
    `stdin_pipe`, its stdin is a pipe that `send` writes to (else /dev/null)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            **(as_user or {}),
        )
    _children[proc.pid] = proc
    created = started_since_boot(proc.pid)
    return ProcessRecord(name, proc.pid, created, tuple(argv), str(log))


def exited(record: ProcessRecord) -> bool:
    """Whether the recorded process has exited (or its PID names another process): what
    `record.process() is None` says, for a loop that asks often. After the first look it
    polls a pidfd (one system call) instead of reading /proc; where the system has no
    pidfds, it reads /proc each time."""
    key = (record.pid, record.created)
    with _exit_fds_lock:
        fd = _exit_fds.get(key)
        if fd is None:
            fd = _pidfd(record)
            if fd is None:
                return record.process() is None
            _exit_fds[key] = fd
        ready = select.poll()
        ready.register(fd, select.POLLIN)
        if not ready.poll(0):
            return False
        del _exit_fds[key]
        os.close(fd)
        return True


def _pidfd(record: ProcessRecord) -> int | None:
    """A pidfd for the recorded process, or None when it is gone, its PID is another
    process's, or the system has no pidfds."""
    try:
        fd = os.pidfd_open(record.pid)
    except (OSError, AttributeError):
        return None
    if record.process() is None:  # opened on a PID reused, or on a zombie: no use
        os.close(fd)
        return None
    return fd


def _forget(record: ProcessRecord) -> None:
    """Closes the record's pidfd (its process stopped, its record dropped)."""
    with _exit_fds_lock:
        fd = _exit_fds.pop((record.pid, record.created), None)
        if fd is not None:
            os.close(fd)


def send(record: ProcessRecord, data: bytes) -> bool:
    """Writes `data` to the stdin pipe of a process this one spawned with `stdin_pipe`,
    then closes it; False when the process is gone (or has no such pipe)."""
    child = _children.get(record.pid)
    if child is None or child.stdin is None or record.process() is None:
        return False
    try:
        child.stdin.write(data)
        child.stdin.close()
    except (BrokenPipeError, ValueError):
        return False
    return True


def stop(
    record: ProcessRecord, *, timeout: float = 15.0, sig: signal.Signals = signal.SIGTERM
) -> bool:
    """`sig` (SIGTERM) to the process (and its session's group), SIGKILL after `timeout`.
    A process already gone (killed, or crashed, before anyone noticed) still has what it
    started in its group (Triton's Python-backend stubs): that is killed.

    Returns True when the process had still been running.
    """
    proc = record.process()
    if proc is None:
        kill_group(record)
        return False
    _forget(record)
    _signal_group(record.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.process() is None:
            break
        time.sleep(0.05)
    else:
        logger.warning("%s (pid %d) ignored %s; killing", record.name, record.pid, sig.name)
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
    _close_stdin(child)
    return True


def kill_group(record: ProcessRecord) -> None:
    """SIGKILLs what is left of an exited process's group (its own session: children it
    started, such as Triton's Python-backend stubs, which outlive a killed server).

    Not when its PID now names another process: the kernel gives a PID out again only
    once no process is left in the group of that number, so that group is someone
    else's."""
    _forget(record)
    if record.pid_reused():
        return
    _signal_group(record.pid, signal.SIGKILL)
    child = _children.pop(record.pid, None)
    if child is not None:
        child.poll()  # reaped: no zombie left
        _close_stdin(child)


def _close_stdin(child: subprocess.Popen[bytes] | None) -> None:
    if child is not None and child.stdin is not None and not child.stdin.closed:
        try:
            child.stdin.close()
        except BrokenPipeError:
            pass


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


class Connection(Protocol):
    """What `describe_port_holder` reads of a `psutil.net_connections()` record."""

    laddr: Any
    raddr: Any
    status: str
    pid: int | None


# States of a connection on its way out: its process may have closed it already.
_CLOSING = frozenset({"TIME_WAIT", "FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def port_free(host: str, port: int) -> bool:
    """Whether a server may listen on `host:port` now: nothing listens there (a
    connection of an earlier listener in TIME_WAIT does not count)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def port_owner(host: str, port: int) -> str | None:
    """Who holds `host:port` (see `describe_port_holder`), or None when it is free."""
    if port_free(host, port):
        return None
    try:
        connections: Iterable[Connection] = psutil.net_connections(kind="tcp")
    except psutil.Error:
        connections = ()
    return describe_port_holder(host, port, connections)


def describe_port_holder(
    host: str,
    port: int,
    connections: Iterable[Connection],
    *,
    name_of: Callable[[int], str | None] | None = None,
) -> str:
    """What holds `host:port`, whose bind failed, from psutil-like connection records.

    A listener is named by its PID; a connection that is not a listener (an outgoing
    one, or one closing in TIME_WAIT that no process owns any more) is described as
    such. A PID is given only where a record carries one.
    """
    name_of = name_of or _process_name
    held = [
        c for c in connections if c.laddr and c.laddr.port == port and _may_clash(c.laddr.ip, host)
    ]
    if not held:
        return "something this user cannot see (no listener or connection on it is visible)"
    conn = min(held, key=_importance)
    more = f" (and {len(held) - 1} more socket(s) on this port)" if len(held) > 1 else ""
    peer = f" to {conn.raddr.ip}:{conn.raddr.port}" if conn.raddr else ""
    if conn.pid:
        name = name_of(conn.pid)
        who = f"pid {conn.pid} ({name})" if name else f"pid {conn.pid}"
        if conn.status == psutil.CONN_LISTEN:
            return f"{who}, listening on it{more}"
        return f"a connection (not a listener) of {who}{peer}, state {conn.status}{more}"
    if conn.status == psutil.CONN_LISTEN:
        return (
            "a listener whose process this user cannot see"
            f" (`sudo ss -ltnp 'sport = :{port}'` names it){more}"
        )
    if conn.status == psutil.CONN_TIME_WAIT:
        return (
            f"a connection{peer} in state TIME_WAIT (no process owns it;"
            f" the kernel frees it within 60 s){more}"
        )
    if conn.status in _CLOSING:
        return (
            f"a closing connection{peer} in state {conn.status} (no process this user can"
            f" see owns it; the kernel frees it once the close completes){more}"
        )
    return f"a connection{peer}, state {conn.status}, of a process this user cannot see{more}"


def _importance(conn: Connection) -> int:
    """Listeners first, then connections with a known process, then orphans."""
    if conn.status == psutil.CONN_LISTEN:
        return 0 if conn.pid else 1
    if conn.pid:
        return 2
    return 3 if conn.status in _CLOSING else 4


def _may_clash(ip: str, host: str) -> bool:
    """Whether a socket bound to `ip` can keep a bind to `host` (same port) from working."""
    ip, host = ip.removeprefix("::ffff:"), host.removeprefix("::ffff:")
    if ip in _WILDCARDS or host in _WILDCARDS:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: it may resolve to any address
    return ip == host


def _process_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


def ephemeral_port_range() -> tuple[int, int] | None:
    """The ports the kernel picks from for the local end of outgoing connections
    (`net.ipv4.ip_local_port_range`), or None where it cannot be read."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def reserved_ports() -> frozenset[int]:
    """Ports the kernel never picks for outgoing connections
    (`net.ipv4.ip_local_reserved_ports`), even inside the ephemeral range."""
    try:
        return parse_port_list(Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        return frozenset()


def parse_port_list(text: str) -> frozenset[int]:
    """`8080,50000-50010` as the set of ports it names."""
    ports: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return frozenset(ports)


def free_port_base(*, host: str, span: int) -> int:
    """A random base port with `span` free ports above it, below the ephemeral range
    (an outgoing connection could otherwise take one of them before it is bound)."""
    import random

    ephemeral_start = (ephemeral_port_range() or (32_768, 60_999))[0]
    top = min(45_000, ephemeral_start) - span
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
