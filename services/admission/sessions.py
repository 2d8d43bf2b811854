"""AdmitSession: many admission attempts of one tenant over one stream.

A request admitted at once (the common case) is answered right away, without a task;
one that has to wait gets a task that sends its queue updates and then its outcome.
Replies are tagged with the request's id. A refusal ends that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from switchboard.admission.v1 import admission_pb2 as pb

from services.admission.controller import Admission, AdmissionController, Ticket
from services.runtime import FieldViolation, SwitchboardError, invalid

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_S = 0.25
"""How often a waiting request's position is re-checked (an update is sent if it moved)."""


async def queue_updates(
    controller: AdmissionController, ticket: Ticket
) -> AsyncIterator[pb.QueueStatus]:
    """A waiting ticket's position and estimated wait, on entering the queue and whenever
    they change, until it is decided (its refusal is raised)."""
    last: tuple[int, float] | None = None
    while ticket.waiting:
        status = controller.queue_status(ticket)
        seen = (status.position, round(status.estimated_wait.total_seconds(), 1))
        if seen != last:
            last = seen
            update = pb.QueueStatus(position=status.position)
            update.estimated_wait.FromTimedelta(status.estimated_wait)
            yield update
        await controller.wait(ticket, timeout=UPDATE_INTERVAL_S)


class AdmitSession:
    """The server side of one AdmitSession stream.

    Args:
        controller: decides.
        args_of: the controller's `submit` arguments for a frame's AdmitRequest (raises
            the refusal of an invalid frame).
        reply: hands a reply to the stream's writer (never blocks).
        admitted: the AdmitResponse for an admission.
    """

    def __init__(
        self,
        controller: AdmissionController,
        *,
        args_of: Callable[[pb.AdmitSessionRequest], dict[str, Any]],
        reply: Callable[[pb.AdmitSessionResponse], None],
        admitted: Callable[[Admission], pb.AdmitResponse],
    ) -> None:
        self._controller = controller
        self._args_of = args_of
        self._reply = reply
        self._admitted = admitted
        self._waiting: dict[str, asyncio.Task[None]] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, frame: pb.AdmitSessionRequest) -> None:
        """Decides the frame's request, or starts following it through the queue."""
        request_id = frame.request.context.request_id
        try:
            args = self._args_of(frame)
            if not request_id:  # unique among the tenant's attempts: the controller checks
                field = "request.context.request_id"
                raise invalid([FieldViolation(field, "required: it tags the request's replies")])
            ticket = self._controller.submit(**args)
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
            return
        if ticket.waiting:
            self._waiting[request_id] = asyncio.create_task(self._follow(request_id, ticket))
        else:
            self._send(request_id, ticket)

    async def _follow(self, request_id: str, ticket: Ticket) -> None:
        try:
            async for update in queue_updates(self._controller, ticket):
                self._reply(pb.AdmitSessionResponse(request_id=request_id, queued=update))
            self._send(request_id, ticket)
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
        except asyncio.CancelledError:
            self._controller.abandon(ticket)
            raise
        finally:
            self._waiting.pop(request_id, None)

    def _send(self, request_id: str, ticket: Ticket) -> None:
        try:
            admission = ticket.result()
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
            return
        self._reply(
            pb.AdmitSessionResponse(request_id=request_id, admitted=self._admitted(admission))
        )

    def _refuse(self, request_id: str, refusal: SwitchboardError) -> None:
        self._reply(pb.AdmitSessionResponse(request_id=request_id, refused=refusal.to_rpc_status()))

    async def drain(self) -> None:
        """Waits until every request on the stream has its outcome."""
        while self._waiting:
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)

    async def close(self) -> None:
        """The stream ended: its waiting requests leave the queue."""
        tasks = list(self._waiting.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def serve_session(
    controller: AdmissionController,
    frames: AsyncIterator[pb.AdmitSessionRequest],
    *,
    args_of: Callable[[pb.AdmitSessionRequest], dict[str, Any]],
    admitted: Callable[[Admission], pb.AdmitResponse],
) -> AsyncIterator[pb.AdmitSessionResponse]:
    """Serves one AdmitSession stream: submits its requests as they come and yields the
    replies; after the half-close, ends once every request has its outcome.

    However it ends, its waiting requests leave the queue, and admissions decided but
    never sent are released (nobody holds their leases).
    """
    replies: asyncio.Queue[pb.AdmitSessionResponse | None] = asyncio.Queue()
    session = AdmitSession(controller, args_of=args_of, reply=replies.put_nowait, admitted=admitted)

    async def submit_all() -> None:
        try:
            async for frame in frames:
                session.submit(frame)
            await session.drain()
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(submit_all())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
    finally:
        reader.cancel()
        await session.close()
        while not replies.empty():
            unsent = replies.get_nowait()
            if unsent is not None and unsent.HasField("admitted"):
                controller.release(unsent.admitted.lease.lease_id, actual_tokens=0)
