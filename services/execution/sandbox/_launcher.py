"""The launcher: one process per sandbox, which builds it, runs one piece of code, reports.

The service starts it as `python -I -S _launcher.py FD` with an empty environment, FD being
its end of a control socket; it imports nothing but the standard library. Three processes
make up a sandbox:

- the launcher (this script) stays in the host's PID namespace. It enters new user, mount,
  network, IPC, UTS and cgroup namespaces, has a helper still outside them map the
  sandbox's only user and group (1000 inside) to 65534 (nobody) outside, becomes that user
  and builds the new root: a read-only tmpfs holding read-only bind mounts of the system
  directories and the interpreter's prefix, a small /etc of its own, a /dev with five
  device nodes, and one tmpfs of limited size for /work (the code's directory) and /tmp.
  It then forks init, and once the runner is up reports `ready`.
- init is PID 1 of a new PID namespace, in a session of its own: it mounts /proc, pivots
  into the new root, drops every capability, forks the runner and reaps. When the runner
  exits, init kills whatever else is left, reaps it, reports the runner's status and exits.
- the runner, init's child, sets the resource limits, no_new_privs and the seccomp filter,
  and executes the interpreter on `runner.py`, which waits for the code.

On the request the launcher writes the input files into /work, hands the code to the
runner and watches: at the wall-clock limit, or when the service asks, it has init kill
everything else (and kills init too if that takes long). Once init is gone, so is every
process of the sandbox; the launcher collects the files left in /work and sends its
report: the runner's wait status, the rusage of the whole tree, the runner's result
message and the files. Should anything fail, or the service go away, it kills init, which
takes the whole PID namespace with it.

Control messages, both ways, are a 4-byte big-endian length and a JSON object. The service
sends the setup, then the request, then, if it wants the run killed, anything at all; the
end of the stream tells the launcher to kill its sandbox and exit. The launcher answers
`{"ready": true, "init_pid": PID}`, then the report, or `{"error": ...}` instead of either.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from typing import Any, NoReturn

# The sandbox's user and group inside its user namespace, and what they are outside.
SANDBOX_ID = 1000
HOST_ID = 65534
# Where the new root is built: a tmpfs mounted over /tmp, in the private mount namespace.
ROOT = "/tmp"
WORK_DIR = "/work"
RUNNER_PATH = "/sandbox/runner.py"
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
RUNNER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORK_DIR,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}
# Descriptor numbers of the runner's channels: the code comes in on one, the result goes out
# on the other.
RUNNER_CODE_FD = 3
RUNNER_RESULT_FD = 4
RUNNER_READY = b"+"
# How long init has to kill and reap everything once asked, before it is killed itself.
STOP_GRACE_SECONDS = 2.0
# How deep in /work returned files may lie, which also keeps their paths short.
MAX_OUTPUT_DEPTH = 12

_CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_SECCOMP = 22
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SECCOMP_MODE_FILTER = 2
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each locked, and KEEP_CAPS locked off.
_SECUREBITS = 0b11101111
_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.pivot_root.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, *(ctypes.c_ulong,) * 4]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def encode_message(message: dict[str, Any]) -> bytes:
    """One control message: its length, then the JSON object."""
    data = json.dumps(message).encode()
    return struct.pack(">I", len(data)) + data


def _recv_message(sock: socket.socket) -> dict[str, Any] | None:
    header = _recv_exactly(sock, 4)
    if header is None:
        return None
    data = _recv_exactly(sock, struct.unpack(">I", header)[0])
    return None if data is None else json.loads(data)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _check(result: int, what: str) -> None:
    if result == -1:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _restrict_mount(path: str, attributes: int, *, recursive: bool) -> None:
    """Sets mount attributes (read-only, nosuid...) on `path`, and its submounts if asked."""
    attr = _MountAttr(attr_set=attributes)
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(_AT_RECURSIVE if recursive else 0),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


def _bind_readonly(source: str, target: str) -> None:
    _mount(source, target, None, _MS_BIND | _MS_REC)
    _restrict_mount(
        target, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=True
    )


def _write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_until_eof(fd: int) -> bytes:
    chunks = bytearray()
    while chunk := os.read(fd, 65536):
        chunks += chunk
    return bytes(chunks)


# --- Namespaces and the new root (in the launcher) -------------------------------------


def _enter_namespaces() -> None:
    """Moves this process into new namespaces, its user namespace mapping 1000 to 65534.

    Only a process with CAP_SETUID in the parent namespace may map another user than
    itself, so a helper forked beforehand, still outside, writes the maps. Supplementary
    groups are dropped first: they would otherwise stay the host's (root).
    """
    os.setgroups([])
    go_read, go_write = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(go_write)
            if os.read(go_read, 1):
                proc = f"/proc/{os.getppid()}"
                for name, content in (
                    ("setgroups", "deny"),
                    ("uid_map", f"{SANDBOX_ID} {HOST_ID} 1"),
                    ("gid_map", f"{SANDBOX_ID} {HOST_ID} 1"),
                ):
                    fd = os.open(f"{proc}/{name}", os.O_WRONLY)
                    os.write(fd, content.encode())
                    os.close(fd)
                code = 0
        finally:
            os._exit(code)
    os.close(go_read)
    try:
        _check(_libc.unshare(_CLONE_NAMESPACES), "unshare")
        os.write(go_write, b"x")
    finally:
        os.close(go_write)
        _, status = os.waitpid(helper, 0)
    if status != 0:
        raise RuntimeError("the helper could not map the sandbox's user")


def _become_sandbox_user() -> None:
    """Takes the sandbox's user and group, keeping the capabilities held in the namespace.

    The kernel clears capabilities on leaving the namespace's root user only, and root is
    not mapped here. From now on every file is created as the sandbox's user: the kernel
    refuses to create one owned by a user the namespace does not map.
    """
    os.setresgid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
    os.setresuid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the change of user


def _build_root(setup: dict[str, Any]) -> None:
    """Builds the sandbox's root at ROOT, leaving it read-only; init pivots into it.

    What is bound in is opened first, while still host root, since the sandbox's user may
    not be allowed to reach it (the interpreter may live under /root), and mounted from
    those descriptors.
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    links = {}
    binds = {}
    for name in SYSTEM_DIRS:
        host = f"/{name}"
        if os.path.islink(host):
            links[host] = os.readlink(host)
        elif os.path.isdir(host):
            binds[host] = os.open(host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for path in setup["binds"]:
        if not any((path + "/").startswith(bound + "/") for bound in binds):
            binds[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _become_sandbox_user()
    _mount("tmpfs", ROOT, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,nr_inodes=1024,mode=0755")
    for host, target in links.items():
        os.symlink(target, ROOT + host)
    for host, fd in binds.items():
        os.makedirs(ROOT + host)
        _bind_readonly(f"/proc/self/fd/{fd}", ROOT + host)
        os.close(fd)
    _populate_etc()
    _populate_dev()
    _mount_scratch(setup["limits"])
    os.mkdir(f"{ROOT}/proc")
    os.mkdir(os.path.dirname(ROOT + RUNNER_PATH))
    _write_file(ROOT + RUNNER_PATH, setup["runner"].encode())
    hostname = b"sandbox"
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _restrict_mount(
        ROOT, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=False
    )


def _populate_etc() -> None:
    etc = f"{ROOT}/etc"
    os.mkdir(etc)
    files = {
        "passwd": f"sandbox:x:{SANDBOX_ID}:{SANDBOX_ID}:sandbox:{WORK_DIR}:/usr/sbin/nologin\n",
        "group": f"sandbox:x:{SANDBOX_ID}:\n",
        "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n",
        "hostname": "sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
    for name, content in files.items():
        _write_file(f"{etc}/{name}", content.encode())
    with contextlib.suppress(FileNotFoundError):
        with open("/etc/ld.so.cache", "rb") as cache:
            _write_file(f"{etc}/ld.so.cache", cache.read())
    if os.path.islink("/etc/localtime"):
        os.symlink(os.readlink("/etc/localtime"), f"{etc}/localtime")
    elif os.path.isfile("/etc/localtime"):
        with open("/etc/localtime", "rb") as zone:
            _write_file(f"{etc}/localtime", zone.read())


def _populate_dev() -> None:
    dev = f"{ROOT}/dev"
    os.mkdir(dev)
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _write_file(f"{dev}/{name}", b"")
            _mount(f"/dev/{name}", f"{dev}/{name}", None, _MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("shm", "/tmp"),
    ):
        os.symlink(target, f"{dev}/{name}")
    _restrict_mount(dev, _MOUNT_ATTR_RDONLY, recursive=False)


def _mount_scratch(limits: dict[str, int]) -> None:
    """One tmpfs of limited size and file count, seen as /work and /tmp."""
    scratch = f"{ROOT}/scratch"
    os.mkdir(scratch)
    _mount(
        "tmpfs",
        scratch,
        "tmpfs",
        _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
        f"size={limits['tmp_bytes']},nr_inodes={limits['tmp_inodes']},mode=0755,"
        f"uid={SANDBOX_ID},gid={SANDBOX_ID}",
    )
    for name, mode in ((WORK_DIR, 0o755), ("/tmp", 0o1777)):
        os.mkdir(scratch + name)
        os.chmod(scratch + name, mode)
        os.mkdir(ROOT + name)
        _mount(scratch + name, ROOT + name, None, _MS_BIND)
    _check(_libc.umount2(scratch.encode(), _MNT_DETACH), "umount scratch")
    os.rmdir(scratch)


# --- Init and the runner (in the new PID namespace) ------------------------------------


def _init(
    setup: dict[str, Any],
    runner_fds: tuple[int, int],
    status_w: int,
    error_w: int,
    unneeded: tuple[int, ...],
) -> NoReturn:
    """PID 1: finishes the sandbox, starts the runner, reaps, reports the runner's status."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # A session of its own: else the code could signal the launcher's process group,
        # which the kernel does not confine to the PID namespace.
        os.setsid()
        for fd in unneeded:
            os.close(fd)
        # hidepid: a process sees only those it may trace, which excludes init itself.
        _mount(
            "proc",
            f"{ROOT}/proc",
            "proc",
            _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY,
            "hidepid=2",
        )
        os.chdir(ROOT)
        _check(_libc.pivot_root(b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", _MNT_DETACH), "umount old root")
        os.chdir("/")
        _drop_capabilities()
        signal.signal(signal.SIGUSR1, _kill_all)
        runner = os.fork()
        if runner == 0:
            _exec_runner(setup, runner_fds, error_w)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for fd in (devnull, *runner_fds, error_w):
            os.close(fd)
    except BaseException:
        with contextlib.suppress(BaseException):
            _write_all(error_w, traceback.format_exc().encode())
        os._exit(1)
    runner_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == runner:
            runner_status = status
            _kill_all()
    if runner_status is not None:
        _write_all(status_w, struct.pack("=i", runner_status))
    os._exit(0)


def _kill_all(*_: object) -> None:
    """In init, at the runner's exit or on SIGUSR1 from the launcher: kills every other
    process of the PID namespace, to be reaped by init. Had the kernel killed them along
    with init instead, their CPU time would be lost to the accounting."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def _drop_capabilities() -> None:
    """Drops every capability, with no way to regain one; leaves the process undumpable."""
    for cap in itertools.count():
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == -1:
            if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability
                _check(-1, f"drop capability {cap}")
            break
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(_PR_SET_SECUREBITS, _SECUREBITS)
    header = _CapHeader(version=_CAPABILITY_VERSION_3, pid=0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    _prctl(_PR_SET_DUMPABLE, 0)


def _exec_runner(setup: dict[str, Any], runner_fds: tuple[int, int], error_w: int) -> NoReturn:
    """In init's child: limits, no_new_privs, seccomp, then the interpreter on the runner."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        code_r, result_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in runner_fds)
        error_w = fcntl.fcntl(error_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(code_r, RUNNER_CODE_FD)
        os.dup2(result_w, RUNNER_RESULT_FD)
        os.closerange(RUNNER_RESULT_FD + 1, error_w)
        os.closerange(error_w + 1, os.sysconf("SC_OPEN_MAX"))
        limits = setup["limits"]
        for which, value in (
            (resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1)),
            (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
            (resource.RLIMIT_NPROC, (limits["max_processes"],) * 2),
            (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
            (resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(which, value)
        os.chdir(WORK_DIR)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        program = base64.b64decode(setup["seccomp"])
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len=len(program) // 8, filter=ctypes.addressof(buffer))
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
        interpreter = setup["interpreter"]
        os.execve(
            interpreter,
            [
                interpreter,
                *("-I", "-B", "-X", "utf8", RUNNER_PATH),
                *(str(n) for n in (RUNNER_CODE_FD, RUNNER_RESULT_FD, limits["max_result_chars"])),
            ],
            RUNNER_ENV,
        )
    except BaseException:
        with contextlib.suppress(BaseException):
            _write_all(error_w, traceback.format_exc().encode())
    os._exit(127)


# --- One run (in the launcher) ---------------------------------------------------------


class _Sandbox:
    """The launcher's handles on a sandbox: init's PID and the pipes to init and the runner.

    Init is this process's child, so the launcher reaps it, at the end of a run or, should
    anything go wrong, in `close()`: were the launcher to exit first, init would be left to
    the host's PID 1 to reap.
    """

    def __init__(self, setup: dict[str, Any], ctl: socket.socket) -> None:
        self.limits = setup["limits"]
        code_r, self.code_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.error_r, error_w = os.pipe()
        devnull = os.open("/dev/null", os.O_RDWR)
        self.init = os.fork()
        if self.init == 0:
            unneeded = (ctl.fileno(), self.code_w, self.result_r, self.status_r, self.error_r)
            _init(setup, (code_r, result_w), status_w, error_w, (*unneeded, devnull))
        self.reaped = False
        self.pidfd = os.pidfd_open(self.init)
        for fd in (code_r, result_w, status_w, error_w):
            os.close(fd)
        # The standard streams belong to the runner from now on.
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    def wait_until_ready(self) -> None:
        """Returns once the runner waits for code; raises if init or the runner failed."""
        errors = _read_until_eof(self.error_r)
        os.close(self.error_r)
        if errors:
            raise RuntimeError(f"the sandbox did not start:\n{errors.decode(errors='replace')}")
        if os.read(self.result_r, 1) != RUNNER_READY:
            raise RuntimeError("the runner exited during start-up")

    def run(self, request: dict[str, Any], ctl: socket.socket) -> dict[str, Any]:
        """Runs the request's code; the report for the service."""
        inputs = _write_inputs(request["files"])
        started = time.monotonic()
        stop_at = started + request["timeout"]  # when to have init kill everything else
        kill_at = None  # when to kill init itself, if it has not finished by then
        with contextlib.suppress(BrokenPipeError):
            _write_all(self.code_w, request["code"].encode())
        os.close(self.code_w)
        result_cap = self.limits["max_result_bytes"]
        result = bytearray()
        killed = None
        poller = select.poll()
        for fd in (self.pidfd, self.result_r, ctl.fileno()):
            poller.register(fd, select.POLLIN)
        while True:
            now = time.monotonic()
            if killed is None and now >= stop_at:
                killed, kill_at = "timeout", self._stop()
            elif kill_at is not None and now >= kill_at:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                kill_at = None
            wake_at = kill_at if killed else stop_at
            events = dict(poller.poll(None if wake_at is None else (wake_at - now) * 1000))
            if self.result_r in events:
                chunk = os.read(self.result_r, 65536)
                result += chunk[: result_cap - len(result)]
                if not chunk:
                    poller.unregister(self.result_r)
            if ctl.fileno() in events:
                poller.unregister(ctl.fileno())
                if killed is None:
                    killed, kill_at = "requested", self._stop()
            if self.pidfd in events:
                break
        _, init_status, usage = os.wait4(self.init, 0)
        self.reaped = True
        wall = time.monotonic() - started
        # Everything in the PID namespace is gone now; what is left in the pipes is final.
        result += _read_until_eof(self.result_r)[: result_cap - len(result)]
        status = _read_until_eof(self.status_r)
        files, files_truncated = _collect_outputs(inputs, self.limits)
        return {
            "status": struct.unpack("=i", status)[0] if len(status) == 4 else None,
            "init_status": init_status,
            "killed": killed,
            "wall_seconds": wall,
            "user_seconds": usage.ru_utime,
            "system_seconds": usage.ru_stime,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "result": base64.b64encode(result).decode(),
            "files": {path: base64.b64encode(data).decode() for path, data in files.items()},
            "files_truncated": files_truncated,
        }

    def close(self) -> None:
        """Kills init, and with it everything in the sandbox, unless it ended already."""
        if not self.reaped:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            os.waitpid(self.init, 0)
            self.reaped = True

    def _stop(self) -> float:
        """Has init kill everything else and end; the time by which it must have ended."""
        signal.pidfd_send_signal(self.pidfd, signal.SIGUSR1)
        return time.monotonic() + STOP_GRACE_SECONDS


def _write_inputs(files: dict[str, str]) -> dict[str, bytes]:
    """Writes the input files into the work directory; their SHA-256 digests by path."""
    digests = {}
    for path, encoded in files.items():
        content = base64.b64decode(encoded)
        parts = path.split("/")
        directory = WORK_DIR
        for part in parts[:-1]:
            directory = f"{directory}/{part}"
            if not os.path.isdir(directory):
                os.mkdir(directory, 0o755)
        _write_file(f"{WORK_DIR}/{path}", content)
        digests[path] = hashlib.sha256(content).digest()
    return digests


def _collect_outputs(
    inputs: dict[str, bytes], limits: dict[str, int]
) -> tuple[dict[str, bytes], bool]:
    """The regular files in the work directory that are new or changed, within the caps.

    Nothing in the sandbox runs any more, so the tree cannot change under the walk; still,
    symbolic links are never followed, and only regular files are read. Files whose names
    are not UTF-8 are left out, as are special files and links.
    """
    paths = []
    truncated = False
    for directory, subdirectories, names in os.walk(WORK_DIR, followlinks=False):
        if subdirectories and directory.count("/") > MAX_OUTPUT_DEPTH:
            subdirectories.clear()
            truncated = True
        for name in names:
            path = f"{directory}/{name}"
            if stat.S_ISREG(os.lstat(path).st_mode) and _is_utf8(name):
                paths.append(path)
    files: dict[str, bytes] = {}
    budget = limits["max_files_bytes"]
    for path in sorted(paths):
        relative = path[len(WORK_DIR) + 1 :]
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size > budget and relative not in inputs:
                truncated = True
                continue
            content = _read_until_eof(fd)
        finally:
            os.close(fd)
        if hashlib.sha256(content).digest() == inputs.get(relative):
            continue
        if len(files) >= limits["max_files"] or len(content) > budget:
            truncated = True
            continue
        files[relative] = content
        budget -= len(content)
    return files, truncated


def _is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # undecodable bytes, which Python keeps as surrogates
        return False
    return True


def main() -> None:
    """Entry point: `python -I -S _launcher.py FD`."""
    ctl = socket.socket(fileno=int(sys.argv[1]))
    sandbox = None
    try:
        # If the service dies, so does the launcher, and with it the whole sandbox.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.umask(0o022)
        setup = _recv_message(ctl)
        if setup is None:
            return
        _enter_namespaces()
        _build_root(setup)
        sandbox = _Sandbox(setup, ctl)
        sandbox.wait_until_ready()
        ctl.sendall(encode_message({"ready": True, "init_pid": sandbox.init}))
        # The end of the stream instead of a request: the service gives the sandbox up.
        request = _recv_message(ctl)
        if request is not None:
            ctl.sendall(encode_message(sandbox.run(request, ctl)))
    except Exception:
        with contextlib.suppress(OSError):
            ctl.sendall(encode_message({"error": traceback.format_exc()}))
        sys.exit(1)
    finally:
        if sandbox is not None:
            sandbox.close()


if __name__ == "__main__":
    main()
