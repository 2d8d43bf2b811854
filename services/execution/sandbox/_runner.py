"""Runs inside the sandbox: reads the code, runs it as `__main__`, reports how it ended.

The launcher executes it as `python -I -B -X utf8 runner.py CODE_FD RESULT_FD MAX_CHARS`,
standard library only. It writes one byte to RESULT_FD once the interpreter is up, reads
the code from CODE_FD to its end, runs all of it but a final expression statement,
evaluates that, and writes `{"result": repr or null, "exception": "Type: message"}` as JSON
to RESULT_FD, each string cut to MAX_CHARS.

The user's code shares this process, so it could write to RESULT_FD as well: the channel
is not a trust boundary. The service reads it capped and strictly and takes nothing from it
but these two strings, which the code could set to anything by legitimate means (a final
expression, a `raise`). How the run ended (exit status, signal, limits) comes from the
kernel, through the launcher, never from here. The channel is a separate descriptor, not a
marker in stdout, so that printing cannot fake it and output caps cannot cut it.
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import sys
import traceback
import types

FILENAME = "<code>"
READY = b"+"  # the launcher's RUNNER_READY: this script cannot import the launcher


def main() -> None:
    code_fd, result_fd, max_chars = (int(arg) for arg in sys.argv[1:4])
    os.set_inheritable(result_fd, False)
    os.write(result_fd, READY)
    with open(code_fd, "rb") as stream:
        source = stream.read().decode()
    sys.argv = [FILENAME]
    sys.path.insert(0, os.getcwd())
    exit_request = None
    status = 0
    try:
        result = _execute(source)
        outcome = {"result": None if result is None else _cut(result, max_chars), "exception": ""}
    except SystemExit as exc:
        outcome = {"result": None, "exception": ""}
        exit_request = exc
    except BaseException as exc:
        _print_traceback(exc)
        outcome = {"result": None, "exception": _cut(_describe(exc), max_chars)}
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the code may have closed or replaced it
            pass
    _write_all(result_fd, json.dumps(outcome).encode())
    if exit_request is not None:
        raise exit_request
    sys.exit(status)


def _execute(source: str) -> str | None:
    """Runs `source` in a fresh `__main__`; repr() of its final expression, if it has one."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    linecache.cache[FILENAME] = (len(source), None, source.splitlines(True), FILENAME)
    tree = ast.parse(source, FILENAME)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, FILENAME, "exec"), module.__dict__)
    if last is None:
        return None
    value = eval(compile(ast.Expression(last.value), FILENAME, "eval"), module.__dict__)
    return repr(value)


def _print_traceback(exc: BaseException) -> None:
    """The traceback as Python prints it, without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != FILENAME:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    main()
