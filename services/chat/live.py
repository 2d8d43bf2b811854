"""The live sessions of one chat process (`Hub`): where each stream's session runs, and
what its frames do.

A session is live in the process that runs its turns (`live_session.LiveSession`). With
shared sessions (several replicas, `shared`), the Hub claims a session before making it
live here; a session another replica owns is served as a `remote.RemoteSession` (its
events read from the shared log, its frames relayed to the owner), and the Hub answers
what other replicas relay to the sessions it owns (`relayed`). A draining replica
(`Hub.drain`) tells its streams to resume elsewhere and lets its turns finish before it
lets its sessions go. An idle session without streams is forgotten after `idle_ttl`;
resuming it later gets EVENT_HISTORY_EXPIRED, and its history is still in ListMessages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable

from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Expired, Reader
from services.chat.live_session import (
    Limits,
    LiveSession,
    frame_error,
    out_of_order,
)
from services.chat.remote import IDLE_WAIT_S, RemoteSession
from services.chat.sessions import load_session, settings_update, update_session
from services.chat.shared import Moved, Owner, Shared
from services.chat.shared_log import SharedReader
from services.chat.store import SessionStore, canonical_id
from services.chat.turns import Turns, end_interrupted
from services.runtime import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SwitchboardError,
    Unavailable,
)

logger = logging.getLogger(__name__)

__all__ = ["Hub", "Limits", "LiveSession", "Reader"]

RECENT_CLIENT_IDS = 1000
"""Client message ids of a session loaded to answer a resent message once."""


class Hub:
    """The live sessions of this process: those it owns, and, with `shared` (several
    replicas), the streams it serves of sessions other replicas own (see `shared`)."""

    def __init__(
        self, store: SessionStore, turns: Turns, limits: Limits, shared: Shared | None = None
    ) -> None:
        self._store = store
        self._turns = turns
        self.limits = limits
        self._shared = shared
        self._sessions: dict[str, LiveSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._remote: dict[str, set[RemoteSession]] = {}
        self.draining = False

    def __len__(self) -> int:
        return len(self._sessions)

    async def attach(
        self, tenant_id: str, frame: pb.ConverseRequest
    ) -> tuple[Live, Reader | SharedReader, pb.ConverseResponse]:
        """Attaches a stream by its first frame; returns the session, the stream's reader
        and the SessionOpened frame.

        Raises:
            InvalidArgument: `FRAME_OUT_OF_ORDER` (the first frame is not open/resume).
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
            Unavailable: `SHUTTING_DOWN` (this replica is draining: resume elsewhere).
        """
        kind = frame.WhichOneof("frame")
        if kind not in ("open", "resume"):
            raise out_of_order(f"got `{kind}` before open" if kind else "got an empty frame")
        if (problem := frame_error(getattr(frame, kind), kind)) is not None:
            raise problem
        session_id = frame.open.session_id if kind == "open" else frame.resume.session_id
        live, session = await self._live(tenant_id, session_id)
        after = None if kind == "open" else frame.resume.last_event_id
        reader, last = await self._reader(live, after)
        session.last_event_id = last
        opened = pb.ConverseResponse(
            event_id=last if kind == "open" else (after or ""),
            opened=pb.SessionOpened(session=session, resumed=kind == "resume"),
        )
        return live, reader, opened

    async def watch(
        self, tenant_id: str, session_id: str, after_event_id: str
    ) -> tuple[Live, Reader | SharedReader, pb.ConverseResponse]:
        """Attaches a watcher (StreamEvents): after `after_event_id`, or from the turn in
        progress when it is empty. Returns the session, the reader and the SessionOpened
        frame, whose event_id is where the reader starts.

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
            Unavailable: `SHUTTING_DOWN` (this replica is draining).
        """
        live, session = await self._live(tenant_id, session_id)
        if isinstance(live, RemoteSession):
            reader, start = await self._shared_reader(live, after_event_id, held=True)
            session.last_event_id = start
        elif after_event_id:
            reader, _ = await self._reader(live, after_event_id)
            start = live.log.id_before(reader) if isinstance(reader, Reader) else after_event_id
            session.last_event_id = live.log.last_event_id
        else:
            reader = live.attach_held()
            start = live.log.id_before(reader)
            session.last_event_id = live.log.last_event_id
        opened = pb.ConverseResponse(
            event_id=start,
            opened=pb.SessionOpened(session=session, resumed=bool(after_event_id)),
        )
        return live, reader, opened

    async def _reader(self, live: Live, after: str | None) -> tuple[Reader | SharedReader, str]:
        """A reader of the session's events after `after` (None: new ones only), and the
        session's last event id: from this process's log if it has them, else from the
        shared one (another replica's session, or an earlier owner's events).

        Raises:
            FailedPrecondition: `EVENT_HISTORY_EXPIRED`.
        """
        if isinstance(live, LiveSession):
            try:
                return live.attach(after), live.log.last_event_id
            except Expired:
                # the ids of its own incarnation this log knows: one it has not is expired
                # (or never given out); an earlier owner's are in the shared log
                if (
                    self._shared is None
                    or not after
                    or after.partition(".")[0] == live.log.incarnation
                ):
                    raise _expired(live.session_id, after) from None
        return await self._shared_reader(live, after)

    async def _shared_reader(
        self, live: Live, after: str | None, *, held: bool = False
    ) -> tuple[SharedReader, str]:
        assert self._shared is not None
        try:
            reader, last = await self._shared.reader(live.session_id, after, held=held)
        except Expired:
            raise _expired(live.session_id, after) from None
        if isinstance(live, RemoteSession):
            try:
                await live.attached(reader)
            except BaseException:
                await reader.close()
                raise
            self._remote.setdefault(live.session_id, set()).add(live)
        else:
            live.attach_remote()  # read from the shared log, but here
        return reader, last

    async def detach(self, live: Live, reader: Reader | SharedReader, *, clean: bool) -> None:
        """The stream ended (`clean`: it half-closed, or only watched)."""
        if isinstance(live, RemoteSession):
            if (streams := self._remote.get(live.session_id)) is not None:
                streams.discard(live)
                if not streams:
                    del self._remote[live.session_id]
            await live.detach(clean=clean)
        elif isinstance(reader, SharedReader):
            await reader.close()
            live.detach_remote(clean=clean)
        else:
            live.detach(reader, clean=clean)

    async def send(self, tenant_id: str, request: pb.SendMessageRequest) -> pb.SendMessageResponse:
        """Queues a SendMessage's message, detached from streams (see the module).

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            ResourceExhausted, InvalidArgument: as `LiveSession.accept`.
        """
        live, _ = await self._live(tenant_id, request.session_id)
        if isinstance(live, RemoteSession):
            return await live.send(request)
        return _send(live, request)

    async def cancel(self, tenant_id: str, request: pb.CancelTurnRequest) -> bool:
        """CancelTurn: whether an answer was being generated and is being stopped.

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
        """
        row = await self._store.get(tenant_id, request.session_id)  # NOT_FOUND first
        live = self._sessions.get(row.session_id)
        if live is not None:
            return live.cancel(request.assistant_message_id)
        if self._shared is None:
            return False
        owner = await self._shared.owner_of(row.session_id)
        if owner is None:
            return False  # nobody runs a turn of it
        remote = self._remote_session(tenant_id, row.session_id, owner)
        return await remote.cancel(request)

    async def _live(self, tenant_id: str, session_id: str) -> tuple[Live, pb.Session]:
        """The tenant's session: live in this process (loaded if it was not, and claimed
        when replicas share sessions), or another replica's.

        Raises:
            NotFound: `SESSION_NOT_FOUND` (also another tenant's session).
            Unavailable: `SHUTTING_DOWN` (this replica is draining).
        """
        if self.draining:
            raise _stopping()
        session, seen = await load_session(  # NOT_FOUND first
            self._store, tenant_id, session_id, recent_ids=RECENT_CLIENT_IDS
        )
        session_id = session.session_id
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            live = self._sessions.get(session_id)
            if live is None or live.closed is not None:
                owner = Owner("", mine=True)
                if self._shared is not None:
                    owner = await self._shared.claim(session_id)
                    if not owner.mine:
                        remote = self._remote_session(tenant_id, session_id, owner.subject)
                        return remote, session
                live = self._new_live(tenant_id, session_id, session.settings, seen)
                if self._shared is not None:  # before any event of its incarnation
                    await self._shared.mark(session_id, live.log.next_id_before)
                self._sessions[session_id] = live
                if owner.taken_over:
                    await self._end_interrupted(live)
        return live, session

    def _new_live(
        self, tenant_id: str, session_id: str, settings: pb.SessionSettings, seen: set[str]
    ) -> LiveSession:
        live = LiveSession(
            tenant_id,
            session_id,
            turns=self._turns,
            limits=self.limits,
            publish=self._shared.publish if self._shared is not None else None,
        )
        live.seen = seen
        live.settings = settings
        return live

    def _remote_session(self, tenant_id: str, session_id: str, owner: str) -> RemoteSession:
        assert self._shared is not None
        return RemoteSession(tenant_id, session_id, owner, shared=self._shared, claim=self._claim)

    async def _claim(self, tenant_id: str, session_id: str) -> str:
        """The relay subject of the session's owner, after claiming it (this process's
        own when it takes the session over)."""
        live, _ = await self._live(tenant_id, session_id)
        assert self._shared is not None
        return live.owner if isinstance(live, RemoteSession) else self._shared.subject

    async def _end_interrupted(self, live: LiveSession) -> None:
        """The session's previous owner died: the turn it was running, if any, ends
        FAILED with what it had generated (stored) and an ErrorFrame."""
        assert self._shared is not None
        found = await self._shared.interrupted_turn(live.session_id)
        if found is not None:
            started, text = found
            await end_interrupted(
                self._store, live.tenant_id, live.session_id, started, text, emit=live.emit
            )

    async def relayed(
        self, op: str, tenant_id: str, session_id: str, data: bytes, headers: dict[str, str]
    ) -> bytes:
        """Answers what another replica's stream asks of a session this one owns (see
        `shared`).

        Raises:
            Moved: it is not owned here (any more).
            SwitchboardError: the refusal the stream is given.
        """
        live = self._sessions.get(session_id)
        if live is None or live.closed is not None:
            raise Moved(session_id)
        if tenant_id and tenant_id != live.tenant_id:  # never: the asker checked the tenant
            raise NotFound(f"no session {session_id!r}", reason="SESSION_NOT_FOUND")
        if op == "owns":
            return b"1"
        if op == "frame":
            await self._frame(live, pb.ConverseRequest.FromString(data))
            return b""
        if op == "send":
            return _send(live, pb.SendMessageRequest.FromString(data)).SerializeToString()
        if op == "cancel":
            cancelled = live.cancel(pb.CancelTurnRequest.FromString(data).assistant_message_id)
            return b"1" if cancelled else b"0"
        if op == "attach":
            live.attach_remote()
            return b""
        if op == "detach":
            live.detach_remote(clean=headers.get("Sb-Clean") == "1")
            return b""
        if op == "idle":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.wait_idle(), IDLE_WAIT_S)
            state = "idle" if live.idle else "busy"
            return f"{state}:{live.log.last_event_id}".encode()
        raise InvalidArgument(f"unknown relayed operation {op!r}")

    def noticed(self, op: str, session_id: str, data: bytes) -> None:
        """What a replica told every replica (see `shared`)."""
        if op == "updated":
            self.updated(pb.Session.FromString(data), tell=False)
        elif op == "deleted":
            self.delete(session_id, tell=False)

    async def serve(
        self, live: Live, reader: Reader | SharedReader, frames: AsyncIterator[pb.ConverseRequest]
    ) -> None:
        """Dispatches a stream's frames after the first; on half-close, finishes the
        reader once the session's turns are done. A stream the client breaks (a frame
        that is no ConverseRequest: INVALID_ARGUMENT) fails the reader with that
        error."""
        try:
            await self._dispatch(live, reader, frames)
        except SwitchboardError as error:
            reader.fail(error)

    async def _dispatch(
        self, live: Live, reader: Reader | SharedReader, frames: AsyncIterator[pb.ConverseRequest]
    ) -> None:
        async for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind not in ("message", "cancel", "settings"):
                got = f"got `{kind}`" if kind else "got an empty frame"
                reader.fail(out_of_order(f"{got} after the stream was attached"))
                return
            if isinstance(live, RemoteSession):
                await live.frame(frame)
            else:
                await self._frame(live, frame)
        if isinstance(live, RemoteSession):
            await live.finish()
        else:
            await live.wait_idle()
            if isinstance(reader, SharedReader):
                reader.finish(live.log.last_event_id)
            else:
                reader.finish()

    async def _frame(self, live: LiveSession, frame: pb.ConverseRequest) -> None:
        """A stream's message, cancel or settings frame, on the session's owner."""
        kind = frame.WhichOneof("frame")
        if kind == "message":
            await live.submit(frame.message)  # checked after its size limit
        elif problem := frame_error(getattr(frame, kind), kind):
            await live.error(problem)
        elif kind == "cancel":
            live.cancel(frame.cancel.assistant_message_id)
        elif kind == "settings":
            await self._change_settings(live, frame.settings)

    async def _change_settings(self, live: LiveSession, change: pb.ChangeSettings) -> None:
        try:
            request = settings_update(live.session_id, change)
            session = await update_session(self._store, live.tenant_id, request)
        except SwitchboardError as error:
            await live.error(error)
            return
        live.settings = session.settings
        await live.emit(pb.ConverseResponse(settings_changed=pb.SettingsChanged(session=session)))

    def updated(self, session: pb.Session, *, tell: bool = True) -> None:
        """The session's settings were changed (UpdateSession): later turns use them,
        whichever replica runs them."""
        if (live := self._sessions.get(session.session_id)) is not None:
            live.settings = session.settings
        if tell and self._shared is not None:
            self._tell("updated", session.session_id, session.SerializeToString())

    def delete(self, session_id: str, *, tell: bool = True) -> None:
        """Ends the streams of a deleted session, however its id was spelled, on every
        replica."""
        try:
            session_id = canonical_id(session_id)
        except NotFound:
            return
        gone = NotFound(
            f"session {session_id!r} was deleted",
            reason="SESSION_NOT_FOUND",
            metadata={"session_id": session_id},
        )
        live = self._sessions.pop(session_id, None)
        self._locks.pop(session_id, None)
        if live is not None:
            live.close(gone)
        for remote in self._remote.pop(session_id, set()):
            if remote.reader is not None:
                remote.reader.fail(gone)
        if tell and self._shared is not None:
            self._tell("deleted", session_id)
            if live is not None:
                _spawn(self._shared.release(session_id))

    def _tell(self, op: str, session_id: str, data: bytes = b"") -> None:
        assert self._shared is not None
        _spawn(self._shared.notify(op, session_id, data))

    def collect_idle(self, now: float | None = None) -> list[str]:
        """Forgets idle sessions without streams older than idle_ttl (and, with shared
        sessions, lets them go); returns their ids."""
        now = time.monotonic() if now is None else now
        stale = [
            sid
            for sid, live in self._sessions.items()
            if live.idle and not live.watched and now - live.idle_since > self.limits.idle_ttl
        ]
        for sid in stale:
            del self._sessions[sid]
            self._locks.pop(sid, None)
            if self._shared is not None:
                _spawn(self._shared.release(sid))
        return stale

    async def drain(self, within: float) -> None:
        """This replica is stopping: its streams are told to resume elsewhere (the
        shared log serves them there), its sessions' turns finish here (for at most
        `within` seconds), then it lets them go, so another replica claims each as its
        next message or stream arrives."""
        self.draining = True
        moving = _stopping()
        for live in self._sessions.values():
            live.draining = True
            live.log.fail_readers(moving)
        for remotes in self._remote.values():
            for remote in remotes:
                if remote.reader is not None:
                    remote.reader.fail(moving)
        busy = [live.wait_idle() for live in self._sessions.values() if not live.idle]
        if busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*busy), within)
        # a turn still running keeps its session here until the process ends it
        idle = [sid for sid, live in self._sessions.items() if live.idle]
        for sid in idle:
            del self._sessions[sid]  # asked for it, this replica now says it moved
        if self._shared is not None:
            await self._shared.flush()  # every event shared before another replica claims
            await asyncio.gather(*(self._shared.release(sid) for sid in idle))

    def close(self) -> None:
        """Ends every stream and turn (the service is stopping)."""
        for live in self._sessions.values():
            live.close(_stopping())


Live = LiveSession | RemoteSession
_spawned: set[asyncio.Task[None]] = set()


def _spawn(work: Awaitable[None]) -> None:
    task = asyncio.ensure_future(work)
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)


def _stopping() -> Unavailable:
    return Unavailable("this chat replica is stopping; resume the session", reason="SHUTTING_DOWN")


def _send(live: LiveSession, request: pb.SendMessageRequest) -> pb.SendMessageResponse:
    last = live.log.next_id_before
    accepted = live.accept(request.message, detached=True)
    return pb.SendMessageResponse(accepted=accepted, last_event_id=last)


def _expired(session_id: str, after: str | None) -> FailedPrecondition:
    return FailedPrecondition(
        f"event {after!r} is no longer retained; read the history with ListMessages"
        " and open the session",
        reason="EVENT_HISTORY_EXPIRED",
        metadata={"session_id": session_id, "last_event_id": after or ""},
    )
