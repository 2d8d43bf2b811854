"""Starting sandboxes and running code in them: one at a time, or from a warm pool."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from services.execution.sandbox import _launcher, _seccomp
from services.execution.sandbox._types import (
    KiB,
    ResourceUsage,
    RunRequest,
    RunResult,
    SandboxError,
    SandboxLimits,
    Termination,
)
from services.runtime import FieldViolation, invalid, stop_task

logger = logging.getLogger(__name__)

_LAUNCHER = Path(_launcher.__file__)
_RUNNER = Path(__file__).with_name("_runner.py")
# How long past the run's timeout the launcher has to kill, collect and report.
_REPORT_GRACE = timedelta(seconds=10)
# How long the launcher has to end its sandbox when told to, before it is killed.
_STOP_GRACE = timedelta(seconds=5)
_READ_SIZE = 64 * KiB

RUNS = Counter(
    "switchboard_sandbox_runs",
    "Runs that returned a result, by how the code ended (exited, timeout, cpu_limit, ...).",
    ["termination"],
)
FAILURES = Counter(
    "switchboard_sandbox_failures",
    "Sandboxes that failed themselves (SandboxError), by stage: `start` (a pool's warm"
    " sandbox), `run` (a run got no result).",
    ["stage"],
)


async def _counted(result: Awaitable[RunResult]) -> RunResult:
    """`result`, counted in RUNS, or its SandboxError in FAILURES."""
    try:
        done = await result
    except SandboxError:
        FAILURES.labels("run").inc()
        raise
    RUNS.labels(done.termination.name.lower()).inc()
    return done


async def run(request: RunRequest, limits: SandboxLimits | None = None) -> RunResult:
    """Runs `request` in a sandbox started for it alone, destroyed afterwards.

    What the code does (exceptions, crashes, limits) is reported in the result. Cancelling
    the call kills the sandbox at once.

    Raises:
        InvalidArgument: the request is malformed (a file path, the files' size, the timeout).
        SandboxError: the sandbox could not start or did not report.
    """
    limits = limits or SandboxLimits()
    timeout = _checked_timeout(request, limits)
    return await _counted(_start_and_execute(request, limits, timeout))


async def _start_and_execute(
    request: RunRequest, limits: SandboxLimits, timeout: float
) -> RunResult:
    sandbox = await _Sandbox.start(limits)
    return await sandbox.execute(request, timeout)


class SandboxPool:
    """Sandboxes started ahead of time, to take their start-up off each run's latency.

    Each sandbox serves exactly one run and is then destroyed: nothing (process, files,
    namespaces) carries from one run to the next. A run takes a started sandbox, or starts
    one itself if none is ready, and a replacement starts in the background. The pool does
    not bound how many runs go at once; its caller does.

    Use `async with SandboxPool(...) as pool:` or call `start()` and `close()`.
    """

    def __init__(self, *, limits: SandboxLimits | None = None, size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.limits = limits or SandboxLimits()
        self._size = size
        self._ready: list[_Sandbox] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __aenter__(self) -> SandboxPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts the pool's sandboxes and waits until they are ready.

        Raises:
            SandboxError: a sandbox could not start (none is left running then).
        """
        started = await asyncio.gather(
            *(_Sandbox.start(self.limits) for _ in range(self._size)), return_exceptions=True
        )
        sandboxes = [s for s in started if isinstance(s, _Sandbox)]
        if len(sandboxes) < len(started):
            for sandbox in sandboxes:
                await sandbox.destroy()
            raise next(s for s in started if not isinstance(s, _Sandbox))
        self._ready.extend(sandboxes)

    async def run(self, request: RunRequest) -> RunResult:
        """Runs `request` in one of the pool's sandboxes; as the module's `run()` does."""
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        timeout = _checked_timeout(request, self.limits)
        return await _counted(self._take_and_execute(request, timeout))

    async def _take_and_execute(self, request: RunRequest, timeout: float) -> RunResult:
        sandbox = await self._take()
        self._replenish()
        return await sandbox.execute(request, timeout, destroy=self._destroy_later)

    async def close(self) -> None:
        """Destroys the sandboxes that wait for a run; runs in progress finish. Idempotent."""
        self._closed = True
        for task in list(self._starting):
            await stop_task(task)
        ready, self._ready = self._ready, []
        for sandbox in ready:
            await sandbox.destroy()
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

    def _destroy_later(self, sandbox: _Sandbox) -> None:
        """Destroys a sandbox whose run has reported, off the run's latency; `close()`
        waits for it."""
        task = asyncio.create_task(sandbox.destroy())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _take(self) -> _Sandbox:
        while self._ready:
            sandbox = self._ready.pop()
            if sandbox.alive:
                return sandbox
            await sandbox.destroy()
        return await _Sandbox.start(self.limits)

    def _replenish(self) -> None:
        while not self._closed and len(self._ready) + len(self._starting) < self._size:
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        try:
            sandbox = await _Sandbox.start(self.limits)
        except SandboxError:
            FAILURES.labels("start").inc()
            logger.exception("a sandbox for the pool did not start")
            return
        self._ready.append(sandbox)


class _Process:
    """The sandbox's launcher process, its pipes as asyncio streams.

    Started by `subprocess.Popen`, which spawns with vfork (no fork handlers run in the
    child), not by the event loop: uvloop's spawn forks, and a fork runs gRPC's
    handlers in the child of a process serving gRPC, which can abort it before exec.
    Its exit is watched through a pidfd, so no child watcher is involved either.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        pidfd: int,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
    ) -> None:
        self._popen = popen
        self._pidfd = pidfd
        self._exit: asyncio.Future[int] | None = None
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    @classmethod
    async def start(cls, args: list[str], *, pass_fd: int) -> _Process:
        # a vfork and exec, as quick as asyncio's own spawn (which calls Popen in the loop too)
        popen = subprocess.Popen(  # noqa: S603, ASYNC220 - our own launcher, by absolute path
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(pass_fd,),
            env={},
            cwd="/",
            start_new_session=True,
            bufsize=0,
        )
        pidfd = os.pidfd_open(popen.pid)
        loop = asyncio.get_running_loop()
        try:
            readers = []
            for pipe in (popen.stdout, popen.stderr):
                reader = asyncio.StreamReader(limit=_READ_SIZE)
                await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), pipe)
                readers.append(reader)
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, popen.stdin
            )
        except BaseException:
            popen.kill()
            popen.wait()
            os.close(pidfd)
            raise
        stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        return cls(popen, pidfd, stdin, *readers)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        """The exit status, once the launcher has exited; any number may wait at once."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._reap())
        # shielded: a waiter that gives up (a timeout) leaves the reaping to the others
        return await asyncio.shield(self._exit)

    async def _reap(self) -> int:
        try:
            await _readable(self._pidfd)
        finally:
            os.close(self._pidfd)
        return self._popen.wait()


class _Sandbox:
    """One started launcher: namespaces and root built, the runner waiting for code."""

    def __init__(
        self,
        process: _Process,
        control: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        limits: SandboxLimits,
    ) -> None:
        self._process = process
        self._reader, self._writer = control
        self._limits = limits
        self._kill_requested = False
        self._init: int | None = None  # a pidfd of the sandbox's init, once it runs

    @classmethod
    async def start(cls, limits: SandboxLimits) -> _Sandbox:
        ours, theirs = socket.socketpair()
        try:
            process = await _Process.start(
                [sys.executable, "-I", "-S", "-B", str(_LAUNCHER), str(theirs.fileno())],
                pass_fd=theirs.fileno(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        sandbox = cls(process, await asyncio.open_unix_connection(sock=ours), limits)
        try:
            sandbox._writer.write(_setup_message(limits))
            async with asyncio.timeout(limits.start_timeout.total_seconds()):
                message = await _read_message(sandbox._reader)
            if message is None or "ready" not in message:
                await sandbox._end()
                assert process.stderr is not None
                printed = await process.stderr.read(4 * KiB)
                raise SandboxError(f"the sandbox did not start: {_failure(message, printed)}")
            sandbox._init = os.pidfd_open(message["init_pid"])
        except TimeoutError:
            await sandbox.destroy()
            raise SandboxError(f"the sandbox did not start within {limits.start_timeout}") from None
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    @property
    def alive(self) -> bool:
        return self._process.returncode is None

    async def execute(
        self,
        request: RunRequest,
        timeout: float,
        *,
        destroy: Callable[[_Sandbox], None] | None = None,
    ) -> RunResult:
        """Runs the request (already checked) and destroys the sandbox: before returning,
        or, given `destroy`, by handing it over once the run has reported (a run that
        fails or is cancelled is still destroyed before this returns)."""
        self._writer.write(
            _launcher.encode_message(
                {
                    "code": request.code,
                    "files": {
                        path: base64.b64encode(content).decode()
                        for path, content in request.files.items()
                    },
                    "timeout": timeout,
                }
            )
        )
        feeding = asyncio.create_task(self._feed_stdin(request.stdin.encode()))
        stdout = asyncio.create_task(self._capture(self._process.stdout))
        stderr = asyncio.create_task(self._capture(self._process.stderr))
        try:
            try:
                async with asyncio.timeout(timeout + _REPORT_GRACE.total_seconds()):
                    report = await _read_message(self._reader)
                async with asyncio.timeout(_REPORT_GRACE.total_seconds()):
                    (out, out_cut), (err, err_cut) = await asyncio.gather(stdout, stderr)
            except TimeoutError:
                raise SandboxError("the sandbox did not report in time") from None
            if report is None or "error" in report:
                raise SandboxError(f"the sandbox failed: {_failure(report, err)}")
        except BaseException:
            for task in (feeding, stdout, stderr):
                await stop_task(task)
            await self.destroy()
            raise
        for task in (feeding, stdout, stderr):
            await stop_task(task)
        if destroy is None:
            await self.destroy()
        else:
            destroy(self)
        return _result(report, self._limits, (out, out_cut), (err, err_cut))

    async def destroy(self) -> None:
        """Ends the sandbox, whatever it is doing, and returns once all of it is gone.

        Idempotent.
        """
        await self._end()
        if self._init is not None:
            # Gone already, unless the launcher had to be killed: init then dies of its
            # parent's death, and the whole PID namespace with it.
            await _readable(self._init)
            os.close(self._init)
            self._init = None
        # The pipes must reach their end for asyncio to release the process's transport.
        if self._process.stdin is not None:
            self._process.stdin.close()
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None:
                while await stream.read(_READ_SIZE):
                    pass
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _feed_stdin(self, data: bytes) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                stdin.write(data)
                await stdin.drain()
            stdin.close()

    async def _capture(self, stream: asyncio.StreamReader | None) -> tuple[bytes, bool]:
        """Reads a stream to its end, keeping `max_output_bytes`; past that, asks for a kill."""
        assert stream is not None
        cap = self._limits.max_output_bytes
        kept = bytearray()
        truncated = False
        while chunk := await stream.read(_READ_SIZE):
            if truncated:
                continue
            room = cap - len(kept)
            kept += chunk[:room]
            if len(chunk) > room:
                truncated = True
                self._request_kill()
        return bytes(kept), truncated

    def _request_kill(self) -> None:
        if not self._kill_requested:
            self._kill_requested = True
            self._writer.write(_launcher.encode_message({"kill": "output limit"}))

    async def _end(self) -> None:
        """Has the launcher kill and reap init, and exit; kills it if it does not do so soon."""
        self._writer.close()  # the end of the control stream is the launcher's cue
        try:
            async with asyncio.timeout(_STOP_GRACE.total_seconds()):
                await self._process.wait()
        except TimeoutError:
            logger.warning("sandbox launcher %d did not stop; killing it", self._process.pid)
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _failure(message: dict[str, Any] | None, printed: bytes) -> str:
    """Why the launcher failed: its error (or that it sent none), and what the sandbox printed."""
    error = str(message["error"]) if message and "error" in message else "no report"
    if printed:
        error += f"\nstandard error: {printed[-4 * KiB :].decode(errors='replace')}"
    return error


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        header = await reader.readexactly(4)
        return json.loads(await reader.readexactly(struct.unpack(">I", header)[0]))
    except asyncio.IncompleteReadError:
        return None


@functools.cache
def _setup_message(limits: SandboxLimits) -> bytes:
    """What the launcher needs to build a sandbox: the same for every sandbox of `limits`."""
    prefix = os.path.realpath(sys.base_prefix)
    interpreter = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    if not os.access(interpreter, os.X_OK):
        raise SandboxError(f"no interpreter at {interpreter}")
    if (prefix + "/").startswith(_launcher.ROOT + "/"):
        raise SandboxError(f"the interpreter may not live under {_launcher.ROOT}: {prefix}")
    return _launcher.encode_message(
        {
            "interpreter": interpreter,
            "binds": [prefix],
            "runner": _RUNNER.read_text(),
            "seccomp": base64.b64encode(_seccomp.build_filter()).decode(),
            "limits": {
                "cpu_seconds": math.ceil(limits.cpu_time.total_seconds()),
                "memory_bytes": limits.memory_bytes,
                "max_processes": limits.max_processes,
                "max_open_files": limits.max_open_files,
                "max_file_bytes": limits.max_file_bytes,
                "tmp_bytes": limits.tmp_bytes,
                "tmp_inodes": limits.tmp_inodes,
                "max_result_chars": limits.max_result_chars,
                # Two JSON strings of that many characters, each one escaped to 12 bytes.
                "max_result_bytes": 24 * limits.max_result_chars + KiB,
                "max_files": limits.max_files,
                "max_files_bytes": limits.max_files_bytes,
            },
        }
    )


def _checked_timeout(request: RunRequest, limits: SandboxLimits) -> float:
    """The run's wall-clock limit in seconds, once the request is known to be well-formed.

    Raises:
        InvalidArgument: listing every problem with the request.
    """
    violations = []
    timeout = limits.timeout if request.timeout is None else request.timeout
    if timeout <= timedelta(0):
        violations.append(FieldViolation("timeout", "must be positive"))
    directories = {
        path.rsplit("/", depth)[0]
        for path in request.files
        for depth in range(1, path.count("/") + 1)
    }
    for path in request.files:
        parts = path.split("/")
        if any(part in ("", ".", "..") or "\0" in part for part in parts) or len(path) > 1024:
            violations.append(
                FieldViolation("files", f"{path!r} is not a relative path without '.' or '..'")
            )
        elif path in directories:
            violations.append(FieldViolation("files", f"{path!r} is also a directory"))
    total = sum(len(content) for content in request.files.values())
    if total > limits.tmp_bytes or len(request.files) >= limits.tmp_inodes:
        violations.append(
            FieldViolation(
                "files",
                f"{len(request.files)} files of {total} bytes do not fit the sandbox's "
                f"{limits.tmp_bytes} bytes",
            )
        )
    if violations:
        raise invalid(violations, what="run request")
    return min(timeout, limits.max_timeout).total_seconds()


def _result(
    report: dict[str, Any],
    limits: SandboxLimits,
    stdout: tuple[bytes, bool],
    stderr: tuple[bytes, bool],
) -> RunResult:
    """The result from the launcher's report and the captured output."""
    value, exception = _outcome(report["result"], limits.max_result_chars)
    usage = ResourceUsage(
        wall_time=timedelta(seconds=report["wall_seconds"]),
        user_cpu_time=timedelta(seconds=report["user_seconds"]),
        system_cpu_time=timedelta(seconds=report["system_seconds"]),
        max_memory_bytes=report["max_rss_bytes"],
    )
    exit_code = 0
    signal_number = 0
    status = report["status"]
    if report["killed"] == "timeout":
        termination, signal_number = Termination.TIMEOUT, signal.SIGKILL
    elif report["killed"] == "requested":  # the service asks for a kill at the output cap only
        termination, signal_number = Termination.OUTPUT_LIMIT, signal.SIGKILL
    elif status is None:
        # Init died without reporting: killed from outside the sandbox (by the OOM killer).
        if not os.WIFSIGNALED(report["init_status"]):
            raise SandboxError("the sandbox's init ended without the runner's status")
        termination, signal_number = Termination.SIGNALED, os.WTERMSIG(report["init_status"])
    elif os.WIFSIGNALED(status):
        signal_number = os.WTERMSIG(status)
        at_cpu_limit = signal_number == signal.SIGXCPU or (
            signal_number == signal.SIGKILL and usage.cpu_time >= limits.cpu_time
        )
        termination = Termination.CPU_LIMIT if at_cpu_limit else Termination.SIGNALED
    else:
        exit_code = os.WEXITSTATUS(status)
        at_memory_limit = exception.startswith("MemoryError")
        termination = Termination.MEMORY_LIMIT if at_memory_limit else Termination.EXITED
    return RunResult(
        termination=termination,
        exit_code=exit_code,
        signal=int(signal_number),
        stdout=stdout[0].decode(errors="replace"),
        stderr=stderr[0].decode(errors="replace"),
        stdout_truncated=stdout[1],
        stderr_truncated=stderr[1],
        result=value,
        exception=exception,
        files={path: base64.b64decode(data) for path, data in report["files"].items()},
        files_truncated=report["files_truncated"],
        usage=usage,
    )


def _outcome(encoded: str, max_chars: int) -> tuple[str | None, str]:
    """`(result, exception)` from the runner's message, which the code could have written.

    Anything malformed reads as no result and no exception; strings are cut to `max_chars`
    and made valid UTF-8.
    """
    try:
        message = json.loads(base64.b64decode(encoded))
    except (ValueError, RecursionError):
        return None, ""
    if not isinstance(message, dict):
        return None, ""
    value, exception = message.get("result"), message.get("exception")

    def clean(text: str) -> str:
        return text[:max_chars].encode(errors="replace").decode()

    return (
        clean(value) if isinstance(value, str) else None,
        clean(exception) if isinstance(exception, str) else "",
    )
