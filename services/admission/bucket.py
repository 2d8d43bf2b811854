"""A token bucket with lazy refill, driven by an explicit clock reading."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

# Refills add `elapsed * rate` in floating point, so a level that should be exactly n can
# come out a few ulps short. Comparisons allow this much slack, relative to the burst.
_SLACK = 1e-9


class TokenBucket:
    """Holds up to `burst` tokens, refilled continuously at `rate_per_s`.

    The level is brought up to date only when the bucket is read (lazy refill), from the
    `now` the caller passes: every method takes the current reading of the caller's
    clock, which must never go backwards. The level may go below zero when usage
    reported after the fact exceeds what was charged (`credit` with a negative amount);
    the debt is repaid by refill before anything else is taken.

    A bucket may start *warming*: refilled at a higher rate until a given time, then at
    its own (the admission handover's warm-up).
    """

    __slots__ = ("_rate", "_burst", "_level", "_updated", "_slack", "_base_rate", "_warm_until")

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: float,
        now: float,
        level: float | None = None,
        warming: tuple[float, float] | None = None,
    ) -> None:
        """
        Args:
            level: the level now (capped at the burst); None: full.
            warming: (rate, until): refill at this rate (never below `rate_per_s`)
                until that clock reading, then at `rate_per_s`.
        """
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be positive and finite, not {rate_per_s}")
        if not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"burst must be positive and finite, not {burst}")
        self._base_rate = self._rate = float(rate_per_s)
        self._warm_until = -math.inf
        if warming is not None and warming[1] > now:
            self._rate, self._warm_until = max(self._rate, float(warming[0])), warming[1]
        self._burst = float(burst)
        self._level = self._burst if level is None else min(float(level), self._burst)
        self._updated = now
        self._slack = _SLACK * max(1.0, self._burst)

    @property
    def rate_per_s(self) -> float:
        """The rate it refills at once any warm-up is over."""
        return self._base_rate

    @property
    def burst(self) -> float:
        return self._burst

    def _refill(self, now: float) -> float:
        if now > self._updated:
            if now > self._warm_until >= self._updated:
                self._refill(self._warm_until)
                self._rate, self._warm_until = self._base_rate, -math.inf
            self._level = min(self._burst, self._level + (now - self._updated) * self._rate)
            self._updated = now
        return self._level

    def _seconds_for(self, deficit: float, now: float) -> float:
        """Seconds for refill to add `deficit` from `now` (warm-up rate first)."""
        warm = (self._warm_until - now) * self._rate if self._warm_until > now else 0.0
        if deficit <= warm:
            return deficit / self._rate
        return max(self._warm_until - now, 0.0) + (deficit - warm) / self._base_rate

    def available(self, now: float) -> float:
        """Tokens that could be taken now (negative while a debt is being repaid)."""
        return self._refill(now)

    def is_full(self, now: float) -> bool:
        return self._refill(now) >= self._burst

    def can_take(self, n: float, now: float) -> bool:
        return self._refill(now) + self._slack >= n

    def try_take(self, n: float, now: float) -> bool:
        """Takes `n` tokens if they are all there; takes nothing otherwise."""
        if self._refill(now) + self._slack >= n:
            self._level -= n
            return True
        return False

    def take(self, n: float, now: float) -> None:
        """Takes `n` tokens unconditionally (after `can_take` said yes)."""
        self._refill(now)
        self._level -= n

    def time_until(self, n: float, now: float) -> float:
        """Seconds until `n` tokens can be taken at once, if nothing else is taken meanwhile.

        Zero if they are there now; infinite if `n` exceeds the burst (it never will be).
        """
        if n > self._burst + self._slack:
            return math.inf
        deficit = n - self._refill(now)
        return 0.0 if deficit <= self._slack else self._seconds_for(deficit, now)

    def time_to_accrue(self, n: float, now: float) -> float:
        """Seconds until `n` tokens in all will have been available to a steady taker.

        For a queue of requests that take, one after the other, `n` tokens between them
        as the tokens arrive (each within the burst): the burst does not cap what
        accrues while it is being consumed, so this is finite for any `n`.
        """
        deficit = n - self._refill(now)
        return 0.0 if deficit <= self._slack else self._seconds_for(deficit, now)

    def credit(self, n: float, now: float) -> None:
        """Gives back `n` tokens (capped at the burst); a negative `n` charges more.

        A negative credit may take the level below zero: usage that exceeded its charge
        is repaid before anything else can be taken.
        """
        self._level = min(self._burst, self._refill(now) + n)

    def reconfigure(self, *, rate_per_s: float, burst: float, now: float) -> None:
        """Applies a new rate and burst, keeping what is in the bucket (capped at the burst).

        Raising the burst does not fill the bucket: the extra capacity accrues at the new
        rate, so a policy change can never hand out a free burst. It ends a warm-up.
        """
        self._refill(now)
        replacement = TokenBucket(rate_per_s=rate_per_s, burst=burst, now=now, level=self._level)
        self._rate, self._burst = replacement._rate, replacement._burst
        self._base_rate, self._warm_until = replacement._base_rate, replacement._warm_until
        self._level, self._slack = replacement._level, replacement._slack

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate_per_s={self._base_rate}, burst={self._burst}, "
            f"level={self._level:.3f} at {self._updated:.3f})"
        )
