"""Publishing to one JetStream stream: many callers' messages per flush when busy.

A NATS that syncs every message to disk before acknowledging it (`sync_interval:
always`) stores one message per disk sync: about 5,000 a second on one stream here,
whatever the number in flight. An atomic batch (NATS 2.12+, `allow_atomic`) is stored
under one sync: a batch costs about 2 ms and each message in it about 10 µs more.

So callers' messages are queued together (`Batcher`): while one flush is in flight, the
next callers' messages wait for the next one. A flush of at least `ATOMIC_AT_LEAST`
messages goes as atomic batches (at most `ATOMIC_AT_MOST` messages each); a smaller one
as single publishes, their acks awaited together (cheaper below that size). An idle
publisher adds no wait: the first caller's flush starts at once.

Each message keeps its `Nats-Msg-Id`. A batch holding an id the stream has already seen
(a republish after a crash) is refused whole by NATS; its messages are then published
one by one, where the repeats are dropped as before. The order of messages is the
order they were handed in, within a flush and across flushes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api

from services.execution.batcher import Batcher
from services.runtime import dependency_unavailable

logger = logging.getLogger(__name__)

Message = tuple[str, bytes, Mapping[str, str]]
"""A message to publish: its subject, payload and headers (`Nats-Msg-Id` among them)."""

ATOMIC_AT_LEAST = 16
"""The smallest flush sent as an atomic batch (below it, single publishes cost less)."""
ATOMIC_AT_MOST = 500
"""Messages per atomic batch at most (NATS accepts 1,000)."""
FLUSH_GROUPS = 1024
"""Callers' message groups per flush at most: enough that every caller waiting is in the
next flush (so that while NATS is down, each waits for at most two flushes' timeouts)."""
_BATCH_ID = "Nats-Batch-Id"
_BATCH_SEQUENCE = "Nats-Batch-Sequence"
_BATCH_COMMIT = "Nats-Batch-Commit"


class BatchRefused(Exception):
    """NATS refused an atomic batch (nothing of it was stored)."""

    def __init__(self, error: Mapping[str, object]) -> None:
        super().__init__(error.get("description", "atomic batch refused"))
        self.error = error


class SinglePublishes:
    """JetStream's single publishes on one connection, each answered by its own ack.

    nats-py makes its inbox for acks on the first publish, without a lock: two first
    publishes at once would make two, and lose one's ack. The first one runs alone here.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._ready = False
        self._first = asyncio.Lock()

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[js_api.PubAck]:
        if self._ready:
            return await self._js.publish_async(subject, payload, headers=headers)
        async with self._first:
            ack = await self._js.publish_async(subject, payload, headers=headers)
            self._ready = True
            return ack


class StreamPublisher:
    """The publishes of one stream, coalesced across callers.

    Args:
        nc: the connection (atomic batches are plain NATS publishes and one request;
            its request inbox exists once the streams have been looked up).
        singles: single publishes on that connection.
        atomic: whether the stream accepts atomic batches (`allow_atomic`).
        timeout: how long one flush may take.
    """

    def __init__(
        self, nc: Client, singles: SinglePublishes, *, atomic: bool, timeout: float
    ) -> None:
        self._nc = nc
        self._singles = singles
        self.atomic = atomic
        self._timeout = timeout
        self._flushes: Batcher[Sequence[Message], list[int] | Exception] = Batcher(
            self._flush, limit=FLUSH_GROUPS
        )

    async def publish(self, messages: Sequence[Message]) -> list[int]:
        """Publishes `messages` in this order (with those of other callers queued
        meanwhile); returns their stream sequences once all are stored.

        Raises:
            Unavailable: `DEPENDENCY_UNAVAILABLE`, NATS did not store them in time.
        """
        result = await self._flushes(messages)
        if isinstance(result, Exception):
            raise result
        return result

    async def _flush(self, groups: list[Sequence[Message]]) -> list[list[int] | Exception]:
        messages = [m for group in groups for m in group]
        try:
            async with asyncio.timeout(self._timeout):
                if self.atomic and len(messages) >= ATOMIC_AT_LEAST:
                    stored = await self._in_batches(messages)
                else:
                    stored = await self._one_by_one(messages)
        except (nats.errors.Error, TimeoutError) as exc:
            raise dependency_unavailable("nats", "message bus", exc) from exc
        results: list[list[int] | Exception] = []
        at = 0
        for group in groups:
            mine = stored[at : at + len(group)]
            at += len(group)
            failed = next((s for s in mine if isinstance(s, Exception)), None)
            results.append(failed or [int(s) for s in mine])  # type: ignore[arg-type]
        return results

    async def _in_batches(self, messages: Sequence[Message]) -> list[int | Exception]:
        stored: list[int | Exception] = []
        for start in range(0, len(messages), ATOMIC_AT_MOST):
            chunk = messages[start : start + ATOMIC_AT_MOST]
            try:
                stored += await self._atomic(chunk)
            except BatchRefused as refused:  # a repeated id, most likely: one by one
                logger.debug("atomic batch refused (%s); publishing one by one", refused)
                stored += await self._one_by_one(chunk)
        return stored

    async def _atomic(self, messages: Sequence[Message]) -> list[int | Exception]:
        """One atomic batch: every message but the last published plainly, the last
        one committing the batch and answered with its PubAck."""
        batch = uuid.uuid4().hex
        last = len(messages)
        for number, (subject, payload, headers) in enumerate(messages, 1):
            marked = {**headers, _BATCH_ID: batch, _BATCH_SEQUENCE: str(number)}
            if number < last:
                await self._nc.publish(subject, payload, headers=marked)
                continue
            marked[_BATCH_COMMIT] = "1"
            reply = await self._nc.request(subject, payload, headers=marked, timeout=self._timeout)
        ack = json.loads(reply.data)
        if "error" in ack:
            raise BatchRefused(ack["error"])
        end = int(ack["seq"])
        return list(range(end - last + 1, end + 1))

    async def _one_by_one(self, messages: Sequence[Message]) -> list[int | Exception]:
        """Single publishes, their acks awaited together (in the order sent: one
        connection keeps it)."""
        acks: list[asyncio.Future[js_api.PubAck]] = []
        try:
            for subject, payload, headers in messages:
                acks.append(await self._singles.publish_async(subject, payload, dict(headers)))
            answers = await asyncio.gather(*acks, return_exceptions=True)
        finally:
            for ack in acks:  # on failure: no future left waiting in the client
                ack.cancel()
        stored: list[int | Exception] = []
        for answer in answers:
            if isinstance(answer, nats.errors.Error):
                stored.append(dependency_unavailable("nats", "message bus", answer))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                stored.append(int(answer.seq))
        return stored
