"""Server-sent events as OpenAI streams them: `data: <json>` events, `: ...` comments
(which clients ignore: Switchboard's queue positions), and `data: [DONE]` at the end."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def event(data: Mapping[str, Any]) -> bytes:
    """One `data:` event holding `data` as compact JSON (which has no newline)."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def comment(text: str) -> bytes:
    """A comment line; each line of `text` becomes its own comment."""
    return b"".join(f": {line}\n".encode() for line in text.splitlines() or [""]) + b"\n"


def queue_position(position: int) -> bytes:
    """Where a request waiting for admission stands (0 = next)."""
    return comment(f"queue position {position}")
