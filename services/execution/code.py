"""RunCode's proto <-> the sandbox's plain types, shared by the RPC and `code` steps."""

from __future__ import annotations

import logging

from switchboard.execution.v1 import execution_pb2 as pb

from services.execution.graph import MAX_CODE_BYTES
from services.execution.sandbox import RunRequest, RunResult, SandboxLimits
from services.runtime import FieldViolation, ResourceExhausted, invalid

logger = logging.getLogger(__name__)

MAX_INPUT_FILES = 32
MAX_INPUT_BYTES = 1024 * 1024
MAX_PATH_PART_BYTES = 255
"""The longest file name Linux takes (NAME_MAX)."""


def _good_path(path: str) -> bool:
    parts = path.split("/")
    return "\0" not in path and all(
        p not in ("", ".", "..") and len(p.encode()) <= MAX_PATH_PART_BYTES for p in parts
    )


def run_request(request: pb.RunCodeRequest, limits: SandboxLimits) -> RunRequest:
    """The sandbox request for a RunCode call whose contract constraints hold (the
    timeout's bounds, the paths' lengths): what they cannot say is checked here.

    Raises:
        ResourceExhausted: `CODE_TOO_LARGE` / `FILES_TOO_LARGE`.
        InvalidArgument: a file path that is absolute, has `.`, `..` or empty parts, a NUL,
            or a part longer than a file name may be.
    """
    if len(request.code.encode()) > MAX_CODE_BYTES:
        raise ResourceExhausted(
            f"code is over {MAX_CODE_BYTES} bytes",
            reason="CODE_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_CODE_BYTES)},
        )
    total = sum(len(f.content) for f in request.files) + len(request.stdin.encode())
    if len(request.files) > MAX_INPUT_FILES or total > MAX_INPUT_BYTES:
        raise ResourceExhausted(
            f"at most {MAX_INPUT_FILES} files and {MAX_INPUT_BYTES} bytes of input",
            reason="FILES_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_INPUT_BYTES)},
        )
    problems = [
        FieldViolation(
            f"files[{i}].path",
            f"a relative path without '.', '..' or empty parts, NUL, or a part over "
            f"{MAX_PATH_PART_BYTES} bytes",
        )
        for i, item in enumerate(request.files)
        if item.path and not _good_path(item.path)
    ]
    if problems:
        raise invalid(problems, what="RunCodeRequest")
    timeout = None
    if request.HasField("timeout"):
        timeout = min(request.timeout.ToTimedelta(), limits.max_timeout)
    return RunRequest(
        code=request.code,
        stdin=request.stdin,
        files={f.path: f.content for f in request.files},
        timeout=timeout,
    )


def run_response(result: RunResult) -> pb.RunCodeResponse:
    response = pb.RunCodeResponse(
        termination=int(result.termination),
        exit_code=result.exit_code,
        signal=result.signal,
        stdout=result.stdout,
        stderr=result.stderr,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
        exception=result.exception,
        files=[pb.SandboxFile(path=p, content=c) for p, c in sorted(result.files.items())],
        files_truncated=result.files_truncated,
    )
    if result.result is not None:
        response.result = result.result
    response.usage.wall_time.FromTimedelta(result.usage.wall_time)
    response.usage.cpu_time.FromTimedelta(result.usage.cpu_time)
    response.usage.max_memory_bytes = result.usage.max_memory_bytes
    return response
