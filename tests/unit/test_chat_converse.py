"""Pure logic of Converse: the event log (resume, flow control) and tool requests."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.commands import RUN_CODE, ToolRequest, check_allowed, parse_tool_request
from services.chat.events import EventLog, Expired
from services.runtime import InvalidArgument, PermissionDenied


def token(text: str) -> pb.ConverseResponse:
    frame = pb.ConverseResponse()
    frame.token.text = text
    return frame


async def test_events_are_numbered_and_a_reader_resumes_after_the_last_one_seen():
    log = EventLog(retain=10, window=5)
    first = log.attach()
    for word in "a b c".split():
        await log.append(token(word))
    seen = [await first.next() for _ in range(2)]
    assert [f.token.text for f in seen] == ["a", "b"]
    log.detach(first)
    again = log.attach(seen[-1].event_id)
    assert (await again.next()).token.text == "c"
    everything = log.attach("")
    assert [(await everything.next()).token.text for _ in range(3)] == ["a", "b", "c"]
    assert log.last_event_id.endswith(".3")


async def test_old_or_foreign_event_ids_are_expired():
    log = EventLog(retain=3, window=2)
    for word in "a b c d e".split():
        await log.append(token(word))  # no readers: nothing holds the producer back
    with pytest.raises(Expired):
        log.attach(f"{log.incarnation}.1")  # 3..5 are retained: event 2 is gone
    log.attach(f"{log.incarnation}.2")  # the next one (3) is retained
    for bad in ("other.3", f"{log.incarnation}.9", f"{log.incarnation}.x", "junk"):
        with pytest.raises(Expired):
            log.attach(bad)


async def test_a_slow_reader_holds_the_producer_back_instead_of_buffering():
    log = EventLog(retain=100, window=4)
    reader = log.attach()
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for i in range(20):
            await log.append(token(str(i)))
            produced += 1

    producer = asyncio.create_task(produce())
    for _ in range(100):  # the producer runs whenever it can: it stops at the window
        await asyncio.sleep(0)
    assert produced == 4  # the window is full; nothing more is buffered
    got = [(await reader.next()).token.text for _ in range(20)]
    await asyncio.wait_for(producer, 1)
    assert got == [str(i) for i in range(20)]
    log.detach(reader)


async def test_a_detached_reader_does_not_hold_the_producer():
    log = EventLog(retain=100, window=2)
    reader = log.attach()
    log.detach(reader)
    for i in range(10):
        await asyncio.wait_for(log.append(token(str(i))), 1)


async def test_finish_ends_a_reader_after_what_was_appended_and_fail_raises():
    log = EventLog()
    reader = log.attach()
    await log.append(token("x"))
    reader.finish()
    assert (await reader.next()).token.text == "x"
    assert await reader.next() is None
    other = log.attach()
    other.fail(RuntimeError("gone"))
    with pytest.raises(RuntimeError):
        await other.next()


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
    log = EventLog(retain=100, window=50, retain_bytes=1000)
    slow = log.attach()
    for _ in range(40):
        await log.append(token("x" * 100))  # ~105 bytes each
    first = await slow.next()  # the attached reader still gets everything
    assert first.event_id == f"{log.incarnation}.1"
    log.detach(slow)
    await log.append(token("y" * 100))  # now the budget applies
    with pytest.raises(Expired):
        log.attach(first.event_id)
    kept = log.attach("")
    texts = []
    while (frame := await asyncio.wait_for(kept.next(), 1)).token.text != "y" * 100:
        texts.append(frame)
    assert 0 < sum(f.ByteSize() for f in texts) <= 1000
