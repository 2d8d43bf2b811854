"""The sandbox's checks that start no sandbox: malformed requests, the seccomp tables.
(Runs of real sandboxes are in tests/system/.)"""

from __future__ import annotations

import ctypes
from datetime import timedelta

import pytest

from services.execution.sandbox import RunRequest, SandboxLimits, _seccomp, run
from services.runtime import InvalidArgument

LIMITS = SandboxLimits(timeout=timedelta(seconds=5))


async def test_malformed_requests_are_refused() -> None:
    for files in ({"../x": b""}, {"/etc/x": b""}, {"a//b": b""}, {"a": b"", "a/b": b""}):
        with pytest.raises(InvalidArgument):
            await run(RunRequest(code="1", files=files), LIMITS)
    with pytest.raises(InvalidArgument):
        await run(RunRequest(code="1", timeout=timedelta(0)), LIMITS)
    with pytest.raises(InvalidArgument):
        too_big = {"big": bytes(LIMITS.tmp_bytes + 1)}
        await run(RunRequest(code="1", files=too_big), LIMITS)


def libseccomp() -> ctypes.CDLL | None:
    """libseccomp, opened by name (`ctypes.util.find_library` would run ldconfig)."""
    for name in ("libseccomp.so.2", "libseccomp.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def test_seccomp_syscall_numbers_are_the_kernel_ones() -> None:
    library = libseccomp()
    if library is None:
        pytest.skip("libseccomp, the reference for the tables, is not installed")
    resolve = library.seccomp_syscall_resolve_name_arch
    resolve.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    for machine, (audit_arch, table, _) in _seccomp._ARCHES.items():
        assert set(_seccomp.DENIED_SYSCALLS) - set(table) <= {
            "iopl",
            "ioperm",
            "modify_ldt",
            "uselib",
        }
        for name, number in table.items():
            assert resolve(audit_arch, name.encode()) == number, (machine, name)
        assert len(_seccomp.build_filter(machine)) % 8 == 0
    with pytest.raises(RuntimeError):
        _seccomp.build_filter("mips")
