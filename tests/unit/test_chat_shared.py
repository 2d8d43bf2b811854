"""Where a stream on another chat replica starts in a session's shared events
(`shared_log.start_after`): after the id it saw, across an owner's death, or at the turn in
progress; and what its reader delivers (`shared_log.SharedReader`): each event once, and no
incarnation's marker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Expired
from services.chat.shared import Shared
from services.chat.shared_log import EVENT_STREAM, Scan, SharedReader, pack, start_after, unpack


def event(event_id: str, kind: str = "token") -> pb.ConverseResponse:
    frame = pb.ConverseResponse(event_id=event_id)
    if kind == "started":
        frame.turn_started.assistant_message_id = "a"
    elif kind == "completed":
        frame.turn_completed.assistant_message_id = "a"
    else:
        frame.token.text = event_id
    return frame


def ids(frames: list[pb.ConverseResponse]) -> list[str]:
    return [f.event_id for f in frames]


KEPT = [event("aa.1", "started"), event("aa.2"), event("aa.3"), event("aa.4", "completed")]


def test_a_reader_starts_after_the_event_it_saw_or_at_the_first_kept() -> None:
    assert ids(start_after(KEPT, "aa.2")) == ["aa.3", "aa.4"]
    assert ids(start_after(KEPT, "aa.4")) == []
    assert ids(start_after(KEPT, "")) == ["aa.1", "aa.2", "aa.3", "aa.4"]


def test_events_lost_with_a_dead_owner_are_skipped_for_the_next_owners() -> None:
    # the client saw aa.5 and aa.6; the owner died before they reached the shared log,
    # and the next owner numbers its events in a new incarnation
    kept = [*KEPT, event("aa.5", "started"), event("bb.1"), event("bb.2", "completed")]
    assert ids(start_after(kept, "aa.6")) == ["bb.1", "bb.2"]
    # no next owner yet: nothing to read, new events come
    assert start_after(kept[:5], "aa.6") == []


def test_ids_not_kept_are_expired() -> None:
    for stale in ("zz.1", "aa.x", "nonsense", "aa."):
        with pytest.raises(Expired):
            start_after(KEPT, stale)
    with pytest.raises(Expired):  # older than what is kept
        start_after(KEPT[2:], "aa.1")
    with pytest.raises(Expired):
        start_after([], "aa.1")


def test_a_watcher_starts_at_the_turn_in_progress_or_at_new_events() -> None:
    running = [*KEPT, event("aa.5", "started"), event("aa.6")]
    assert ids(start_after(running, "", held=True)) == ["aa.5", "aa.6"]
    assert start_after(KEPT, "", held=True) == []
    assert start_after([], "", held=True) == []


def test_events_travel_packed_several_to_a_message() -> None:
    frames = [event("aa.1", "started"), event("aa.2"), event("aa.3", "completed")]
    frames[1].token.text = "x" * 70_000  # a length of three varint bytes
    packed = pack([f.SerializeToString() for f in frames])
    assert unpack(packed) == frames
    assert unpack(pack([])) == []


def marker(event_id: str) -> pb.ConverseResponse:
    """The start of an incarnation in the shared log: an id and no frame."""
    return pb.ConverseResponse(event_id=event_id)


class _Subscription:
    async def unsubscribe(self) -> None:
        pass


class _JetStream:
    """Delivers the given messages, in order, to the one ordered consumer made."""

    def __init__(self, *batches: list[pb.ConverseResponse]) -> None:
        self._batches = batches
        self.deliver = None

    async def subscribe(self, subject, *, stream, cb, ordered_consumer, config):
        assert stream == EVENT_STREAM and ordered_consumer
        self.deliver = cb
        for sequence, frames in enumerate(self._batches, start=1):
            await cb(message(sequence, frames))
        return _Subscription()


def message(sequence: int, frames: list[pb.ConverseResponse]) -> Msg:
    ack = f"$JS.ACK.{EVENT_STREAM}.reader.1.{sequence}.{sequence}.0.0"
    return Msg(
        None,
        subject="sb.chat.events.s",
        reply=ack,
        data=pack([f.SerializeToString() for f in frames]),
    )


async def read(reader: SharedReader, count: int) -> list[str]:
    read_ids = []
    for _ in range(count):
        frame = await reader.next()
        assert frame is not None
        read_ids.append(frame.event_id)
    return read_ids


async def open_reader(js: _JetStream, after: str, caught_up: int) -> SharedReader:
    return await SharedReader.open(
        js,  # type: ignore[arg-type]
        "sb.chat.events.s",
        js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL),
        after,
        Scan(after, held=False, caught_up=caught_up),
    )


async def test_a_first_event_lost_with_its_owner_is_found_by_its_incarnations_marker() -> None:
    # the owner aa stored its marker, sent aa.1 to its client and died before sharing it;
    # bb took over. Without aa's marker, aa.1 would name no incarnation kept: expired.
    kept = [marker("aa.0"), marker("bb.0"), event("bb.1", "completed")]
    with pytest.raises(Expired):
        start_after(kept[1:], "aa.1")
    reader = await open_reader(_JetStream(kept[:2], kept[2:]), "aa.1", caught_up=2)
    assert await read(reader, 1) == ["bb.1"]
    assert reader.waiting == []
    await reader.close()


async def test_a_reader_delivers_an_event_once_and_no_marker() -> None:
    # the client saw aa.3 from the owner before aa.2 and aa.3 reached the shared log:
    # the scan finds aa.1 only, and aa.2 and aa.3 come again after it
    js = _JetStream([marker("aa.0"), event("aa.1", "started")])
    reader = await open_reader(js, "aa.3", caught_up=1)
    assert reader.waiting == []
    await js.deliver(message(2, [event("aa.2"), event("aa.3"), event("aa.4")]))
    await js.deliver(message(3, [marker("bb.0"), event("bb.1", "completed")]))
    assert await read(reader, 2) == ["aa.4", "bb.1"]
    await reader.close()


class _Bucket:
    """The owners' key-value bucket, in memory (create and compare-and-set as NATS's)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}

    async def get(self, key: str) -> SimpleNamespace:
        if key not in self.entries:
            raise KeyNotFoundError
        value, revision = self.entries[key]
        return SimpleNamespace(value=value, revision=revision)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.entries:
            raise KeyWrongLastSequenceError
        self.entries[key] = (value, 1)
        return 1

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.entries[key][1] != last:
            raise KeyWrongLastSequenceError
        self.entries[key] = (value, last + 1)
        return last + 1


async def test_a_claim_left_by_a_failed_load_of_ours_looks_for_the_interrupted_turn() -> None:
    shared = Shared("nats://127.0.0.1:1")  # never connected: the bucket is in memory
    shared._kv = bucket = _Bucket()  # type: ignore[assignment]
    first = await shared.claim("s1")
    assert (first.mine, first.taken_over) == (True, False)  # nobody owned it
    # the load that claimed it failed (NATS away before the session was live here): the
    # key names this process, and loading it again must look for an interrupted turn, as
    # the takeover that load may have been halfway through would have
    again = await shared.claim("s1")
    assert (again.mine, again.taken_over) == (True, True)
    assert bucket.entries["s1"] == (shared.subject.encode(), 1)  # the same claim
