"""Tool requests in user messages.

The demo models are extractive: they quote passages and never ask for a tool. Until a
model that emits tool calls is served, the chat service stands in for it with two
explicit forms, and runs what they ask through the execution service exactly as it
would run a model's request:

- `/tool NAME {"json": "arguments"}`: a tool registered in the execution service;
  the arguments (a JSON object) are optional.
- `/code` followed by Python on the next lines, or a message holding a ```python fenced
  block: the sandboxed `run_code` tool (the session needs `code_enabled`).

Anything else is an ordinary question.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from switchboard.chat.v1 import chat_pb2 as pb

from services.runtime import FieldViolation, PermissionDenied, invalid

logger = logging.getLogger(__name__)

RUN_CODE = "run_code"
_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ToolRequest:
    tool: str
    arguments: dict[str, object] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return str(self.arguments.get("code", ""))


def _bad(description: str) -> Exception:
    return invalid([FieldViolation("message.text", description)], what="UserMessage")


def parse_tool_request(text: str) -> ToolRequest | None:
    """The tool call a message asks for, or None for an ordinary question.

    Raises:
        InvalidArgument: a `/tool` or `/code` command that is malformed.
    """
    stripped = text.strip()
    if stripped.startswith("/code"):
        code = stripped.removeprefix("/code").strip("\n")
        if not code.strip():
            raise _bad("/code needs Python on the following lines")
        return ToolRequest(RUN_CODE, {"code": code})
    if stripped.startswith("/tool"):
        rest = stripped.removeprefix("/tool").strip()
        name, _, raw = rest.partition(" ")
        if not _NAME.fullmatch(name):
            raise _bad('usage: /tool NAME {"json": "arguments"}')
        arguments: object = {}
        if raw.strip():
            try:
                arguments = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _bad(f"the arguments are not JSON: {exc.msg}") from None
        if not isinstance(arguments, dict):
            raise _bad("the arguments must be a JSON object")
        return ToolRequest(name, arguments)
    if match := _FENCE.search(text):
        return ToolRequest(RUN_CODE, {"code": match.group(1)})
    return None


def check_allowed(request: ToolRequest, settings: pb.SessionSettings) -> None:
    """Raises PermissionDenied `TOOL_NOT_ALLOWED` unless the session allows the call."""
    if request.tool == RUN_CODE:
        allowed = settings.code_enabled
    else:
        allowed = request.tool in settings.allowed_tools
    if not allowed:
        how = "code_enabled" if request.tool == RUN_CODE else "allowed_tools"
        raise PermissionDenied(
            f"this session does not allow {request.tool!r} (see settings.{how})",
            reason="TOOL_NOT_ALLOWED",
            metadata={"tool": request.tool},
        )
