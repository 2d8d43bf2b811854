"""Injectable monotonic clocks (the real one, and a fake one that tests move by hand),
and the durations callers are told, read from them."""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta
from typing import Protocol

logger = logging.getLogger(__name__)


class Clock(Protocol):
    """A monotonic clock in seconds. Only differences between readings mean anything."""

    def now(self) -> float: ...


class MonotonicClock:
    """`time.monotonic()`: the clock asyncio's event loop and gRPC deadlines use."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to, for deterministic tests."""

    def __init__(self, *, start: float = 1_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Moves the clock forward by `seconds` (never backwards) and returns the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        self._now += seconds
        return self._now


def duration(seconds: float) -> timedelta:
    """A timedelta never shorter than `seconds` (rounded up to the microsecond); zero for
    none, `timedelta.max` for an endless one."""
    if seconds <= 0:
        return timedelta(0)
    if not math.isfinite(seconds):
        return timedelta.max
    return timedelta(microseconds=math.ceil(seconds * 1_000_000))
