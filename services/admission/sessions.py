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

from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.admission.dispatcher import Dispatcher
from services.admission.request import AdmissionRequest
from services.admission.tickets import Admission, Ticket
from services.runtime import FieldViolation, SwitchboardError, invalid

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_S = 0.25
"""How often a waiting request's position is re-checked (an update is sent if it moved)."""


async def queue_updates(
    dispatcher: Dispatcher, ticket: Ticket
) -> AsyncIterator[common_pb2.QueuePosition]:
    """A waiting ticket's position and estimated wait, on entering the queue and whenever
    they change, until it is decided (its refusal is raised)."""
    last: tuple[int, float] | None = None
    while ticket.waiting:
        where = dispatcher.controller.queue_position(ticket)
        seen = (where.position, round(where.estimated_wait.total_seconds(), 1))
        if seen != last:
            last = seen
            update = common_pb2.QueuePosition(position=where.position)
            update.estimated_wait.FromTimedelta(where.estimated_wait)
            yield update
        await dispatcher.wait(ticket, timeout=UPDATE_INTERVAL_S)


class AdmitSession:
    """The server side of one AdmitSession stream.

    Args:
        dispatcher: waits for the tickets.
        request_of: the request a frame asks to admit (raises the refusal of an invalid
            frame).
        submit: submits a request to the dispatcher's controller (raises its refusal).
        reply: hands a reply to the stream's writer (never blocks).
        admitted: the AdmitResponse for an admission.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        request_of: Callable[[pb.AdmitSessionRequest], AdmissionRequest],
        submit: Callable[[AdmissionRequest], Ticket],
        reply: Callable[[pb.AdmitSessionResponse], None],
        admitted: Callable[[Admission], pb.AdmitResponse],
    ) -> None:
        self._dispatcher = dispatcher
        self._request_of = request_of
        self._submit = submit
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
            request = self._request_of(frame)
            if not request_id:  # unique among the tenant's attempts: the controller checks
                field = "request.context.request_id"
                raise invalid([FieldViolation(field, "required: it tags the request's replies")])
            ticket = self._submit(request)
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
            return
        if ticket.waiting:
            self._waiting[request_id] = asyncio.create_task(self._follow(request_id, ticket))
        else:
            self._send(request_id, ticket)

    async def _follow(self, request_id: str, ticket: Ticket) -> None:
        try:
            async for update in queue_updates(self._dispatcher, ticket):
                self._reply(pb.AdmitSessionResponse(request_id=request_id, queued=update))
            self._send(request_id, ticket)
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
        except asyncio.CancelledError:
            self._dispatcher.controller.abandon(ticket)
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
    dispatcher: Dispatcher,
    frames: AsyncIterator[pb.AdmitSessionRequest],
    *,
    request_of: Callable[[pb.AdmitSessionRequest], AdmissionRequest],
    submit: Callable[[AdmissionRequest], Ticket],
    admitted: Callable[[Admission], pb.AdmitResponse],
) -> AsyncIterator[pb.AdmitSessionResponse]:
    """Serves one AdmitSession stream: submits its requests as they come and yields the
    replies; after the half-close, ends once every request has its outcome.

    However it ends, its waiting requests leave the queue, and admissions decided but
    never sent are released (nobody holds their leases).
    """
    replies: asyncio.Queue[pb.AdmitSessionResponse | SwitchboardError | None] = asyncio.Queue()
    session = AdmitSession(
        dispatcher,
        request_of=request_of,
        submit=submit,
        reply=replies.put_nowait,
        admitted=admitted,
    )

    async def submit_all() -> None:
        try:
            async for frame in frames:
                session.submit(frame)
            await session.drain()
        except SwitchboardError as error:  # the stream itself is broken (a frame that
            replies.put_nowait(error)  # is no AdmitSessionRequest): the call fails
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(submit_all())
    try:
        while (reply := await replies.get()) is not None:
            if isinstance(reply, SwitchboardError):
                raise reply
            yield reply
    finally:
        reader.cancel()
        await session.close()
        while not replies.empty():
            unsent = replies.get_nowait()
            if unsent is not None and unsent.HasField("admitted"):
                dispatcher.controller.release(unsent.admitted.lease.lease_id, actual_tokens=0)
