"""AdmitSession: many admission attempts of one tenant over one stream.

A request admitted at once (the common case) is answered right away, without a task;
one that has to wait gets a task that sends its queue updates and then its outcome.
Replies are tagged with the request's id. A refusal ends that request only.

The stream also carries its caller's slice (delegated quota, see the controller): leases
reserved ahead of need, claimed as the caller hands them out, given back when recalled
or unused. The stream keeps the ids of its unclaimed leases: when it ends they are given
back, and while there are any, a request starting to wait at this replica sends the
stream a `recall`.

A lease the stream handed out (an admission, or a claim of its slice) lives no longer
than the stream, unless the caller half-closed it: when the stream is cancelled or
breaks, those still held are freed, their charge kept (as at their expiry). The caller
keeps its stream open while it holds leases granted on it, so such an end means that
they are done: the caller released them (where a release went to another replica, the
tenant's owner since, that one did not know them), or the caller is gone, its calls
with it. Otherwise they would hold their places of the tenant's concurrency and of this
replica's share of the tier ceilings until their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace

from switchboard.admission.v1 import admission_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.admission.dispatcher import Dispatcher
from services.admission.request import AdmissionRequest
from services.admission.tickets import Admission, Ticket
from services.runtime import FieldViolation, SwitchboardError, Unavailable, invalid

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_S = 0.25
"""How often a waiting request's position is re-checked (an update is sent if it moved)."""
KEEP_GRANTED = 256
"""The lease ids a stream handed out that it keeps before forgetting the released ones."""


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
        tenant_id: the stream's tenant (whose slice leases it may claim and give back).
        request_of: the request a `request` or `reserve` frame asks to admit (raises the
            refusal of an invalid one).
        submit: submits a request to the dispatcher's controller (raises its refusal).
        reply: hands a reply to the stream's writer (never blocks).
        admitted: the AdmitResponse for an admission.
        check: refuses an invalid frame of any kind (its contract's rules), before it
            is handled; the refusal is tagged with the request id it carries, if any.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        tenant_id: str,
        request_of: Callable[[pb.AdmitSessionRequest], AdmissionRequest],
        submit: Callable[[AdmissionRequest], Ticket],
        reply: Callable[[pb.AdmitSessionResponse], None],
        admitted: Callable[[Admission], pb.AdmitResponse],
        check: Callable[[pb.AdmitSessionRequest], None] | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._tenant = tenant_id
        self._check = check
        self._request_of = request_of
        self._submit = submit
        self._reply = reply
        self._admitted = admitted
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._unclaimed: dict[str, str] = {}
        """Lease id → its tier, for the leases of this stream's slice not yet claimed."""
        self._granted: set[str] = set()
        """The leases this stream handed out (admitted, or claimed from its slice), some
        since released: those still held when it ends are released then."""
        self._keep_at = KEEP_GRANTED
        self._stop_listening: Callable[[], None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def handed_out(self) -> int:
        """Lease ids of the leases it handed out that it keeps (held, or released since
        it last forgot the released ones)."""
        return len(self._granted)

    @property
    def unclaimed(self) -> int:
        """Leases of this stream's slice not yet claimed or given back."""
        return len(self._unclaimed)

    def submit(self, frame: pb.AdmitSessionRequest) -> None:
        """Handles one frame: decides its request (or starts following it through the
        queue), or moves the stream's slice."""
        kind = frame.WhichOneof("frame")
        if self._check is not None:
            try:
                self._check(frame)
            except SwitchboardError as refusal:
                tag = frame.reserve.shape if kind == "reserve" else frame.request
                self._refuse(tag.context.request_id, refusal)
                return
        if kind == "claim":
            self._claim(frame.claim)
        elif kind == "give_back":
            self._give_back(frame.give_back.lease_ids)
        elif kind == "reserve":
            self._reserve(frame)
        else:
            self._decide(frame)

    def _decide(self, frame: pb.AdmitSessionRequest) -> None:
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

    def _reserve(self, frame: pb.AdmitSessionRequest) -> None:
        request_id = frame.reserve.shape.context.request_id
        try:
            request = self._request_of(frame)
            if not request_id:
                field = "reserve.shape.context.request_id"
                raise invalid([FieldViolation(field, "required: it tags the slice")])
        except SwitchboardError as refusal:
            self._refuse(request_id, refusal)
            return
        controller = self._dispatcher.controller
        # the slice's leases are no attempts: they are released by lease id only
        tickets = controller.reserve(replace(request, request_id=""), frame.reserve.count)
        admissions = [self._admitted(ticket.result()) for ticket in tickets]
        self._unclaimed.update((a.lease.lease_id, request.tier) for a in admissions)
        if self._unclaimed and self._stop_listening is None:
            self._stop_listening = controller.on_wait(self._recall)
        self._reply(
            pb.AdmitSessionResponse(request_id=request_id, slice=pb.Slice(admissions=admissions))
        )

    def _claim(self, lease_id: str) -> None:
        if self._unclaimed.pop(lease_id, None) is not None:
            if self._dispatcher.controller.claim(self._tenant, lease_id):
                self._handed_out(lease_id)

    def _handed_out(self, lease_id: str) -> None:
        """Keeps `lease_id` among the stream's leases; forgets the released ones once
        there are many (so a long-lived stream keeps about as many as are held)."""
        self._granted.add(lease_id)
        if len(self._granted) >= self._keep_at:
            holds = self._dispatcher.controller.holds
            self._granted = {held for held in self._granted if holds(held)}
            self._keep_at = max(KEEP_GRANTED, 2 * len(self._granted))

    def _give_back(self, lease_ids: Iterable[str]) -> None:
        controller = self._dispatcher.controller
        for lease_id in lease_ids:
            if self._unclaimed.pop(lease_id, None) is not None:
                controller.give_back(self._tenant, lease_id)

    def _recall(self, tenant_id: str, tier: str) -> None:
        """A request of `tenant_id` on `tier` could not be admitted at once here: if the
        slice competes with it (same tenant, or a lease on the same tier), ask for the
        unclaimed leases back (once; a slice granted later listens again)."""
        if tenant_id != self._tenant and not (tier and tier in self._unclaimed.values()):
            return
        self._stop_recalls()
        if self._unclaimed:
            self._reply(pb.AdmitSessionResponse(recall=pb.SliceRecall()))

    def _stop_recalls(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None

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
        self._handed_out(admission.lease.lease_id)
        self._reply(
            pb.AdmitSessionResponse(request_id=request_id, admitted=self._admitted(admission))
        )

    def _refuse(self, request_id: str, refusal: SwitchboardError) -> None:
        self._reply(pb.AdmitSessionResponse(request_id=request_id, refused=refusal.to_rpc_status()))

    def reclaim(self) -> int:
        """The stream ended: frees the leases it handed out that are still held (their
        charge kept); returns how many."""
        reclaim = self._dispatcher.controller.reclaim
        freed = sum(reclaim(lease_id) for lease_id in self._granted)
        self._granted.clear()
        return freed

    async def drain(self) -> None:
        """Waits until every request on the stream has its outcome."""
        while self._waiting:
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)

    async def close(self) -> None:
        """The stream ended: its waiting requests leave the queue, its unclaimed leases
        are given back."""
        self._stop_recalls()
        self._give_back(list(self._unclaimed))
        tasks = list(self._waiting.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def serve_session(
    dispatcher: Dispatcher,
    frames: AsyncIterator[pb.AdmitSessionRequest],
    *,
    tenant_id: str,
    request_of: Callable[[pb.AdmitSessionRequest], AdmissionRequest],
    submit: Callable[[AdmissionRequest], Ticket],
    admitted: Callable[[Admission], pb.AdmitResponse],
    check: Callable[[pb.AdmitSessionRequest], None] | None = None,
) -> AsyncIterator[pb.AdmitSessionResponse]:
    """Serves one AdmitSession stream: submits its requests as they come and yields the
    replies; after the half-close, ends once every request has its outcome.

    When the replica starts draining, it ends with UNAVAILABLE `SHUTTING_DOWN` (its
    caller retries what waited on it on a new stream, which reaches a live replica).
    However it ends, its waiting requests leave the queue, and admissions decided but
    never sent are released (nobody holds their leases). Unless the caller half-closed
    it, the leases it sent that are still held are freed (see the module docstring).
    """
    replies: asyncio.Queue[pb.AdmitSessionResponse | SwitchboardError | None] = asyncio.Queue()
    session = AdmitSession(
        dispatcher,
        tenant_id=tenant_id,
        request_of=request_of,
        submit=submit,
        reply=replies.put_nowait,
        admitted=admitted,
        check=check,
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
    forget_drain = dispatcher.on_drain(
        lambda: replies.put_nowait(
            Unavailable(
                "this admission replica is stopping: open a new stream", reason="SHUTTING_DOWN"
            )
        )
    )
    half_closed = False
    try:
        while (reply := await replies.get()) is not None:
            if isinstance(reply, SwitchboardError):
                raise reply
            yield reply
        half_closed = True
    finally:
        forget_drain()
        reader.cancel()
        await session.close()
        while not replies.empty():
            unsent = replies.get_nowait()
            if isinstance(unsent, pb.AdmitSessionResponse) and unsent.HasField("admitted"):
                dispatcher.controller.release(unsent.admitted.lease.lease_id, actual_tokens=0)
        if not half_closed and (freed := session.reclaim()):
            logger.info(
                "leases freed with the stream that handed them out",
                extra={"tenant_id": tenant_id, "leases": freed},
            )
