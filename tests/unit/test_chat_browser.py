"""The browser's chat contract without a network: SendMessage's detached turns (they
outlive every stream, and a resend is answered once), StreamEvents starting at the turn
in progress (its events held however many there are) or after an event id, and
CancelTurn."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import EventLog, Expired
from services.chat.live import Hub, Limits, Reader
from services.runtime import FailedPrecondition, NotFound, ResourceExhausted
from tests.polling import eventually
from tests.unit.test_chat_live import SID, Store, opening

Emit = Callable[[pb.ConverseResponse], Awaitable[object]]


class HeldTurn:
    """A turn that announces itself, streams a token, then waits to be let go."""

    def __init__(self, text: str, emit: Emit, gate: asyncio.Event, ended: list[str]) -> None:
        self.text = text
        self.assistant_id = f"answer-to-{text}"
        self._emit = emit
        self._gate = gate
        self._ended = ended

    async def run(self) -> None:
        frame = pb.ConverseResponse(message_id=self.assistant_id)
        frame.turn_started.assistant_message_id = self.assistant_id
        await self._emit(frame)
        await self._emit(pb.ConverseResponse(message_id=self.assistant_id, token={"text": "x"}))
        try:
            await self._gate.wait()
        except asyncio.CancelledError:
            self._ended.append(f"{self.text}: cancelled")
            raise
        self._ended.append(f"{self.text}: completed")


class HeldTurns:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.ended: list[str] = []

    def turn(self, tenant_id, session_id, settings, message, *, emit, **_: object) -> HeldTurn:
        return HeldTurn(message.text, emit, self.gate, self.ended)


def hub(**limits: float) -> tuple[Hub, HeldTurns]:
    turns = HeldTurns()
    return Hub(Store(), turns, Limits(**limits)), turns  # type: ignore[arg-type]


def send(text: str, client_id: str = "") -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        session_id=SID, message=pb.UserMessage(client_message_id=client_id or text, text=text)
    )


async def read(reader: Reader) -> pb.ConverseResponse:
    async with asyncio.timeout(2):
        frame = await reader.next()
    assert frame is not None
    return frame


async def until(check: Callable[[], bool]) -> None:
    """Lets the ready tasks run until `check` holds (no timed sleeps)."""
    await eventually(check, timeout=2, interval=0)


async def test_a_sent_message_is_answered_once_however_often_it_is_resent():
    chat, turns = hub()
    first = await chat.send("acme", send("hello", "m-1"))
    again = await chat.send("acme", send("hello", "m-1"))
    assert first.accepted and not again.accepted
    turns.gate.set()
    await until(lambda: turns.ended == ["hello: completed"])
    assert not (await chat.send("acme", send("hello", "m-1"))).accepted


async def test_a_sent_message_over_the_size_limit_is_refused_by_the_call():
    chat, _ = hub(max_message_bytes=8)
    with pytest.raises(ResourceExhausted) as refused:
        await chat.send("acme", send("far too long a message"))
    assert refused.value.reason == "MESSAGE_TOO_LARGE"


async def test_a_sent_turn_outlives_its_watchers_while_a_converse_turn_is_abandoned():
    chat, turns = hub(resume_grace=0)
    # a Converse stream sends a message and drops: its turn is cancelled after the grace
    live, reader, _ = await chat.attach("acme", opening())
    await live.submit(pb.UserMessage(client_message_id="c-1", text="converse"))
    assert (await read(reader)).HasField("turn_started")
    live.detach(reader, clean=False)
    await until(lambda: turns.ended == ["converse: cancelled"])
    # a sent message's turn goes on with nobody watching, and after a watcher leaves
    await chat.send("acme", send("browser"))
    _, watcher, _ = await chat.watch("acme", SID, "")
    assert (await read(watcher)).HasField("turn_started")
    live.detach(watcher, clean=True)
    _, dropped, _ = await chat.attach("acme", opening())
    live.detach(dropped, clean=False)  # a Converse stream dropping spares it too
    for _ in range(10):
        await asyncio.sleep(0)
    assert turns.ended == ["converse: cancelled"]
    turns.gate.set()
    await until(lambda: turns.ended[-1] == "browser: completed")


async def test_a_watcher_starts_at_the_turn_in_progress_and_resumes_from_any_id():
    chat, turns = hub()
    live, before, _ = await chat.watch("acme", SID, "")  # no turn yet: new events only
    sent = await chat.send("acme", send("question"))
    started = await read(before)
    assert started.HasField("turn_started")
    token = await read(before)
    assert token.HasField("token")
    live.detach(before, clean=True)
    # a page loading now gets the turn from its start, and its first frame's id resumes
    # exactly there; so does the id SendMessage answered with
    _, reader, opened = await chat.watch("acme", SID, "")
    assert opened.HasField("opened") and opened.event_id
    assert [(await read(reader)).event_id for _ in range(2)] == [started.event_id, token.event_id]
    for after in (opened.event_id, sent.last_event_id):
        _, again, resumed = await chat.watch("acme", SID, after)
        assert resumed.event_id == after and resumed.opened.resumed
        assert (await read(again)).event_id == started.event_id
    turns.gate.set()
    await until(lambda: turns.ended == ["question: completed"])


async def test_a_resume_point_never_given_out_is_expired():
    chat, _ = hub()
    for after in ("nope", "abc.1", "0.99999"):
        with pytest.raises(FailedPrecondition) as refused:
            await chat.watch("acme", SID, after)
        assert refused.value.reason == "EVENT_HISTORY_EXPIRED"


async def test_the_turn_in_progress_is_kept_beyond_the_retention_limits():
    log = EventLog(retain=4, window=2)
    started = await log.append(pb.ConverseResponse(turn_started={}), hold=True)
    for _ in range(10):
        await log.append(pb.ConverseResponse(token={"text": "x"}))
    reader = log.attach_held()
    assert log.id_before(reader) == f"{log.incarnation}.0"
    assert (await read(reader)).event_id == started.event_id
    log.detach(reader)
    log.release()
    await log.append(pb.ConverseResponse(token={"text": "x"}))  # now trimmed to 4
    with pytest.raises(Expired):
        log.attach(started.event_id)


async def test_cancel_stops_the_answer_it_names_or_the_current_one():
    chat, turns = hub()
    await chat.send("acme", send("one"))
    _, reader, _ = await chat.watch("acme", SID, "")
    started = await read(reader)
    other = pb.CancelTurnRequest(session_id=SID, assistant_message_id="someone-else")
    assert not await chat.cancel("acme", other)
    assert await chat.cancel("acme", pb.CancelTurnRequest(session_id=SID))
    await until(lambda: turns.ended == ["one: cancelled"])
    assert started.turn_started.assistant_message_id == "answer-to-one"
    assert not await chat.cancel("acme", pb.CancelTurnRequest(session_id=SID))


async def test_an_unknown_session_is_not_found_for_each_call():
    chat, _ = hub()
    for call in (
        chat.send("acme", pb.SendMessageRequest(session_id="nope", message={"text": "hi"})),
        chat.cancel("acme", pb.CancelTurnRequest(session_id="nope")),
        chat.watch("acme", "nope", ""),
    ):
        with pytest.raises(NotFound):
            await call
