"""The sandbox's values: limits, a request, a result, how a run ended, and its error."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta

from services.runtime import Internal

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB


class SandboxError(Internal):
    """The sandbox itself failed (it could not start, or its launcher did not report).

    Never raised for what the code does: its exceptions, crashes and limits are results.
    """

    reason = "SANDBOX_FAILED"


class Termination(enum.IntEnum):
    """How a run ended; names and values are those of the proto's `Termination`."""

    EXITED = 1
    """The process exited by itself; see `exit_code` (1 after an uncaught exception)."""
    TIMEOUT = 2
    """Killed at the wall-clock limit."""
    CPU_LIMIT = 3
    """Killed at the CPU-time limit."""
    MEMORY_LIMIT = 4
    """An allocation failed at the memory limit (the code ended with `MemoryError`)."""
    OUTPUT_LIMIT = 5
    """Killed because stdout or stderr went past `max_output_bytes`."""
    SIGNALED = 6
    """Killed by a signal for another reason; see `signal`."""
    CANCELLED = 7
    """Never returned by `run()`, which raises `CancelledError` when cancelled; here for a
    servicer that reports a cancelled call or task."""


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """What one run may use. The defaults suit short analysis scripts.

    Per-process limits (`cpu_time`, `memory_bytes`, `max_open_files`, `max_file_bytes`)
    apply to each process the code starts; `max_processes` bounds how many (threads
    count), and the wall-clock timeout bounds them all.
    """

    timeout: timedelta = timedelta(seconds=10)
    """Wall-clock limit of a run whose request sets none."""
    max_timeout: timedelta = timedelta(seconds=60)
    """Cap on a request's own timeout."""
    cpu_time: timedelta = timedelta(seconds=10)
    """CPU time per process (RLIMIT_CPU; whole seconds, rounded up)."""
    memory_bytes: int = 512 * MiB
    """Address space per process (RLIMIT_AS)."""
    max_processes: int = 32
    """Processes and threads, the sandbox's own three (launcher, init, and the runner, which
    runs the code) included: RLIMIT_NPROC, counted in the sandbox's own user namespace."""
    max_open_files: int = 128
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_file_bytes: int = 16 * MiB
    """Largest file the code may write (RLIMIT_FSIZE)."""
    tmp_bytes: int = 64 * MiB
    """Size of the tmpfs behind /work and /tmp; input files count against it."""
    tmp_inodes: int = 4096
    """Files and directories on that tmpfs."""
    max_output_bytes: int = 64 * KiB
    """Cap on stdout and on stderr, each; going past it ends the run (OUTPUT_LIMIT)."""
    max_result_chars: int = 16 * KiB
    """Cap on `result` and on `exception`, each; a longer one is cut and ends in '...'."""
    max_files: int = 64
    """Most files returned."""
    max_files_bytes: int = 1 * MiB
    """Most bytes of files returned, all together."""
    start_timeout: timedelta = timedelta(seconds=10)
    """How long a sandbox may take to start before `SandboxError`."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value <= (timedelta(0) if isinstance(value, timedelta) else 0):
                raise ValueError(f"SandboxLimits.{item.name} must be positive, not {value}")
        if self.max_result_chars < 16:
            raise ValueError("SandboxLimits.max_result_chars must be at least 16")
        if self.max_processes < 3:
            raise ValueError("SandboxLimits.max_processes must be at least 3 (the sandbox's own)")


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """Code to run, with what it may read."""

    code: str
    """Python source; if its last statement is an expression, its repr() is the result."""
    stdin: str = ""
    """Text on the code's standard input (UTF-8)."""
    files: Mapping[str, bytes] = field(default_factory=dict)
    """Files placed in the working directory first, by relative path (`data/in.csv`)."""
    timeout: timedelta | None = None
    """Wall-clock limit; None = `SandboxLimits.timeout`; capped by `max_timeout`."""


@dataclass(frozen=True, kw_only=True)
class ResourceUsage:
    """What a run consumed, over all its processes."""

    wall_time: timedelta
    """From handing the code to the runner until the last process was gone."""
    user_cpu_time: timedelta
    system_cpu_time: timedelta
    max_memory_bytes: int
    """Peak resident memory of the largest process."""

    @property
    def cpu_time(self) -> timedelta:
        """User plus system CPU time (the proto's `cpu_time`)."""
        return self.user_cpu_time + self.system_cpu_time


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """How a run ended and what it left; field for field the proto's `RunCodeResponse`."""

    termination: Termination
    exit_code: int
    """The exit status when the runner exited by itself (also set with MEMORY_LIMIT)."""
    signal: int
    """The signal that killed the runner (SIGKILL for TIMEOUT and OUTPUT_LIMIT); else 0."""
    stdout: str
    """Standard output, UTF-8 with invalid bytes replaced, at most `max_output_bytes`."""
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    result: str | None
    """repr() of the final expression; None without one, or if the code did not get there."""
    exception: str
    """`Type: message` of the uncaught exception, if any; the traceback is in stderr."""
    files: dict[str, bytes]
    """Regular files left in the working directory, new or changed, by relative path."""
    files_truncated: bool
    """True if files were left out because of `max_files` or `max_files_bytes`."""
    usage: ResourceUsage
