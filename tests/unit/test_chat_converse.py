"""Pure logic of Converse: the session log (resume points, flow control, retention),
interrupted turns read back from it, and tool requests."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.commands import RUN_CODE, ToolRequest, check_allowed, parse_tool_request
from services.chat.events import Bounds, Expired, event_id, start_after
from services.chat.leases import TurnRecord
from services.chat.local import LocalLog, LocalReader
from services.chat.recovery import partial_answer
from services.runtime import InvalidArgument, PermissionDenied

SID = "session-a"


def token(text: str, message_id: str = "") -> pb.ConverseResponse:
    frame = pb.ConverseResponse(message_id=message_id)
    frame.token.text = text
    return frame


async def resume(log: LocalLog, after: str) -> LocalReader:
    return await log.follow(SID, start_after(after, epoch=log.epoch, bounds=await log.bounds(SID)))


async def new_events(log: LocalLog) -> LocalReader:
    return await log.follow(SID, (await log.bounds(SID)).last + 1)


async def test_events_are_numbered_and_a_reader_resumes_after_the_last_one_seen():
    log = LocalLog(retain=10, window=5)
    first = await new_events(log)
    for word in "a b c".split():
        await log.append(SID, token(word))
        await log.append("another-session", token(word))  # one numbering for all
    seen = [await first.next() for _ in range(2)]
    assert [f.token.text for f in seen] == ["a", "b"]
    assert [f.event_id for f in seen] == [event_id(log.epoch, 1), event_id(log.epoch, 3)]
    await first.close()
    again = await resume(log, seen[-1].event_id)
    assert (await again.next()).token.text == "c"
    everything = await log.follow(SID, 1)
    assert [(await everything.next()).token.text for _ in range(3)] == ["a", "b", "c"]
    assert await log.latest(SID) == 5 and log.appended(SID) == 5


async def test_old_or_foreign_event_ids_are_expired():
    log = LocalLog(retain=3, window=2)
    for word in "a b c d e".split():
        await log.append(SID, token(word))  # no readers: nothing holds the producer back
    with pytest.raises(Expired):
        await resume(log, f"{log.epoch}.1")  # 3..5 are retained: event 2 is gone
    await resume(log, f"{log.epoch}.2")  # the next one (3) is retained
    for bad in ("other.3", f"{log.epoch}.9", f"{log.epoch}.x", "junk"):
        with pytest.raises(Expired):
            await resume(log, bad)


@pytest.mark.parametrize("number", ["\u0663", "\u00b2", "1" * 19, "-1", "", "2.5"])
def test_a_resume_point_is_read_only_as_ascii_digits_the_log_could_have_given_out(number):
    with pytest.raises(Expired):
        start_after(f"e.{number}", epoch="e", bounds=Bounds(last=10**20))


def test_a_resume_point_needs_every_later_event_of_its_session_retained():
    bounds = Bounds(last=50, lost_before=20)  # the session's events up to 20 may be gone
    assert start_after("e.20", epoch="e", bounds=bounds) == 21
    assert start_after("e.50", epoch="e", bounds=bounds) == 51  # where new events start
    for after in ("e.19", "e.51", "f.30", "e.0"):
        with pytest.raises(Expired):
            start_after(after, epoch="e", bounds=bounds)
    assert start_after("e.0", epoch="e", bounds=Bounds(last=0)) == 1  # a fresh log


async def test_a_slow_reader_holds_the_producer_back_instead_of_buffering():
    log = LocalLog(retain=100, window=4)
    reader = await new_events(log)
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for i in range(20):
            await log.append(SID, token(str(i)))
            produced += 1

    producer = asyncio.create_task(produce())
    for _ in range(100):  # the producer runs whenever it can: it stops at the window
        await asyncio.sleep(0)
    assert produced == 4  # the window is full; nothing more is buffered
    got = [(await reader.next()).token.text for _ in range(20)]
    await asyncio.wait_for(producer, 1)
    assert got == [str(i) for i in range(20)]
    await reader.close()


async def test_a_detached_reader_does_not_hold_the_producer():
    log = LocalLog(retain=100, window=2)
    reader = await new_events(log)
    await reader.close()
    for i in range(10):
        await asyncio.wait_for(log.append(SID, token(str(i))), 1)


async def test_finish_ends_a_reader_after_the_events_named_and_fail_raises():
    log = LocalLog()
    reader = await new_events(log)
    await log.append(SID, token("x"))
    reader.finish(log.appended(SID))
    assert (await reader.next()).token.text == "x"
    assert await reader.next() is None
    other = await new_events(log)
    other.fail(RuntimeError("gone"))
    with pytest.raises(RuntimeError):
        await other.next()


def test_an_interrupted_answer_is_read_back_from_its_events():
    started = pb.ConverseResponse(message_id="a-1", turn_started=pb.TurnStarted())
    frames = [
        token("not ", "a-0"),  # an earlier turn's
        started,
        token("half ", "a-1"),
        pb.ConverseResponse(settings_changed=pb.SettingsChanged()),
        token("an answer", "a-1"),
    ]
    partial = partial_answer(frames, "a-1")
    assert partial.started and not partial.completed
    assert partial.text == "half an answer" and len(partial.tokens) == 2
    done = pb.ConverseResponse(message_id="a-1", turn_completed=pb.TurnCompleted())
    assert partial_answer([*frames, done], "a-1").completed
    assert not partial_answer(frames[:1], "a-1").started


def test_a_turn_record_survives_its_encoding_and_says_where_the_turn_starts():
    record = TurnRecord("t", "s", "a-1", "c-1", owner="chat-0:12", after=41, expires=1.5)
    assert TurnRecord.decode(record.encode()) == record
    assert record.start == 42  # before its TurnStarted is in the log: after what it saw


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is the refund policy?", None),
        ("/tool list_models", ToolRequest("list_models", {})),
        ('/tool embed {"texts": ["a"]}', ToolRequest("embed", {"texts": ["a"]})),
        ("/code\nprint(1)", ToolRequest(RUN_CODE, {"code": "print(1)"})),
        ("Run:\n```python\nx = 2\n```", ToolRequest(RUN_CODE, {"code": "x = 2\n"})),
    ],
)  # fmt: skip
def test_tool_requests_are_read_from_messages(text, expected):
    assert parse_tool_request(text) == expected


@pytest.mark.parametrize(
    "text", ["/tool", "/tool 1bad", "/tool x {nope", "/tool x [1, 2]", "/code", "/code\n  "]
)
def test_malformed_tool_requests_are_invalid(text):
    with pytest.raises(InvalidArgument) as err:
        parse_tool_request(text)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_only_allowed_tools_and_code_run():
    settings = pb.SessionSettings(allowed_tools=["list_models"])
    check_allowed(ToolRequest("list_models"), settings)
    for request in (ToolRequest("embed"), ToolRequest(RUN_CODE, {"code": "1"})):
        with pytest.raises(PermissionDenied) as err:
            check_allowed(request, settings)
        assert err.value.reason == "TOOL_NOT_ALLOWED"
    check_allowed(ToolRequest(RUN_CODE, {"code": "1"}), pb.SessionSettings(code_enabled=True))


async def test_retention_is_bounded_in_bytes_but_keeps_what_a_reader_needs():
    log = LocalLog(retain=100, window=50, retain_bytes=1000)
    slow = await new_events(log)
    for _ in range(40):
        await log.append(SID, token("x" * 100))  # ~105 bytes each
    first = await slow.next()  # the attached reader still gets everything
    assert first.event_id == f"{log.epoch}.1"
    await slow.close()
    await log.append(SID, token("y" * 100))  # now the budget applies
    with pytest.raises(Expired):
        await resume(log, first.event_id)
    kept = await log.follow(SID, 1)
    texts = []
    while (frame := await asyncio.wait_for(kept.next(), 1)).token.text != "y" * 100:
        texts.append(frame)
    assert 0 < sum(f.ByteSize() for f in texts) <= 1000
