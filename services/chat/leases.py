"""Turn leases: one turn at a time per session across chat replicas, and a way to tell a
turn still generating elsewhere from one whose replica died.

A replica runs a session's turn only while it holds the session's lease: a key of the
JetStream KV bucket `SB_CHAT_TURNS` (the session id), created with a compare-and-set
(so one replica wins), renewed by its owner every third of `ttl`, deleted when the turn
ends. Its value (`TurnRecord`) says who runs which answer, until when the lease holds,
and where the turn's events start in the session log.

Every replica mirrors the bucket (one KV watcher), so it knows without a round trip
which sessions have a turn running (StreamEvents starts at the turn in progress) and
when a lease has gone unrenewed past its expiry: its owner was killed or cut off. The
first replica to notice takes the lease over (a compare-and-set on the revision it saw,
so only one does) and recovers the turn (`recovery`): an error frame and the partial
answer stored. An owner whose renewal finds its lease taken over stops its turn without
a word (the recovery spoke for it). Expiry compares wall clocks: replicas' clocks are
assumed to agree to well within `ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import nats
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from services.runtime import dependency_unavailable, stop_task

logger = logging.getLogger(__name__)

__all__ = ["KvLeases", "Lease", "TurnLeases", "TurnRecord"]

BUCKET = "SB_CHAT_TURNS"
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)


@dataclass(frozen=True)
class TurnRecord:
    """Who runs a session's turn: the value of its lease."""

    tenant_id: str
    session_id: str
    assistant_id: str
    """The answer being generated."""
    client_message_id: str
    owner: str
    """The replica running the turn."""
    after: int
    """A log sequence before any event of the turn."""
    started: int = 0
    """The sequence of the turn's TurnStarted, once the log holds it."""
    expires: float = 0.0
    """Wall-clock seconds after which an unrenewed lease means the owner is gone."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> TurnRecord:
        return cls(**json.loads(data))

    @property
    def start(self) -> int:
        """Where a reader of the turn from its beginning starts."""
        return self.started or self.after + 1


class Lease(Protocol):
    record: TurnRecord
    lost: asyncio.Event
    """Set when another replica took the turn over (this one was thought dead)."""

    async def started(self, sequence: int) -> None:
        """Records where the turn's TurnStarted is in the log."""
        ...

    async def release(self) -> None: ...


class TurnLeases(Protocol):
    async def acquire(self, record: TurnRecord) -> Lease:
        """The session's lease for the turn `record` describes; waits while another
        replica runs a turn of the session (one whose owner is gone is recovered first).

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE`, NATS cannot be reached.
        """
        ...

    def running(self, session_id: str) -> TurnRecord | None:
        """The session's turn in progress, as far as this replica knows."""
        ...

    async def close(self) -> None: ...


Recover = Callable[[TurnRecord], Awaitable[None]]


class KvLease:
    def __init__(self, leases: KvLeases, record: TurnRecord, revision: int) -> None:
        self._leases = leases
        self.record = record
        self.revision = revision
        self.lost = asyncio.Event()
        self.lock = asyncio.Lock()  # one update of the key at a time

    async def started(self, sequence: int) -> None:
        await self._leases._update(self, replace(self.record, started=sequence))

    async def release(self) -> None:
        await self._leases._release(self)


