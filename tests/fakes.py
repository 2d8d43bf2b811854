"""Fakes for time in tests of pure logic: a clock the test moves, a sleep that waits for
nothing."""

from __future__ import annotations


class Clock:
    """Monotonic seconds that move only when the test says (callable, as the runtime's
    breaker and retry policy take a clock)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeps:
    """An injected sleep that records each wait instead of waiting, and moves `clock`
    (when given) by it."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.delays: list[float] = []
        self._clock = clock

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self._clock is not None:
            self._clock.advance(seconds)
