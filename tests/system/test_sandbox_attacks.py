"""The sandbox against hostile code: each attack is contained, and the next run still works.

Every test asserts facts (what the code could not read, reach or change, what is left
running) rather than only that nothing crashed; `contained()` then checks that no sandbox
process outlived the attack and that an ordinary run works.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import resource
import signal
import socket
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from services.execution.sandbox import RunRequest, RunResult, SandboxLimits, Termination, run
from tests.system.test_sandbox import code_sleeping, sandbox_processes

LIMITS = SandboxLimits(timeout=timedelta(seconds=5))
SHORT = timedelta(seconds=1)
PREFIX = Path(sys.base_prefix).resolve()  # the interpreter's, which the sandbox sees


async def attack(code: str, *, timeout: timedelta | None = None) -> RunResult:
    return await run(RunRequest(code=code, timeout=timeout), LIMITS)


async def contained() -> None:
    """Nothing of the last run is left, and the next run works normally."""
    assert sandbox_processes() == []
    result = await run(RunRequest(code="print('still fine')\n6 * 7"), LIMITS)
    assert (result.termination, result.stdout, result.result) == (
        Termination.EXITED,
        "still fine\n",
        "42",
    )


def everything(result: RunResult) -> str:
    """All the text a run gives back, files included."""
    files = b"".join(result.files.values()).decode(errors="replace")
    return "\n".join((result.stdout, result.stderr, result.result or "", result.exception, files))


# --- Processes, memory, time ----------------------------------------------------------


async def test_fork_bomb() -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    result = await attack(code, timeout=timedelta(seconds=2))
    assert result.termination is Termination.TIMEOUT
    assert time.monotonic() - started < 6
    assert result.usage.cpu_time > timedelta(seconds=0.5)  # the bomb did go off
    await contained()


async def test_process_and_thread_count_is_limited() -> None:
    code = (
        "import os, threading, time\n"
        "count = 0\n"
        "try:\n"
        "    while True:\n"
        "        threading.Thread(target=time.sleep, args=(10,), daemon=True).start()\n"
        "        count += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "count"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED
    # Launcher, init and runner count against max_processes too.
    assert result.result is not None and 0 < int(result.result) <= LIMITS.max_processes - 3
    await contained()


async def test_memory_bomb() -> None:
    result = await attack("bytearray(10**10)")
    assert result.termination is Termination.MEMORY_LIMIT
    assert result.exception == "MemoryError"
    await contained()


async def test_memory_is_limited_when_it_grows_bit_by_bit() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    result = await attack(code)
    assert result.termination is Termination.MEMORY_LIMIT
    assert result.usage.max_memory_bytes <= LIMITS.memory_bytes
    await contained()


async def test_infinite_loop() -> None:
    result = await attack("while True:\n    pass", timeout=SHORT)
    assert result.termination is Termination.TIMEOUT
    assert result.signal == signal.SIGKILL
    assert result.usage.cpu_time >= timedelta(seconds=0.5)  # the killed loop is accounted
    await contained()


@pytest.mark.parametrize(
    "code",
    [
        "import time\ntime.sleep(3600)",
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\nsignal.pause()",
        "import ctypes\nctypes.CDLL(None).pause()",
        "import os\nr, w = os.pipe()\nos.read(r, 1)",
    ],
    ids=["sleep", "pause-ignoring-signals", "ctypes-pause", "read-own-pipe"],
)
async def test_hang_in_c(code: str) -> None:
    started = time.monotonic()
    result = await attack(code, timeout=SHORT)
    assert result.termination is Termination.TIMEOUT
    assert time.monotonic() - started < 4
    await contained()


async def test_catastrophic_regex() -> None:
    result = await attack("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", timeout=SHORT)
    assert result.termination is Termination.TIMEOUT
    await contained()


async def test_interpreter_crash_and_abort_leave_no_core() -> None:
    result = await attack("import ctypes\nctypes.string_at(0)")
    assert result.termination is Termination.SIGNALED
    assert result.signal == signal.SIGSEGV
    result = await attack("import os\nos.abort()")
    assert (result.termination, result.signal) == (Termination.SIGNALED, signal.SIGABRT)
    assert result.files == {}  # no core file
    await contained()


# --- Secrets: files, environment, other runs ------------------------------------------


def host_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return b""


def host_has(*paths: str) -> bool:
    return any(os.path.exists(path) for path in paths)


async def test_cannot_read_etc_shadow() -> None:
    host_lines = [line for line in host_file("/etc/shadow").decode().splitlines() if line]
    code = (
        "import os\n"
        "for path in ('/etc/shadow', '/proc/1/root/etc/shadow', '/proc/self/root/etc/shadow',\n"
        "             '/etc/../etc/shadow', '/etc/gshadow'):\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)\n"
        "found = []\n"
        "for top in ('/etc', '/root', '/work', '/tmp', '/dev'):\n"
        "    for directory, _, names in os.walk(top):\n"
        "        found += [n for n in names if n.strip('g-') == 'shadow']\n"
        "found"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED
    assert result.stdout.split() == ["FileNotFoundError"] * 5
    assert result.result == "[]"
    for line in host_lines:
        assert line not in everything(result)
    await contained()


async def test_cannot_read_the_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = f"canary-{uuid.uuid4()}"
    monkeypatch.setenv("SWITCHBOARD_SANDBOX_CANARY", canary)
    assert os.environ["SWITCHBOARD_SANDBOX_CANARY"] == canary
    code = (
        "import os, sys\n"
        "print(dict(os.environ))\n"
        f"for pid in ['self', '1', '{os.getpid()}', '{os.getppid()}'] + os.listdir('/proc'):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(pid, name, open(f'/proc/{pid}/{name}', 'rb').read())\n"
        "        except OSError as error:\n"
        "            print(pid, name, type(error).__name__)\n"
        "os.environ"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    assert "SWITCHBOARD_SANDBOX_CANARY" not in everything(result)
    assert canary not in everything(result)
    assert result.result == (
        "environ({'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': '/work', 'TMPDIR': '/tmp', "
        "'LANG': 'C.UTF-8'})"
    )
    await contained()


async def test_cannot_see_the_service_files() -> None:
    code = (
        "import os\n"
        f"print((os.path.exists({__file__!r}), os.path.exists({sys.prefix!r})))\n"
        "print(sorted(os.listdir('/')))\n"
        "print([line.split()[4] for line in open('/proc/self/mountinfo')])"
    )
    result = await attack(code)
    exists, top, mounts = (ast.literal_eval(line) for line in result.stdout.splitlines())
    assert exists == (False, False)  # neither the tests nor the virtual environment
    system = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr"}
    own = {"etc", "dev", "proc", "tmp", "work", "sandbox", PREFIX.parts[1]}
    assert set(top) <= system | own
    assert not any(m.startswith(("/work/", "/home", "/var", "/run", "/sys")) for m in mounts)
    await contained()


async def test_cannot_read_another_run_files() -> None:
    secret = f"secret-{uuid.uuid4()}"
    victim_code = (
        f"open('secret.txt', 'w').write({secret!r})\n"
        f"open('/tmp/secret', 'w').write({secret!r})\n"
        "import time\ntime.sleep(3)"
    )
    victim = asyncio.create_task(attack(victim_code))
    await code_sleeping()  # the victim has written its files and sleeps
    thief_code = (
        "import os\n"
        "places = ['/work', '/tmp', '/dev/shm']\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        places += [f'/proc/{pid}/{p}' for p in ('cwd', 'root/work', 'root/tmp')]\n"
        "for place in places:\n"
        "    for directory, _, names in os.walk(place):\n"
        "        for name in names:\n"
        "            try:\n"
        "                if SECRET in open(os.path.join(directory, name)).read():\n"
        "                    print('FOUND', directory, name)\n"
        "            except OSError:\n"
        "                pass\n"
        "sorted(os.listdir('/work') + os.listdir('/tmp'))"
    )
    thief = await attack(f"SECRET = {secret!r}\n{thief_code}")
    assert not victim.done()  # the two ran at the same time
    stolen = await victim
    assert stolen.files == {"secret.txt": secret.encode()}  # it was there all along
    assert thief.termination is Termination.EXITED, thief.stderr
    assert "FOUND" not in thief.stdout
    assert thief.result == "[]"
    await contained()


# --- Network ----------------------------------------------------------------------------


async def test_no_network() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    abstract = f"\0switchboard-sandbox-test-{uuid.uuid4()}"
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(abstract)
    unix_listener.listen()
    unix_listener.setblocking(False)
    code = (
        "import socket\n"
        "def attempt(name, action):\n"
        "    try:\n"
        "        action()\n"
        "        print(name, 'OK')\n"
        "    except OSError as error:\n"
        "        print(name, type(error).__name__)\n"
        f"attempt('host-listener', lambda: socket.create_connection(('127.0.0.1', {port}), 1))\n"
        "attempt('external', lambda: socket.create_connection(('1.1.1.1', 53), 1))\n"
        "attempt('ipv6', lambda: socket.create_connection(('2606:4700:4700::1111', 53), 1))\n"
        "attempt('dns', lambda: socket.getaddrinfo('example.com', 80))\n"
        "attempt('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        ".sendto(b'x', ('1.1.1.1', 53)))\n"
        "attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))\n"
        "attempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))\n"
        f"attempt('abstract-unix', lambda: socket.socket(socket.AF_UNIX).connect({abstract!r}))\n"
        "attempt('unix-pair', lambda: socket.socketpair())\n"
    )
    try:
        result = await attack(code)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the host listener saw no connection
        with pytest.raises(BlockingIOError):
            unix_listener.accept()
    finally:
        listener.close()
        unix_listener.close()
    outcome = dict(line.split() for line in result.stdout.splitlines())
    assert outcome.pop("unix-pair") == "OK"  # local Unix sockets still work
    assert outcome.pop("abstract-unix") == "ConnectionRefusedError"  # not the host's
    assert outcome.pop("dns") == "gaierror"
    assert set(outcome.values()) == {"PermissionError"}, outcome
    await contained()


# --- File system ------------------------------------------------------------------------


async def test_cannot_write_outside_the_scratch_space() -> None:
    passwd = hashlib.sha256(host_file("/etc/passwd")).hexdigest()
    targets = [
        "/evil",
        "/etc/passwd",
        "/etc/evil",
        "/usr/evil",
        "/usr/bin/python3",
        f"{PREFIX}/evil",
        f"{PREFIX}/lib/python3.11/os.py",
        "/dev/evil",
        "/proc/sys/kernel/hostname",
        "/proc/sysrq-trigger",
        "/sandbox/runner.py",
    ]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'a') as f:\n"
        "            f.write('owned')\n"
        "        print(path, 'WROTE')\n"
        "    except OSError as error:\n"
        "        print(path, type(error).__name__)\n"
        "for path in ('/usr', '/etc', '/'):\n"
        "    try:\n"
        "        os.chmod(path, 0o777)\n"
        "        print(path, 'CHMOD')\n"
        "    except OSError as error:\n"
        "        print(path, type(error).__name__)\n"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    assert "WROTE" not in result.stdout and "CHMOD" not in result.stdout
    assert not host_has(f"{PREFIX}/evil", "/evil", "/usr/evil", "/etc/evil")
    assert hashlib.sha256(host_file("/etc/passwd")).hexdigest() == passwd
    assert socket.gethostname() != "owned"
    await contained()


async def test_filling_the_scratch_space_hits_its_quota() -> None:
    code = (
        "import os\n"
        "written = 0\n"
        "chunk = b'x' * (4 * 1024 * 1024)\n"
        "try:\n"
        "    for i in range(1000):\n"
        "        directory = '/tmp' if i % 2 else '/dev/shm'\n"
        "        with open(f'{directory}/fill{i}', 'wb') as f:\n"
        "            f.write(chunk)\n"
        "        written += len(chunk)\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, error.errno)\n"
        "written"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    assert result.stdout.startswith("OSError 28")  # ENOSPC
    assert result.result is not None and int(result.result) <= LIMITS.tmp_bytes
    # A single file stops at the file size limit first.
    result = await attack("open('big', 'wb').write(b'x' * (32 * 1024 * 1024))")
    assert result.exception.startswith("OSError: [Errno 27] File too large")
    await contained()


async def test_a_million_files() -> None:
    code = (
        "import os\n"
        "made = 0\n"
        "try:\n"
        "    for i in range(1_000_000):\n"
        "        open(f'f{i}', 'w').close()\n"
        "        made += 1\n"
        "except OSError as error:\n"
        "    print(type(error).__name__, error.errno)\n"
        "made"
    )
    started = time.monotonic()
    result = await attack(code)
    assert time.monotonic() - started < 10
    assert result.stdout == "OSError 28\n"  # out of inodes, long before a million
    assert result.result is not None and int(result.result) < LIMITS.tmp_inodes
    assert len(result.files) == LIMITS.max_files and result.files_truncated
    await contained()


async def test_links_and_special_files_are_not_returned() -> None:
    code = (
        "import os\n"
        "os.symlink('/etc/passwd', 'passwd')\n"
        "os.symlink('/proc/self/environ', 'environ')\n"
        "os.symlink('/etc', 'etc')\n"
        "os.symlink('/tmp/dangling', 'dangling')\n"
        "os.mkfifo('fifo')\n"
        "try:\n"
        "    os.link('/etc/passwd', 'hardlink')\n"
        "except OSError as error:\n"
        "    print(type(error).__name__)\n"
        "open('plain.txt', 'w').write('ok')\n"
        "os.makedirs('dir')\n"
        "os.symlink('/etc/hostname', 'dir/hostname')"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    assert result.stdout == "OSError\n"  # EXDEV: no hard link across file systems
    assert result.files == {"plain.txt": b"ok"}
    assert not result.files_truncated
    await contained()


async def test_hostile_file_tree_is_collected_safely() -> None:
    code = (
        "import os\n"
        "open(b'not-utf8-\\xff', 'w').write('x')\n"
        "open('plain.txt', 'w').write('ok')\n"
        "os.makedirs('/'.join(['d'] * 100))\n"
        "os.chdir('d')\n"
        "for _ in range(40):\n"  # a path far longer than PATH_MAX
        "    os.mkdir('x' * 200)\n"
        "    os.chdir('x' * 200)\n"
        "open('deep.txt', 'w').write('deep')\n"
        "os.chmod('/work/d', 0)\n"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    assert result.files == {"plain.txt": b"ok"}
    assert result.files_truncated  # the depth cap left the deepest files out
    await contained()


async def test_huge_output_is_capped_without_buffering_it() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = await attack(
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1024 * 1024)"
    )
    assert time.monotonic() - started < 5
    assert result.termination is Termination.OUTPUT_LIMIT and result.signal == signal.SIGKILL
    assert result.stdout_truncated and result.stdout == "x" * LIMITS.max_output_bytes
    result = await attack("import os\nwhile True:\n    os.write(2, b'e' * 65536)")
    assert result.termination is Termination.OUTPUT_LIMIT
    assert result.stderr_truncated and len(result.stderr) == LIMITS.max_output_bytes
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth_kib < 32 * 1024
    await contained()


async def test_result_channel_cannot_be_flooded() -> None:
    code = (
        "import os\n"
        "for fd in range(3, 10):\n"
        "    try:\n"
        "        os.write(fd, b'[' * 10**6)\n"
        "    except OSError:\n"
        "        pass\n"
        "'x'"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED
    assert result.result is None  # the message is malformed now: no result at all
    assert len(result.exception) <= LIMITS.max_result_chars
    result = await attack("raise ValueError('v' * 50_000)")
    assert len(result.exception) == LIMITS.max_result_chars
    await contained()


# --- The kernel: syscalls, signals, privileges ------------------------------------------


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")
async def test_dangerous_syscalls_are_refused() -> None:
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "calls = {\n"
        "    'ptrace-traceme': (101, 0, 0, 0, 0),\n"
        "    'ptrace-attach-init': (101, 16, 1, 0, 0),\n"
        "    'mount': (165, b'none', b'/work', b'tmpfs', 0),\n"
        "    'umount': (166, b'/proc', 2),\n"
        "    'unshare-user': (272, 0x10000000),\n"
        "    'unshare-net': (272, 0x40000000),\n"
        "    'clone-newuser': (56, 0x10000000 | 17, 0, 0, 0, 0),\n"
        "    'setns': (308, 0, 0),\n"
        "    'pivot_root': (155, b'/tmp', b'/tmp'),\n"
        "    'chroot': (161, b'/tmp'),\n"
        "    'bpf': (321, 0, 0, 0),\n"
        "    'perf_event_open': (298, 0, 0, -1, -1, 0),\n"
        "    'keyctl': (250, 0, 0),\n"
        "    'add_key': (248, b'user', b'k', b'v', 1, -3),\n"
        "    'io_uring_setup': (425, 1, 0),\n"
        "    'userfaultfd': (323, 0),\n"
        "    'process_vm_readv': (310, 1, 0, 0, 0, 0, 0),\n"
        "    'kexec_load': (246, 0, 0, 0, 0),\n"
        "    'init_module': (175, 0, 0, b''),\n"
        "    'reboot': (169, 0xfee1dead, 672274793, 0x4321fedc, 0),\n"
        "    'syslog': (103, 3, 0, 0),\n"
        "    'open_by_handle_at': (304, 0, 0, 0),\n"
        "}\n"
        "for name, (number, *args) in calls.items():\n"
        "    ctypes.set_errno(0)\n"
        "    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]\n"
        "    returned = libc.syscall(ctypes.c_long(number), *args)\n"
        "    print(name, returned, os.strerror(ctypes.get_errno()).replace(' ', '_'))\n"
        "libc.unshare(0x10000000), os.strerror(ctypes.get_errno())"
    )
    result = await attack(code)
    assert result.termination is Termination.EXITED, result.stderr
    for line in result.stdout.splitlines():
        name, returned, error = line.split()
        assert (returned, error) == ("-1", "Operation_not_permitted"), line
    assert len(result.stdout.splitlines()) == 22
    assert result.result == "(-1, 'Operation not permitted')"
    await contained()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x32 and int 0x80 are x86_64 ABIs")
async def test_foreign_syscall_abi_kills_the_process() -> None:
    # getpid through the x32 numbering: the filter would not know the number, so it kills.
    code = "import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)\nprint('survived')"
    result = await attack(code)
    assert (result.termination, result.signal) == (Termination.SIGNALED, signal.SIGSYS)
    assert "survived" not in result.stdout
    await contained()


async def test_killing_the_parent_and_everyone() -> None:
    code = (
        "import os, signal\n"
        "print(os.getppid())\n"
        "for pid, sig in ((os.getppid(), 9), (1, 15), (-1, 9), (0, 0)):\n"
        "    try:\n"
        "        os.kill(pid, sig)\n"
        "        print(pid, 'sent')\n"
        "    except OSError as error:\n"
        "        print(pid, type(error).__name__)\n"
        "'survived'"
    )
    result = await attack(code)
    # The sandbox's init ignored the signals, nothing else was in reach, and the launcher
    # was there to report: the run ended normally.
    assert result.termination is Termination.EXITED, result
    assert result.result == "'survived'"
    assert result.stdout.splitlines()[0] == "1"
    assert os.getppid() > 1  # and this test process is still here to check
    # Its own process group is the sandbox's: killing it kills the code, not the launcher.
    result = await attack("import os, signal\nos.kill(0, signal.SIGKILL)")
    assert (result.termination, result.signal) == (Termination.SIGNALED, signal.SIGKILL)
    await contained()


async def test_cannot_trace_or_read_init() -> None:
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(16, 1, 0, 0), os.strerror(ctypes.get_errno()))\n"
        "for path in ('/proc/1/mem', '/proc/1/environ', '/proc/1/root'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read(1))\n"
        "    except OSError as error:\n"
        "        print(path, type(error).__name__)\n"
    )
    result = await attack(code)
    lines = result.stdout.splitlines()
    assert lines[0] == "-1 Operation not permitted"
    assert lines[1:] == [
        "/proc/1/mem FileNotFoundError",  # init is hidden from the code entirely
        "/proc/1/environ FileNotFoundError",
        "/proc/1/root FileNotFoundError",
    ]
    await contained()


async def test_no_privilege_to_escalate() -> None:
    code = (
        "import os, resource\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "for key in ('Uid', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs',\n"
        "            'Seccomp'):\n"
        "    print(key, ' '.join(status[key].split()))\n"
        "for name, action in (\n"
        "    ('setuid', lambda: os.setuid(0)),\n"
        "    ('setgid', lambda: os.setgid(0)),\n"
        "    ('setgroups', lambda: os.setgroups([0])),\n"
        "    ('nproc', lambda: resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))),\n"
        "    ('nice', lambda: os.nice(-5)),\n"
        "    ('chown', lambda: os.chown('/work', 0, 0)),\n"
        "):\n"
        "    try:\n"
        "        action()\n"
        "        print(name, 'ALLOWED')\n"
        "    except (OSError, ValueError) as error:\n"
        "        print(name, type(error).__name__)\n"
        "mounts = [line.split() for line in open('/proc/self/mountinfo')]\n"
        "sorted({m[4] for m in mounts if 'nosuid' not in m[5] and m[4].startswith('/') and\n"
        "        not m[4].startswith('/dev/')})"
    )
    result = await attack(code)
    lines = result.stdout.splitlines()
    assert lines[:8] == [
        "Uid 1000 1000 1000 1000",
        "CapInh 0000000000000000",
        "CapPrm 0000000000000000",
        "CapEff 0000000000000000",
        "CapBnd 0000000000000000",
        "CapAmb 0000000000000000",
        "NoNewPrivs 1",
        "Seccomp 2",
    ]
    assert not any("ALLOWED" in line for line in lines[8:]), lines
    assert result.result == "[]"  # every mount but the device nodes is nosuid
    await contained()
