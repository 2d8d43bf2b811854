"""Where a stream on another chat replica starts in a session's shared events
(`shared.start_after`): after the id it saw, across an owner's death, or at the turn in
progress."""

from __future__ import annotations

import pytest
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Expired
from services.chat.shared import pack, start_after, unpack


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
