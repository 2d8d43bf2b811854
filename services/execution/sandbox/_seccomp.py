"""The sandbox's seccomp policy, assembled into a classic BPF program without libseccomp.

The filter is a deny list in front of "allow": the namespaces, the dropped capabilities
and the read-only root are the boundary, and the filter takes away the system calls that
untrusted Python has no business making, so that a kernel bug behind one of them is out of
reach. Denied calls fail with EPERM, which Python reports as `PermissionError`. Calls
made through another ABI (32-bit x86, x32) kill the process: the numbers below would not
apply to them.

`build_filter()` returns the program as bytes (an array of `struct sock_filter`); the
launcher installs it with `prctl(PR_SET_SECCOMP)` in the runner just before `execve`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

logger = logging.getLogger(__name__)

# System calls denied outright: kernel modules, kexec, mounts and namespaces, tracing and
# cross-process memory access, BPF and perf, keyrings, io_uring (whose operations are not
# seen by seccomp), clock and host settings, swap, reboot, raw I/O ports, file handles.
DENIED_SYSCALLS = (
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "chroot",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "modify_ldt",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pidfd_getfd",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setdomainname",
    "sethostname",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
)

# Syscall numbers per machine (from the kernel's tables, checked against libseccomp).
# A name missing from a table does not exist on that architecture.
_X86_64 = {
    "acct": 163,
    "add_key": 248,
    "adjtimex": 159,
    "bpf": 321,
    "chroot": 161,
    "clock_adjtime": 305,
    "clock_settime": 227,
    "clone": 56,
    "clone3": 435,
    "delete_module": 176,
    "finit_module": 313,
    "fsconfig": 431,
    "fsmount": 432,
    "fsopen": 430,
    "fspick": 433,
    "init_module": 175,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "io_uring_setup": 425,
    "ioperm": 173,
    "iopl": 172,
    "kcmp": 312,
    "kexec_file_load": 320,
    "kexec_load": 246,
    "keyctl": 250,
    "lookup_dcookie": 212,
    "modify_ldt": 154,
    "mount": 165,
    "mount_setattr": 442,
    "move_mount": 429,
    "name_to_handle_at": 303,
    "nfsservctl": 180,
    "open_by_handle_at": 304,
    "open_tree": 428,
    "perf_event_open": 298,
    "pidfd_getfd": 438,
    "pivot_root": 155,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "ptrace": 101,
    "quotactl": 179,
    "quotactl_fd": 443,
    "reboot": 169,
    "request_key": 249,
    "setdomainname": 171,
    "sethostname": 170,
    "setns": 308,
    "settimeofday": 164,
    "socket": 41,
    "swapoff": 168,
    "swapon": 167,
    "syslog": 103,
    "umount2": 166,
    "unshare": 272,
    "uselib": 134,
    "userfaultfd": 323,
    "vhangup": 153,
}
_AARCH64 = {
    "acct": 89,
    "add_key": 217,
    "adjtimex": 171,
    "bpf": 280,
    "chroot": 51,
    "clock_adjtime": 266,
    "clock_settime": 112,
    "clone": 220,
    "clone3": 435,
    "delete_module": 106,
    "finit_module": 273,
    "fsconfig": 431,
    "fsmount": 432,
    "fsopen": 430,
    "fspick": 433,
    "init_module": 105,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "io_uring_setup": 425,
    "kcmp": 272,
    "kexec_file_load": 294,
    "kexec_load": 104,
    "keyctl": 219,
    "lookup_dcookie": 18,
    "mount": 40,
    "mount_setattr": 442,
    "move_mount": 429,
    "name_to_handle_at": 264,
    "nfsservctl": 42,
    "open_by_handle_at": 265,
    "open_tree": 428,
    "perf_event_open": 241,
    "pidfd_getfd": 438,
    "pivot_root": 41,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "ptrace": 117,
    "quotactl": 60,
    "quotactl_fd": 443,
    "reboot": 142,
    "request_key": 218,
    "setdomainname": 162,
    "sethostname": 161,
    "setns": 268,
    "settimeofday": 170,
    "socket": 198,
    "swapoff": 225,
    "swapon": 224,
    "syslog": 116,
    "umount2": 39,
    "unshare": 97,
    "userfaultfd": 282,
    "vhangup": 58,
}

# machine -> (AUDIT_ARCH_* value, syscall table, lowest number of a foreign ABI or None)
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 0x40000000),  # x32 calls have bit 30 set
    "aarch64": (0xC00000B7, _AARCH64, None),
}

# Namespace flags that clone() may not be given (unshare and setns are denied outright).
_CLONE_NEW_NAMESPACES = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_ABS_W = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
_ALLOW = 0x7FFF0000
# Offsets into struct seccomp_data: nr, arch, then args[6] as 64-bit values. The low 32
# bits of an argument are at its offset on little-endian machines (both supported ones).
_NR = 0
_ARCH = 4
_ARG0 = 16


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(machine: str | None = None) -> bytes:
    """The filter for `machine` (default: this one's, per `os.uname()`).

    Raises:
        RuntimeError: the architecture has no syscall table here; the sandbox refuses to
            run without its filter.
    """
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise RuntimeError(f"no seccomp policy for the {machine} architecture")
    audit_arch, table, foreign_abi = _ARCHES[machine]
    deny = _ERRNO | errno.EPERM

    program = [
        _insn(_LD_ABS_W, _ARCH),
        _insn(_JEQ, audit_arch, jt=1),
        _insn(_RET, _KILL_PROCESS),
        _insn(_LD_ABS_W, _NR),
    ]
    if foreign_abi is not None:
        program += [_insn(_JGE, foreign_abi, jf=1), _insn(_RET, _KILL_PROCESS)]
    for name in DENIED_SYSCALLS:
        if name in table:
            program += [_insn(_JEQ, table[name], jf=1), _insn(_RET, deny)]
    program += [
        # clone3 passes its flags in memory, where the filter cannot see them: answer
        # ENOSYS, on which the C library falls back to clone.
        _insn(_JEQ, table["clone3"], jf=1),
        _insn(_RET, _ERRNO | errno.ENOSYS),
        # clone: no new namespaces.
        _insn(_JEQ, table["clone"], jf=4),
        _insn(_LD_ABS_W, _ARG0),
        _insn(_JSET, _CLONE_NEW_NAMESPACES, jf=1),
        _insn(_RET, deny),
        _insn(_RET, _ALLOW),
        # socket: Unix domain only (no IP, no packet or netlink sockets).
        _insn(_JEQ, table["socket"], jf=4),
        _insn(_LD_ABS_W, _ARG0),
        _insn(_JEQ, socket.AF_UNIX, jt=1),
        _insn(_RET, deny),
        _insn(_RET, _ALLOW),
        _insn(_RET, _ALLOW),
    ]
    return b"".join(program)
