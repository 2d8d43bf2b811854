"""The sandbox behind RunCode, run for real: what ordinary code gets (output, result,
files, limits), and that no process outlives its run. (Checks that start no sandbox are
in tests/unit/test_sandbox.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from services.execution.sandbox import (
    RunRequest,
    RunResult,
    SandboxLimits,
    SandboxPool,
    Termination,
    run,
)
from services.execution.sandbox import _launcher as sandbox_launcher
from tests.polling import eventually

LIMITS = SandboxLimits(timeout=timedelta(seconds=5))
LAUNCHER = str(Path(sandbox_launcher.__file__))


def sandbox_processes() -> list[int]:
    """PIDs of the sandboxes this test process started: its children running the
    sandbox launcher, and their descendants. (Other children, such as a mesh an
    integration test started in the same session, and their own sandboxes, are not
    counted.)"""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
        except (ValueError, OSError):  # not a process, or gone meanwhile
            continue
    generation = [
        pid for pid, parent in parents.items() if parent == os.getpid() and _runs_the_launcher(pid)
    ]
    found = list(generation)
    while generation:
        generation = [pid for pid, parent in parents.items() if parent in generation]
        found += generation
    return found


def _runs_the_launcher(pid: int) -> bool:
    try:
        return LAUNCHER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return False


async def sandbox_running() -> None:
    """Returns once a sandbox's launcher, init and runner all run."""
    await eventually(lambda: len(sandbox_processes()) >= 3, timeout=10, what="a sandbox runs")


async def code_sleeping() -> None:
    """Returns once a sandbox's code is in a sleep (`time.sleep`): whatever it did
    before its sleep is done."""

    def sleeping() -> bool:
        for pid in sandbox_processes():
            try:
                if "nanosleep" in Path(f"/proc/{pid}/wchan").read_text():
                    return True
            except OSError:  # gone meanwhile
                continue
        return False

    await eventually(sleeping, timeout=10, what="a sandbox's code sleeps")


async def run_ok(code: str, *, stdin: str = "", files: dict[str, bytes] | None = None) -> RunResult:
    """Runs code that must exit normally."""
    result = await run(RunRequest(code=code, stdin=stdin, files=files or {}), LIMITS)
    assert result.termination is Termination.EXITED, result
    assert result.exit_code == 0, result.stderr
    return result


