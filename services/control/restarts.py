"""When a replica that exited is started again, and when it has crashed too often.

Pure time arithmetic, on the times of a replica's exits, so it is tested on plain
numbers. The first exit restarts at once (a crashed replica is back within its start-up
time); each further exit within `window` doubles the wait; `limit` exits within
`window` is a crash loop: the replica is given up (FAILED) instead of restarted forever.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.0
    """Seconds before the restart after a first exit (within `window`)."""
    base_delay: float = 0.5
    """Seconds before the restart after a second exit; each further exit doubles it."""
    max_delay: float = 10.0
    window: float = 60.0
    """Exits older than this (seconds) are forgotten."""
    limit: int = 5
    """This many exits within `window` is a crash loop."""

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= 0 or self.base_delay < 0 or self.first_delay < 0:
            raise ValueError("RestartPolicy: limit ≥ 1, window > 0, delays ≥ 0")

    def recent(self, exits: Sequence[float], now: float) -> list[float]:
        """The exits within the window."""
        return [t for t in exits if now - t < self.window]

    def delay(self, exits: Sequence[float], now: float) -> float | None:
        """Seconds to wait before restarting after the last of `exits` (monotonic
        times), or None when they make a crash loop."""
        count = len(self.recent(exits, now))
        if count >= self.limit:
            return None
        if count <= 1:
            return self.first_delay
        return min(self.max_delay, self.base_delay * 2 ** (count - 2))
