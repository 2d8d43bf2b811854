"""Coalesced JetStream publishes (`StreamPublisher`), against a fake connection that
records what would go to NATS: single publishes when a flush is small, atomic batches
when it is large, one by one again when NATS refuses a batch, results per caller."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import nats
import pytest

from services.execution import publisher as pub
from services.execution.publisher import SinglePublishes, StreamPublisher
from services.runtime import SwitchboardError


class FakeStream:
    """A stream's sequence, as NATS keeps it: single publishes and committed batches
    append, a batch holding a seen id is refused whole."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes]] = []
        self.seen: dict[str, int] = {}
        """Message id -> its sequence (a repeat is answered with the original's)."""
        self.singles = 0
        self.batches: list[list[dict[str, str]]] = []
        self._pending: dict[str, list[tuple[str, bytes, dict[str, str]]]] = {}
        self.failing: set[bytes] = set()
        """Payloads whose single publish NATS answers with an error."""
        self.gate: asyncio.Event | None = None
        """While set and not yet released, single publishes wait for it."""
        self.held = asyncio.Event()
        """Set once a single publish waits at the gate."""

    def store(self, subject: str, payload: bytes, msg_id: str) -> int:
        if msg_id not in self.seen:
            self.stored.append((subject, payload))
            self.seen[msg_id] = len(self.stored)
        return self.seen[msg_id]


class FakeJetStream:
    def __init__(self, stream: FakeStream) -> None:
        self._stream = stream

    async def publish_async(self, subject, payload, headers):
        stream = self._stream
        stream.singles += 1
        if stream.gate is not None:
            stream.held.set()
            await stream.gate.wait()
        ack: asyncio.Future = asyncio.get_running_loop().create_future()
        if payload in stream.failing:
            ack.set_exception(nats.js.errors.APIError(description="maximum payload exceeded"))
        else:
            ack.set_result(
                SimpleNamespace(seq=stream.store(subject, payload, headers["Nats-Msg-Id"]))
            )
        return ack


class FakeConnection:
    def __init__(self, stream: FakeStream) -> None:
        self._stream = stream

    async def publish(self, subject, payload, headers):
        self._stream._pending.setdefault(headers[pub._BATCH_ID], []).append(
            (subject, payload, headers)
        )

    async def request(self, subject, payload, headers, timeout):
        stream = self._stream
        batch = [*stream._pending.pop(headers[pub._BATCH_ID], []), (subject, payload, headers)]
        stream.batches.append([h for _, _, h in batch])
        numbers = [int(h[pub._BATCH_SEQUENCE]) for _, _, h in batch]
        assert numbers == list(range(1, len(batch) + 1))
        assert headers[pub._BATCH_COMMIT] == "1"
        if any(h["Nats-Msg-Id"] in stream.seen for _, _, h in batch):
            error = {"code": 400, "err_code": 10201, "description": "duplicate message id"}
            return SimpleNamespace(data=json.dumps({"error": error}).encode())
        for s, p, h in batch:
            end = stream.store(s, p, h["Nats-Msg-Id"])
        ack = {"stream": "S", "seq": end, "batch": headers[pub._BATCH_ID], "count": len(batch)}
        return SimpleNamespace(data=json.dumps(ack).encode())


def publisher(stream: FakeStream, *, atomic: bool = True) -> StreamPublisher:
    singles = SinglePublishes(FakeJetStream(stream))  # type: ignore[arg-type]
    return StreamPublisher(FakeConnection(stream), singles, atomic=atomic, timeout=5.0)  # type: ignore[arg-type]


def messages(prefix: str, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    return [
        (f"sb.events.{prefix}", f"{prefix}-{i}".encode(), {"Nats-Msg-Id": f"{prefix}:{i}"})
        for i in range(count)
    ]


async def test_a_small_flush_is_published_one_by_one_in_order():
    stream = FakeStream()
    sequences = await publisher(stream).publish(messages("a", 3))
    assert sequences == [1, 2, 3]
    assert stream.singles == 3 and stream.batches == []
    assert [p for _, p in stream.stored] == [b"a-0", b"a-1", b"a-2"]


async def test_a_large_flush_is_one_atomic_batch_whose_sequences_each_caller_gets():
    stream = FakeStream()
    sequences = await publisher(stream).publish(messages("a", pub.ATOMIC_AT_LEAST))
    assert sequences == list(range(1, pub.ATOMIC_AT_LEAST + 1))
    assert stream.singles == 0
    assert [len(b) for b in stream.batches] == [pub.ATOMIC_AT_LEAST]
    # the message's own headers travel with the batch's
    assert stream.batches[0][0]["Nats-Msg-Id"] == "a:0"


async def test_callers_queued_behind_a_flush_share_the_next_one_in_their_order():
    stream = FakeStream()
    publishing = publisher(stream)
    stream.gate = asyncio.Event()
    first = asyncio.create_task(publishing.publish(messages("first", 1)))
    await stream.held.wait()  # the first flush has started and waits on NATS
    later = [asyncio.create_task(publishing.publish(messages(f"t{i}", 2))) for i in range(10)]
    await asyncio.sleep(0)  # one turn of the loop: each caller queues its messages
    stream.gate.set()
    assert await first == [1]
    results = await asyncio.gather(*later)
    assert [len(b) for b in stream.batches] == [20]  # the ten callers' messages, one batch
    assert results == [[2 + 2 * i, 3 + 2 * i] for i in range(10)]
    assert [p for _, p in stream.stored][1:3] == [b"t0-0", b"t0-1"]


async def test_a_refused_batch_is_published_one_by_one_and_its_repeats_are_dropped():
    stream = FakeStream()
    publishing = publisher(stream)
    await publishing.publish(messages("a", 2))  # stored once already
    again = messages("a", 2) + messages("b", pub.ATOMIC_AT_LEAST)  # a republish among new
    sequences = await publishing.publish(again)
    assert len(stream.batches) == 1  # tried, refused whole
    assert sequences == list(range(1, 3 + pub.ATOMIC_AT_LEAST))  # the repeats: their own
    assert [p for _, p in stream.stored] == [p for _, p, _ in messages("a", 2)] + [
        p for _, p, _ in messages("b", pub.ATOMIC_AT_LEAST)
    ]


async def test_a_stream_without_atomic_batches_gets_single_publishes():
    stream = FakeStream()
    await publisher(stream, atomic=False).publish(messages("a", 40))
    assert stream.batches == [] and stream.singles == 40


async def test_batches_hold_at_most_atomic_at_most_messages():
    stream = FakeStream()
    count = pub.ATOMIC_AT_MOST + 20
    sequences = await publisher(stream).publish(messages("a", count))
    assert sequences == list(range(1, count + 1))
    assert [len(b) for b in stream.batches] == [pub.ATOMIC_AT_MOST, 20]


async def test_a_message_nats_refuses_fails_its_caller_alone():
    stream = FakeStream()
    publishing = publisher(stream)
    stream.failing = {b"bad-0"}
    stream.gate = asyncio.Event()
    first = asyncio.create_task(publishing.publish(messages("first", 1)))
    await stream.held.wait()
    bad = asyncio.create_task(publishing.publish(messages("bad", 1)))
    good = asyncio.create_task(publishing.publish(messages("good", 2)))
    await asyncio.sleep(0)  # one turn of the loop: both callers queue their messages
    stream.gate.set()
    assert await first == [1]
    with pytest.raises(SwitchboardError) as refused:
        await bad
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert await good == [2, 3]
