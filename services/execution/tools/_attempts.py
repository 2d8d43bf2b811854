"""How one attempt of a tool call ends, as the HTTP and gRPC clients tell the executor.

An attempt returns the call's result, raises `Retryable` (the tool could not answer:
another attempt may succeed, and the failure counts against the tool's circuit),
raises `TimeoutError` (the attempt's time limit passed), or raises a SwitchboardError
(the tool answered, if only to refuse: final).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Attempt = Callable[[float], Awaitable[dict[str, Any]]]
"""One attempt of a prepared call, given its time limit in seconds."""


class Retryable(Exception):
    """The tool could not answer this attempt; another attempt may succeed."""

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after
        """Seconds the tool asked to wait (Retry-After, RetryInfo), if it said."""
