"""Heartbeats of running steps: their work message kept in progress, their lease renewed.

A worker runs a chain of steps under its first step's message (see `worker_loop`), so
a heartbeat belongs to the chain, not to one step: its schedule goes on from step to
step, and a chain of short steps that outlasts the ack wait is beaten all the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)


class InProgress(Protocol):
    """What a heartbeat needs of a work message (nats-py's `Msg` has it)."""

    async def in_progress(self) -> None: ...


M = TypeVar("M", bound=InProgress)


class Beat(Generic[M]):
    """A chain's heartbeat state: its message, the step running now, when to beat next."""

    __slots__ = ("due", "expired", "msg", "step", "task_id")

    def __init__(self, *, task_id: str, step: str, msg: M, due: float) -> None:
        self.task_id = task_id
        self.step = step
        self.msg = msg
        self.due = due
        self.expired = False

    def expire(self, run: asyncio.Task[Any]) -> None:
        """Ends the step's run for running past its timeout."""
        self.expired = True
        run.cancel()


class Heartbeats(Generic[M]):
    """One loop for every running step: each one that has run a third of the lease
    since its chain's last beat tells JetStream it is in progress and renews its lease;
    a step whose lease cannot be renewed (its task ended) is cancelled.

    Args:
        lease: the work messages' ack wait, which is also the steps' lease.
        renew: renews a step's lease (task id, step name); False once the task ended.
        clock: monotonic seconds; tests pass a fake one and call `beat_due`.
        sleep: waits between rounds.
    """

    def __init__(
        self,
        *,
        lease: timedelta,
        renew: Callable[[str, str], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.every = lease.total_seconds() / 3
        """Seconds between a chain's beats."""
        self._renew = renew
        self._clock = clock
        self._sleep = sleep
        self._beats: dict[asyncio.Task[Any], Beat[M]] = {}

    def chain(self, *, task_id: str, step: str, msg: M) -> Beat[M]:
        """The beat of a chain starting now with `step`; its first beat is due in `every`."""
        return Beat(task_id=task_id, step=step, msg=msg, due=self._clock() + self.every)

    def track(self, run: asyncio.Task[Any], beat: Beat[M]) -> None:
        """Beats `beat` while `run` (its chain's current step) runs."""
        self._beats[run] = beat

    def untrack(self, run: asyncio.Task[Any]) -> None:
        del self._beats[run]

    async def run(self) -> None:
        """Beats whatever is due, four times per interval, until cancelled."""
        while True:
            await self._sleep(self.every / 4)
            await self.beat_due()

    async def beat_due(self) -> None:
        """One round: beats every tracked step whose chain is due."""
        now = self._clock()
        due = [(run, beat) for run, beat in self._beats.items() if beat.due <= now]
        for _, beat in due:
            beat.due = now + self.every
        await asyncio.gather(*(self._beat(run, beat) for run, beat in due))

    async def _beat(self, run: asyncio.Task[Any], beat: Beat[M]) -> None:
        try:
            await beat.msg.in_progress()
            if not await self._renew(beat.task_id, beat.step):
                run.cancel()  # the task ended (cancelled) while this step ran
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            logger.warning("cannot renew step %s of %s: %s", beat.step, beat.task_id, exc)