class KvLeases:
    """Turn leases in a JetStream KV bucket, mirrored by a watcher (see the module).

    Args:
        js: the JetStream context.
        owner: this replica's name in the records.
        ttl: how long a lease holds unrenewed.
        recover: recovers a turn whose owner is gone (called by the replica that took
            its lease over, which deletes the lease after).
    """

    def __init__(self, js: JetStreamContext, *, owner: str, ttl: float, recover: Recover) -> None:
        self._js = js
        self._owner = owner
        self._ttl = ttl
        self._recover = recover
        self._kv: KeyValue | None = None
        self._records: dict[str, tuple[TurnRecord, int]] = {}
        self._held: dict[str, KvLease] = {}
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._recovering: set[str] = set()
        self._watcher: KeyValue.KeyWatcher | None = None

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "open() first"
        return self._kv

    async def open(self) -> None:
        try:
            self._kv = await self._js.key_value(BUCKET)
        except NotFoundError:
            self._kv = await self._js.create_key_value(
                js_api.KeyValueConfig(bucket=BUCKET, history=1, storage=js_api.StorageType.FILE)
            )
        self._watcher = await self.kv.watchall()
        ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._mirror(self._watcher, ready)),
            asyncio.create_task(self._beat()),
        ]
        await ready.wait()

    async def close(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        if self._watcher is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._watcher.stop()

    def running(self, session_id: str) -> TurnRecord | None:
        found = self._records.get(session_id)
        return found[0] if found is not None else None

    async def acquire(self, record: TurnRecord) -> KvLease:
        key = record.session_id
        while True:
            mine = replace(record, owner=self._owner, expires=time.time() + self._ttl)
            try:
                revision = await self.kv.create(key, mine.encode())
            except KeyWrongLastSequenceError:
                pass
            except _NATS_ERRORS as exc:
                raise dependency_unavailable("nats", "turn leases", exc) from exc
            else:
                lease = KvLease(self, mine, revision)
                self._held[key] = lease
                return lease
            found = self._records.get(key)
            if found is not None and found[0].expires < time.time():
                await self._take_over(key, *found)
                continue
            wait = self._ttl if found is None else max(0.05, found[0].expires - time.time())
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(wait, self._ttl))

    async def _update(self, lease: KvLease, record: TurnRecord) -> None:
        async with lease.lock:
            if lease.lost.is_set():
                return
            try:
                lease.revision = await self.kv.update(
                    record.session_id, record.encode(), last=lease.revision
                )
                lease.record = record
            except KeyWrongLastSequenceError:
                logger.warning(
                    "turn lease taken over; stopping the turn",
                    extra={"session_id": record.session_id},
                )
                self._held.pop(record.session_id, None)
                lease.lost.set()
            except _NATS_ERRORS as exc:  # the next renewal tries again
                logger.warning("cannot renew the turn lease of %s: %s", record.session_id, exc)

    async def _release(self, lease: KvLease) -> None:
        async with lease.lock:
            key = lease.record.session_id
            if self._held.get(key) is lease:
                del self._held[key]
            if lease.lost.is_set():
                return
            with contextlib.suppress(KeyWrongLastSequenceError, *_NATS_ERRORS):
                await self.kv.delete(key, last=lease.revision)

    async def _take_over(self, key: str, record: TurnRecord, revision: int) -> None:
        """Takes over the lease of a turn whose owner is gone, recovers it, and deletes
        the lease (unless another replica took it first: then it recovers it)."""
        if key in self._recovering:
            return
        self._recovering.add(key)
        try:
            mine = replace(record, owner=self._owner, expires=time.time() + self._ttl)
            try:
                taken = await self.kv.update(key, mine.encode(), last=revision)
            except (KeyWrongLastSequenceError, *_NATS_ERRORS):
                return  # renewed, released, or taken by another replica meanwhile
            logger.warning(
                "turn owner gone; recovering its turn",
                extra={"session_id": key, "owner": record.owner},
            )
            try:
                await self._recover(record)
            except Exception:
                logger.exception("recovering the turn failed", extra={"session_id": key})
            with contextlib.suppress(KeyWrongLastSequenceError, *_NATS_ERRORS):
                await self.kv.delete(key, last=taken)
        finally:
            self._recovering.discard(key)

    async def _mirror(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values are in
                ready.set()
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                self._records.pop(entry.key, None)
            else:
                try:
                    self._records[entry.key] = (TurnRecord.decode(entry.value), entry.revision or 0)
                except (ValueError, TypeError):
                    logger.warning("ignoring an unreadable turn lease %s", entry.key)
            async with self._changed:
                self._changed.notify_all()
            ready.set()

    async def _beat(self) -> None:
        """Renews this replica's leases, and takes over expired ones, every third of
        `ttl`."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._beat_once(time.time())
            except Exception:  # a beat that failed must not end the ones to come
                logger.exception("turn lease round failed")

    async def _beat_once(self, now: float) -> None:
        await asyncio.gather(
            *(
                self._update(lease, replace(lease.record, expires=now + self._ttl))
                for lease in list(self._held.values())
            )
        )
        for key, (record, revision) in list(self._records.items()):
            if record.expires < now and key not in self._held:
                await self._take_over(key, record, revision)
