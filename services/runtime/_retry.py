"""Retries with full-jitter exponential backoff, the one policy every retry follows.

The wait after attempt n is drawn uniformly from [0, min(max_backoff, backoff * 2**(n-1))]
("full jitter": many clients failing together spread their retries instead of coming
back in step). A dependency's own hint (Retry-After, RetryInfo) replaces the draw,
capped at `max_backoff` too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

_JITTER = random.Random()
"""The jitter of calls that bring no generator of their own: seeding one costs a read of
the OS's entropy, too much for every call on a hot path."""


class RetriesExhausted(Exception):
    """Every attempt failed, or no attempt or no time was left for another.

    Attributes:
        attempts: how many attempts ran.
        last: the last attempt's error.
    """

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(f"failed after {attempts} attempt(s): {last}")
        self.attempts = attempts
        self.last = last


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often to try, and how long to wait between attempts."""

    max_attempts: int = 3
    backoff: timedelta = timedelta(milliseconds=200)
    """Base of the backoff: the wait after attempt n is at most backoff * 2**(n-1)."""
    max_backoff: timedelta = timedelta(seconds=5)
    """Longest wait between attempts, a dependency's own hint included."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if not timedelta(0) <= self.backoff <= self.max_backoff:
            raise ValueError("backoff must be within 0..max_backoff")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after `attempt` (from 1), in seconds."""
        return min(
            self.max_backoff.total_seconds(), self.backoff.total_seconds() * 2 ** (attempt - 1)
        )

    def delay(self, attempt: int, *, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after the failed `attempt`: the dependency's `retry_after` when
        it gave one, else a draw in [0, ceiling(attempt)]; either at most max_backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff.total_seconds())
        return rng.uniform(0, self.ceiling(attempt))

    async def call(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        retry_on: type[E] | tuple[type[E], ...],
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        deadline: float | None = None,
        retry_after: Callable[[E], float | None] = lambda _: None,
        give_up: Callable[[E], bool] = lambda _: False,
    ) -> T:
        """Runs `attempt(1)`, `attempt(2)`, ... until one returns, waiting `delay` between.

        Args:
            attempt: one attempt, given its number.
            retry_on: the errors another attempt may cure; any other propagates at once.
            rng: draws the jitter (tests pass a seeded one); a shared one by default.
            sleep: waits between attempts.
            clock: the clock of `deadline` (seconds).
            deadline: no attempt starts a wait that would end at or past it.
            retry_after: the wait a failure asked for, if it did.
            give_up: whether a failure ends the retries at once (a circuit that opened).

        Raises:
            RetriesExhausted: the last failure, once no attempt or no time is left.
        """
        number = 1
        while True:
            try:
                return await attempt(number)
            except retry_on as error:
                failure = error
            if number >= self.max_attempts or give_up(failure):
                raise RetriesExhausted(number, failure) from failure
            wait = self.delay(number, rng=rng or _JITTER, retry_after=retry_after(failure))
            if deadline is not None and clock() + wait >= deadline:
                raise RetriesExhausted(number, failure) from failure
            await sleep(wait)
            number += 1
