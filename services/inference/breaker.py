"""A per-backend circuit breaker (pybreaker) usable around asyncio calls and streams."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import pybreaker

logger = logging.getLogger(__name__)


class _Failure(Exception):
    """Stands for a failed call when the outcome is reported to pybreaker."""


def _fail() -> None:
    raise _Failure


def _succeed() -> None:
    return None


class BackendBreaker:
    """Counts failures of one backend; open after `fail_max` in a row, probe after `reset`.

    pybreaker wraps synchronous callables; asyncio calls (and streams that outlive one
    `await`) report their outcome afterwards with `record_success` / `record_failure`.
    While half-open, one probe at a time is let through.
    """

    def __init__(self, name: str, *, fail_max: int = 3, reset: timedelta = timedelta(seconds=5)):
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset.total_seconds(),
            name=name,
            throw_new_error_on_trip=False,
        )
        self._probe_started: float | None = None
        self._reset = reset.total_seconds()

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open` (open turns half-open once `reset` has passed)."""
        state = self._breaker.current_state
        if state == pybreaker.STATE_OPEN and self._reset_elapsed():
            return pybreaker.STATE_HALF_OPEN
        return state

    def _reset_elapsed(self) -> bool:
        opened = self._breaker._state_storage.opened_at  # noqa: SLF001 - pybreaker's clock
        return opened is None or datetime.now(opened.tzinfo) >= opened + timedelta(
            seconds=self._breaker.reset_timeout
        )

    def allow(self) -> bool:
        """Whether a call may go to this backend now (claims the probe when half-open)."""
        state = self.state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            return False
        now = time.monotonic()
        if self._probe_started is not None and now - self._probe_started < self._reset:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        self._probe_started = None
        try:
            self._breaker.call(_succeed)
        except pybreaker.CircuitBreakerError:
            pass

    def record_failure(self) -> None:
        self._probe_started = None
        try:
            self._breaker.call(_fail)
        except (_Failure, pybreaker.CircuitBreakerError):
            pass
        if self._breaker.current_state == pybreaker.STATE_OPEN:
            logger.warning("circuit open", extra={"backend": self._breaker.name})
