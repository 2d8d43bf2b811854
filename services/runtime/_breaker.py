"""The circuit breaker every service uses around a dependency, on an injectable clock.

A circuit is CLOSED while its dependency answers. `fail_max` failures in a row open
it: calls fail fast without reaching the dependency. Once `reset` has passed it is
HALF_OPEN: one probe call at a time goes through, and its outcome closes the circuit
or opens it for another `reset`.

Callers ask before a call (`allow`) and report how it ended afterwards
(`record_success`, `record_failure`): that works the same around a unary call and
around a stream whose outcome is known only when it ends. `guard` does both around a
block.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

logger = logging.getLogger(__name__)


class CircuitState(enum.StrEnum):
    """Where a circuit stands; the values are the words logs and status pages use."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpenError(Exception):
    """A call refused by an open circuit; each caller turns it into its own error."""

    def __init__(self, name: str, *, retry_after: timedelta) -> None:
        super().__init__(f"circuit {name!r} is open")
        self.name = name
        self.retry_after = retry_after
        """How long until a call may go through (see `CircuitBreaker.retry_after`)."""


class CircuitBreaker:
    """One dependency's circuit.

    Args:
        name: the dependency, for logs and errors.
        fail_max: failures in a row that open the circuit.
        reset: how long an open circuit fails fast before it lets a probe through.
        probe_timeout: how long a probe that never reports holds the half-open circuit
            (a lost probe must not keep it shut); `reset` when None.
        clock: monotonic seconds (only differences matter); tests pass a fake one.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset: timedelta,
        probe_timeout: timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail_max < 1:
            raise ValueError("fail_max must be at least 1")
        if reset <= timedelta(0):
            raise ValueError("reset must be positive")
        self.name = name
        self.fail_max = fail_max
        self.reset = reset
        self._probe_timeout = (probe_timeout or reset).total_seconds()
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None

    @property
    def state(self) -> CircuitState:
        """CLOSED, OPEN, or HALF_OPEN once an open circuit's `reset` has passed."""
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._until_reset() > 0:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    @property
    def is_closed(self) -> bool:
        """Whether calls go freely (neither open nor half-open)."""
        return self._opened_at is None

    def allow(self) -> bool:
        """Whether a call may go now; when half-open, the call that gets True is the probe
        (until it reports, or `probe_timeout` passes, no other call goes)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        now = self._clock()
        if self._probe_started is not None and now - self._probe_started < self._probe_timeout:
            return False
        self._probe_started = now
        return True

    def retry_after(self) -> timedelta:
        """How long until a call may go: the rest of the reset, else a probe's longest run
        (zero while closed)."""
        if self._opened_at is None:
            return timedelta(0)
        wait = self._until_reset()
        return timedelta(seconds=wait if wait > 0 else self._probe_timeout)

    def record_success(self) -> None:
        """A call got an answer: the count of failures starts again; a probe's success
        closes the circuit. (Reported while open, before the reset, it changes nothing: a
        call that began before the circuit opened proves little.)"""
        self._probe_started = None
        state = self.state
        if state is CircuitState.OPEN:
            return
        if state is CircuitState.HALF_OPEN:
            logger.info("circuit closed", extra={"circuit": self.name})
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        """A call failed because the dependency could not answer: `fail_max` in a row
        open the circuit, and a failed probe opens it again for another `reset`."""
        self._probe_started = None
        state = self.state
        if state is CircuitState.OPEN:
            return
        if state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures < self.fail_max:
                return
        self._failures = 0
        self._opened_at = self._clock()
        logger.warning("circuit open", extra={"circuit": self.name})

    @contextlib.contextmanager
    def guard(
        self,
        *,
        failures: type[BaseException] | tuple[type[BaseException], ...],
        answers: type[BaseException] | tuple[type[BaseException], ...] = (),
    ) -> Iterator[None]:
        """Wraps one call: refuses it while the circuit does not allow it, then reports
        how it ended. An exception of the `failures` types is a failure; a normal end,
        or an exception of the `answers` types (the dependency answered, if only to
        refuse), a success; anything else (a cancellation, the caller's own deadline)
        says nothing of the dependency and is not reported.

        Raises:
            CircuitOpenError: without running the call.
        """
        if not self.allow():
            raise CircuitOpenError(self.name, retry_after=self.retry_after())
        probe = self._probe_started
        try:
            yield
        except failures:
            self.record_failure()
            raise
        except answers:
            self.record_success()
            raise
        except BaseException:
            if probe is not None and self._probe_started == probe:
                self._probe_started = None  # the probe's place is free again
            raise
        self.record_success()

    def _until_reset(self) -> float:
        assert self._opened_at is not None
        return self._opened_at + self.reset.total_seconds() - self._clock()
