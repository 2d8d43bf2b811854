"""Word between chat replicas about a session's live state, over core NATS.

What a replica keeps in memory about a session it serves (its running turn, its
settings as turns read them, its streams) can be changed through any replica:

- CancelTurn (or a Converse cancel frame) reaching a replica that does not run the
  session's turn asks the one that does (request/reply: whether it stopped one);
- UpdateSession, a settings frame, or DeleteSession on one replica tells the others
  (`CHANGED_SETTINGS`, `DELETED`), which reload the settings or end their streams;
- a Converse stream resuming on one replica tells the others (`RESUMED`), so the
  replica running the session's turn does not cancel it as abandoned by the client
  whose stream dropped there.

Notices are not stored: one that is missed costs no event and no history (those live
in the session log and PostgreSQL), only what it would have spared (a turn runs on
for nobody, a setting applies from the next load). The subjects are outside the
session log's (`sb.chat.>`), so none of them is kept in its stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)

__all__ = ["CHANGED_SETTINGS", "DELETED", "RESUMED", "NatsNotices", "Notices", "QuietNotices"]

CANCEL_SUBJECT = "sb.chatctl.cancel"
"""`sb.chatctl.cancel.<session_id>`: request to stop the session's turn (payload: the
assistant message id, or empty for the current one); reply `1` if one was stopped."""
CHANGE_SUBJECT = "sb.chatctl.changed"
"""`sb.chatctl.changed.<session_id>`: a broadcast; payload `<kind> <sender>`."""
CHANGED_SETTINGS = "settings"
DELETED = "deleted"
RESUMED = "resumed"
CANCEL_TIMEOUT_S = 2.0
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)

OnCancel = Callable[[str, str], bool | None]
"""(session id, assistant message id) → whether the turn running here was stopped;
None when none runs here (another replica answers)."""
OnChange = Callable[[str, str], Awaitable[None]]
"""(session id, kind) → what this replica does about it."""


class Notices(Protocol):
    async def serve(self, on_cancel: OnCancel, on_change: OnChange) -> None:
        """Starts answering cancellations and hearing changes (idempotent)."""
        ...

    async def cancel(self, session_id: str, assistant_id: str) -> bool:
        """Asks the replica running the session's turn to stop it; whether it did."""
        ...

    async def tell(self, session_id: str, kind: str) -> None:
        """Tells the other replicas the session changed (`kind`)."""
        ...

    async def close(self) -> None: ...


class QuietNotices:
    """A replica on its own: there is nobody to tell."""

    async def serve(self, on_cancel: OnCancel, on_change: OnChange) -> None:
        return None

    async def cancel(self, session_id: str, assistant_id: str) -> bool:
        return False

    async def tell(self, session_id: str, kind: str) -> None:
        return None

    async def close(self) -> None:
        return None


class NatsNotices:
    def __init__(self, nc: Client, *, replica: str) -> None:
        self._nc = nc
        self._replica = replica
        self._subs: list[Subscription] = []

    async def serve(self, on_cancel: OnCancel, on_change: OnChange) -> None:
        if self._subs:
            return

        async def cancel(msg: Msg) -> None:
            stopped = on_cancel(msg.subject.rsplit(".", 1)[-1], msg.data.decode())
            if stopped is not None:  # only the replica running the turn answers
                await msg.respond(b"1" if stopped else b"0")

        async def changed(msg: Msg) -> None:
            kind, _, sender = msg.data.decode().partition(" ")
            if sender != self._replica:
                await on_change(msg.subject.rsplit(".", 1)[-1], kind)

        self._subs = [
            await self._nc.subscribe(f"{CANCEL_SUBJECT}.*", cb=cancel),
            await self._nc.subscribe(f"{CHANGE_SUBJECT}.*", cb=changed),
        ]

    async def cancel(self, session_id: str, assistant_id: str) -> bool:
        """Asks the replica running the session's turn to stop it; whether it did (False
        when no replica answers in time)."""
        try:
            reply = await self._nc.request(
                f"{CANCEL_SUBJECT}.{session_id}", assistant_id.encode(), timeout=CANCEL_TIMEOUT_S
            )
        except _NATS_ERRORS:  # no replica runs it (no responders, or no answer in time)
            return False
        return reply.data == b"1"

    async def tell(self, session_id: str, kind: str) -> None:
        with contextlib.suppress(*_NATS_ERRORS):
            await self._nc.publish(
                f"{CHANGE_SUBJECT}.{session_id}", f"{kind} {self._replica}".encode()
            )

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()
        self._subs = []