async def test_stdout_stderr_and_final_expression() -> None:
    result = await run_ok("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert (result.stdout, result.stderr, result.result) == ("out\n", "err\n", "42")
    assert result.exception == ""
    assert not result.stdout_truncated and not result.stderr_truncated


async def test_result_only_for_a_final_expression() -> None:
    assert (await run_ok("x = 1")).result is None
    assert (await run_ok("x = 1\nx + 1")).result == "2"
    assert (await run_ok("print('a')")).result == "None"  # print(...) is an expression
    assert (await run_ok("")).result is None


async def test_result_is_repr_and_capped() -> None:
    assert (await run_ok("'a\\nb'")).result == "'a\\nb'"
    limits = SandboxLimits(max_result_chars=100)
    result = await run(RunRequest(code="'x' * 10_000"), limits)
    assert result.result is not None
    assert len(result.result) == 100 and result.result.endswith("...")


async def test_stdin_is_the_code_standard_input() -> None:
    result = await run_ok("import sys\nsys.stdin.read().upper()", stdin="hello\nworld\n")
    assert result.result == "'HELLO\\nWORLD\\n'"
    # Code that never reads a large stdin still ends normally.
    assert (await run_ok("1", stdin="x" * 1_000_000)).result == "1"


async def test_input_files_are_readable_and_only_new_or_changed_files_return() -> None:
    result = await run_ok(
        "import os\n"
        "data = open('data/in.csv').read()\n"
        "open('data/out.csv', 'w').write(data.upper())\n"
        "open('changed.txt', 'a').write('+')\n"
        "os.makedirs('deep/er')\n"
        "open('deep/er/x.bin', 'wb').write(bytes(range(256)))\n"
        "open('/tmp/scratch', 'w').write('not returned')\n"
        "sorted(os.listdir('.'))",
        files={"data/in.csv": b"a,b\n", "changed.txt": b"v1", "same.txt": b"unchanged"},
    )
    assert result.result == "['changed.txt', 'data', 'deep', 'same.txt']"
    assert result.files == {
        "changed.txt": b"v1+",
        "data/out.csv": b"A,B\n",
        "deep/er/x.bin": bytes(range(256)),
    }
    assert not result.files_truncated


async def test_returned_files_are_capped() -> None:
    limits = SandboxLimits(max_files=3, max_files_bytes=1000)
    code = (
        "for i in range(5): open(f'f{i}', 'w').write('x' * 100)\nopen('big', 'w').write('x' * 2000)"
    )
    result = await run(RunRequest(code=code), limits)
    assert sorted(result.files) == ["f0", "f1", "f2"]
    assert result.files_truncated


async def test_code_can_import_its_own_files_without_leaving_bytecode() -> None:
    result = await run_ok(
        "import helper\nhelper.value()", files={"helper.py": b"def value(): return 7"}
    )
    assert result.result == "7"
    assert result.files == {}


async def test_syntax_error_is_a_result() -> None:
    result = await run(RunRequest(code="print('never'\nx = "), LIMITS)
    assert result.termination is Termination.EXITED and result.exit_code == 1
    assert result.exception.startswith("SyntaxError: ")
    assert "SyntaxError" in result.stderr and 'File "<code>", line 1' in result.stderr
    assert result.stdout == "" and result.result is None


async def test_uncaught_exception_is_a_result_with_the_code_own_traceback() -> None:
    code = "print('before')\ndef f():\n    raise ValueError('boom')\nf()\n'unreached'"
    result = await run(RunRequest(code=code), LIMITS)
    assert result.termination is Termination.EXITED and result.exit_code == 1
    assert result.exception == "ValueError: boom"
    assert result.stdout == "before\n" and result.result is None
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert "raise ValueError('boom')" in result.stderr  # source lines are shown
    assert "runner" not in result.stderr  # the sandbox's own frames are not


async def test_exit_status_and_sys_exit() -> None:
    result = await run(RunRequest(code="import sys\nprint('x')\nsys.exit(3)"), LIMITS)
    assert (result.termination, result.exit_code, result.exception) == (Termination.EXITED, 3, "")
    assert result.stdout == "x\n"
    result = await run(RunRequest(code="import os\nos._exit(5)"), LIMITS)
    assert (result.termination, result.exit_code) == (Termination.EXITED, 5)


async def test_output_is_decoded_leniently() -> None:
    result = await run_ok("import sys\nsys.stdout.buffer.write(b'ok \\xff\\n')\nprint('é')")
    assert result.stdout == "ok \ufffd\né\n"


async def test_resource_usage_is_reported() -> None:
    code = (
        "import time\n"
        "block = bytearray(64 * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass"
    )
    usage = (await run_ok(code)).usage
    assert usage.cpu_time >= timedelta(seconds=0.3)
    assert usage.cpu_time == usage.user_cpu_time + usage.system_cpu_time
    assert usage.wall_time >= timedelta(seconds=0.2)
    assert usage.max_memory_bytes >= 64 * 1024 * 1024


async def test_wall_clock_timeout_is_capped_by_the_limits() -> None:
    limits = SandboxLimits(timeout=timedelta(seconds=5), max_timeout=timedelta(seconds=1))
    result = await run(
        RunRequest(code="import time\ntime.sleep(30)", timeout=timedelta(hours=1)), limits
    )
    assert result.termination is Termination.TIMEOUT and result.signal == signal.SIGKILL
    assert timedelta(seconds=1) <= result.usage.wall_time < timedelta(seconds=3)


async def test_cpu_limit() -> None:
    limits = SandboxLimits(cpu_time=timedelta(seconds=1), timeout=timedelta(seconds=10))
    result = await run(RunRequest(code="while True: pass"), limits)
    assert result.termination is Termination.CPU_LIMIT
    assert result.signal == signal.SIGXCPU
    assert result.usage.cpu_time >= timedelta(seconds=0.9)  # the kernel counts in ticks


async def test_cancelling_a_run_kills_the_sandbox() -> None:
    task = asyncio.create_task(run(RunRequest(code="import time\ntime.sleep(60)"), LIMITS))
    await code_sleeping()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sandbox_processes() == []


async def test_pool_runs_each_request_in_a_fresh_sandbox() -> None:
    async with SandboxPool(limits=LIMITS, size=2) as pool:
        leave_traces = (
            "import os, subprocess\n"
            "open('mine.txt', 'w').write('left behind')\n"
            "open('/tmp/mine', 'w').write('left behind')\n"
            "os.environ['LEFT'] = 'behind'\n"
            "import json; json.LEFT = 'behind'\n"
            "subprocess.Popen(['sleep', '30'])\n"
            "'done'"
        )
        first = await pool.run(RunRequest(code=leave_traces))
        assert first.result == "'done'" and first.files == {"mine.txt": b"left behind"}
        look = (
            "import os, sys, json\n"
            "(os.listdir('.'), os.listdir('/tmp'), os.environ.get('LEFT'),\n"
            " hasattr(json, 'LEFT'), sorted(p for p in os.listdir('/proc') if p.isdigit()))"
        )
        results = await asyncio.gather(*(pool.run(RunRequest(code=look)) for _ in range(4)))
        for result in results:
            assert result.termination is Termination.EXITED, result.stderr
            assert result.result == "([], [], None, False, ['2'])"
        assert (await pool.run(RunRequest(code="6 * 7"))).result == "42"
    assert sandbox_processes() == []
    await pool.close()  # idempotent
    with pytest.raises(RuntimeError):
        await pool.run(RunRequest(code="1"))


async def test_no_process_outlives_its_run() -> None:
    code = (
        "import os, subprocess, time\n"
        "subprocess.Popen(['sleep', '60'])\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)"
    )
    result = await run(RunRequest(code=code), LIMITS)
    assert result.termination is Termination.EXITED
    assert sandbox_processes() == []
