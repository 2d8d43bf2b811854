"""A session owned by another chat replica, as a stream attached here sees it.

Its events are read from the shared log (`shared_log.SharedReader`); what the stream asks
of the session (a user message, a cancel, a settings change, "tell me when you are
idle") is relayed to the owner, and the owner is told when a stream attaches or
leaves (so that its grace period for a dropped stream's turn works as on the owner).

While a stream is attached, the owner is asked every `WATCH_S` whether it still owns
the session: when it no longer answers (it died), this replica takes the session
over (`Hub.claim`), which ends the turn it was running (an ErrorFrame
ANSWER_INTERRUPTED and its partial answer stored FAILED), and the stream reads on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.errors import NoRespondersError
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.shared import Moved, Shared
from services.chat.shared_log import SharedReader
from services.runtime import Unavailable

logger = logging.getLogger(__name__)

WATCH_S = 1.0
"""How often a replica with a stream of another's session checks that the owner lives."""
IDLE_WAIT_S = 4.0
"""How long the owner holds an `idle` request before answering "busy"."""
_ATTEMPTS = 3


def unreachable(session_id: str) -> Unavailable:
    return Unavailable(
        "the session's chat replica cannot be reached; resume shortly",
        reason="DEPENDENCY_UNAVAILABLE",
        metadata={"dependency": "chat", "session_id": session_id},
    )


class RemoteSession:
    """One stream's view of a session another replica owns."""

    def __init__(
        self,
        tenant_id: str,
        session_id: str,
        owner: str,
        *,
        shared: Shared,
        claim: Callable[[str, str], Awaitable[str]],
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.owner = owner
        self._shared = shared
        self._claim = claim  # (tenant, session) -> the owner's relay subject, after a claim
        self.reader: SharedReader | None = None
        self._watch: asyncio.Task[None] | None = None

    async def request(
        self, op: str, data: bytes = b"", *, headers: dict[str, str] | None = None
    ) -> bytes:
        """Relays to the owner; when it moved or died, claims the session again (which
        may make this replica its owner) and asks there.

        Raises:
            Unavailable: no owner answered, or NATS did not.
            SwitchboardError: the owner's refusal.
        """
        for _ in range(_ATTEMPTS):
            try:
                return await self._shared.request(
                    self.owner, op, self.tenant_id, self.session_id, data, headers=headers
                )
            except (Moved, NoRespondersError):
                self.owner = await self._claim(self.tenant_id, self.session_id)
        raise unreachable(self.session_id)

    async def attached(self, reader: SharedReader) -> None:
        """A stream reads the session here: the owner is told, and watched."""
        self.reader = reader
        await self.request("attach")
        self._watch = asyncio.create_task(self._watch_owner())

    async def detach(self, *, clean: bool) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.reader is not None:
            await self.reader.close()
        with contextlib.suppress(Exception):
            await self.request("detach", headers={"Sb-Clean": "1" if clean else "0"})

    async def frame(self, frame: pb.ConverseRequest) -> None:
        await self.request("frame", frame.SerializeToString())

    async def send(self, request: pb.SendMessageRequest) -> pb.SendMessageResponse:
        return pb.SendMessageResponse.FromString(
            await self.request("send", request.SerializeToString())
        )

    async def cancel(self, request: pb.CancelTurnRequest) -> bool:
        return await self.request("cancel", request.SerializeToString()) == b"1"

    async def finish(self) -> None:
        """The stream half-closed: once the owner's turns are done, the reader ends after
        the last event they produced."""
        while True:
            answer = (await self.request("idle")).decode()
            state, _, last = answer.partition(":")
            if state == "idle":
                assert self.reader is not None
                self.reader.finish(last)
                return

    async def _watch_owner(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._shared.request(
                    self.owner, "owns", self.tenant_id, self.session_id, b"", timeout=WATCH_S
                )
            except (Moved, NoRespondersError):
                logger.info("the session's owner is gone", extra={"session_id": self.session_id})
                with contextlib.suppress(Exception):
                    self.owner = await self._claim(self.tenant_id, self.session_id)
            except Exception:  # slow or unreachable: asked again next time
                continue
