"""Runs untrusted Python in a process it cannot escape: the sandbox behind `RunCode`.

    result = await run(RunRequest(code="import math\\nmath.pi * 2"))
    result.termination, result.result   # Termination.EXITED, '6.283185307179586'

    async with SandboxPool(limits=SandboxLimits(), size=4) as pool:   # warm sandboxes
        result = await pool.run(RunRequest(code=..., stdin=..., files={"in.csv": data}))

The operating system is the boundary. Each run gets a fresh sandbox: a launcher process
enters new user, PID, mount, network, IPC, UTS and cgroup namespaces; the code runs as user
1000 inside, 65534 (nobody) outside, with no capabilities, no_new_privs and a seccomp filter
(`_seccomp`), under per-process rlimits (CPU, address space, processes, open files, file
size, no core dumps), in a root of its own: read-only bind mounts of /usr, /bin, /lib... and
of the interpreter's prefix, a minimal /etc (no shadow, no resolver), five device nodes, a
read-only /proc of its own PID namespace, and one tmpfs of limited size and file count for
/work (the working directory) and /tmp. The network namespace has only a loopback that is
down, and the filter refuses every socket but Unix ones. The environment is fixed (PATH,
HOME, TMPDIR, LANG), nothing inherited. At the wall-clock limit everything in the PID
namespace is killed. Output is read as it comes and capped; files are collected without
following links. `_launcher` describes the mechanism; `_runner` the channel for the result.

A run's own failures (exceptions, syntax errors, crashes, limits) are results, never
exceptions of `run()`; `SandboxError` means the sandbox itself failed.

Needs Linux 5.12 or later (mount_setattr), user namespaces, and the service running as root
(in its container) so that it may map the sandbox's user to 65534; no extra packages.
"""

from __future__ import annotations

import logging

from services.execution.sandbox._sandbox import SandboxPool, run
from services.execution.sandbox._types import (
    ResourceUsage,
    RunRequest,
    RunResult,
    SandboxError,
    SandboxLimits,
    Termination,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ResourceUsage",
    "RunRequest",
    "RunResult",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "Termination",
    "run",
]
