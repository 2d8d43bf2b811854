"""The asyncio side of admission: callers wait for their tickets here, and one loop pumps
the controller when a bucket refills, a waiter's time runs out or a lease expires."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from services.admission.controller import AdmissionController
from services.admission.request import AdmissionRequest
from services.admission.tickets import Admission, Ticket

logger = logging.getLogger(__name__)

COLLECT_IDLE_S = 60.0
"""How often idle tenants' state is forgotten."""


class Dispatcher:
    """Runs an `AdmissionController` on the event loop.

    `run()` grants waiting requests as soon as they may run; `admit` and `wait` park
    callers on their tickets. Everything runs on one asyncio thread.
    """

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        controller.on_change(self._wake.set)
        self._draining = False
        self._on_drain: set[Callable[[], None]] = set()

    @property
    def controller(self) -> AdmissionController:
        return self._controller

    async def admit(self, request: AdmissionRequest) -> Admission:
        """`AdmissionController.submit`, then wait until admitted (same errors).

        Cancelling the caller leaves the queue at once (or gives back a lease granted in
        the meantime).
        """
        admission = await self.wait(self._controller.submit(request))
        assert admission is not None
        return admission

    async def wait(self, ticket: Ticket, *, timeout: float | None = None) -> Admission | None:
        """Waits for a ticket's outcome; None if `timeout` (seconds) passes first.

        A timeout leaves the ticket waiting (AdmitStream sends a position update and
        waits again); cancellation abandons it.

        Raises:
            ResourceExhausted: its max_wait ran out (RetryInfo says when to retry).
            Cancelled: it was cancelled.
            Unavailable: the controller shut down.
        """
        if ticket.waiting:
            try:
                done, _ = await asyncio.wait((ticket.decided(),), timeout=timeout)
            except asyncio.CancelledError:
                self._controller.abandon(ticket)
                raise
            if not done:
                return None
        return ticket.result()

    async def run(self, *, max_tick: timedelta = timedelta(milliseconds=250)) -> None:
        """Grants waiting requests as soon as they may run; returns after `shutdown`.

        Sleeps until the controller's `next_wakeup` (at most `max_tick` while requests
        wait) or until it reports a change.
        """
        controller = self._controller
        clock = controller.clock
        tick = max_tick.total_seconds()
        collected_at = clock.now()
        while not controller.closed:
            self._wake.clear()
            try:
                controller.pump()
            except Exception:  # a bug; keep serving rather than strand every waiter
                logger.exception("admission dispatcher tick failed")
            now = clock.now()
            due = controller.next_wakeup()
            delay = None if due is None else max(due - now, 0.001)
            if controller.waiting():
                delay = tick if delay is None else min(delay, tick)
            if now - collected_at > COLLECT_IDLE_S:
                controller.collect_idle()
                collected_at = now
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def on_drain(self, end: Callable[[], None]) -> Callable[[], None]:
        """Calls `end` when the replica starts draining (at once if it has); returns
        what forgets it."""
        if self._draining:
            end()
            return lambda: None
        self._on_drain.add(end)
        return lambda: self._on_drain.discard(end)

    def drain(self) -> None:
        """The replica stops soon: the long-lived streams (AdmitSession) end now, so
        that their callers take their next attempts to a live replica rather than wait
        here through the server's grace. Calls that decide one request (Admit,
        AdmitStream) are decided here as before, until `shutdown`."""
        self._draining = True
        for end in list(self._on_drain):
            end()
        self._on_drain.clear()

    async def shutdown(self) -> None:
        """Refuses everyone waiting (UNAVAILABLE `SHUTTING_DOWN`) and stops `run`.

        Idempotent. Leases stay valid until released or expired.
        """
        self._controller.close()
        self._wake.set()

    async def __aenter__(self) -> Dispatcher:
        self._runner = asyncio.create_task(self.run(), name="admission-dispatcher")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
        if self._runner is not None:
            await self._runner
