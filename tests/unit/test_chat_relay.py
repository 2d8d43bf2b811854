"""The owner's side of a session shared by chat replicas, without a network: what other
replicas' streams relay to it (`Hub.relayed`), and a draining replica (`Hub.drain`):
its streams told to resume elsewhere, its turns left to finish."""

from __future__ import annotations

import asyncio

import pytest
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.live import Hub, Limits
from services.chat.shared import Moved
from services.runtime import NotFound, Unavailable
from tests.polling import eventually
from tests.unit.test_chat_live import SID, Store, next_frame, opening


class HeldTurn:
    """A turn that runs until it is let go (or cancelled)."""

    def __init__(self, text: str, turns: HeldTurns) -> None:
        self.text = text
        self.assistant_id = f"answer-{text}"
        self._turns = turns

    async def run(self) -> None:
        self._turns.running.append(self.text)
        try:
            await self._turns.go.wait()
        except asyncio.CancelledError:
            self._turns.cancelled.append(self.text)
            raise
        self._turns.finished.append(self.text)


class HeldTurns:
    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.running: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    def turn(self, tenant_id, session_id, settings, message, **_: object) -> HeldTurn:
        return HeldTurn(message.text, self)


def hub(turns: HeldTurns, **limits: float) -> Hub:
    return Hub(Store(), turns, Limits(**limits))  # type: ignore[arg-type]


def message(text: str) -> bytes:
    return pb.ConverseRequest(
        message=pb.UserMessage(client_message_id=text, text=text)
    ).SerializeToString()


async def test_a_session_not_owned_here_is_answered_moved() -> None:
    chat = hub(HeldTurns())
    for op in ("owns", "frame", "send", "cancel", "attach", "idle"):
        with pytest.raises(Moved):
            await chat.relayed(op, "acme", SID, b"", {})


async def test_relayed_frames_and_messages_run_as_the_owner_s_turns() -> None:
    turns = HeldTurns()
    chat = hub(turns)
    live, reader, _ = await chat.attach("acme", opening())
    assert await chat.relayed("owns", "", SID, b"", {}) == b"1"
    await chat.relayed("frame", "acme", SID, message("first"), {})
    await eventually(lambda: turns.running == ["first"])
    sent = pb.SendMessageRequest(
        session_id=SID, message=pb.UserMessage(client_message_id="second", text="second")
    )
    reply = pb.SendMessageResponse.FromString(
        await chat.relayed("send", "acme", SID, sent.SerializeToString(), {})
    )
    assert reply.accepted
    again = pb.SendMessageResponse.FromString(
        await chat.relayed("send", "acme", SID, sent.SerializeToString(), {})
    )
    assert not again.accepted  # the same client_message_id is answered once
    cancel = pb.CancelTurnRequest(session_id=SID, assistant_message_id="answer-first")
    assert await chat.relayed("cancel", "acme", SID, cancel.SerializeToString(), {}) == b"1"
    await eventually(lambda: turns.cancelled == ["first"])
    turns.go.set()
    await eventually(lambda: turns.finished == ["second"])
    state, _, last = (await chat.relayed("idle", "acme", SID, b"", {})).decode().partition(":")
    assert state == "idle" and last == live.log.last_event_id
    live.detach(reader, clean=True)


async def test_another_tenant_is_refused_even_by_the_owner() -> None:
    chat = hub(HeldTurns())
    await chat.attach("acme", opening())
    with pytest.raises(NotFound) as err:
        await chat.relayed("frame", "other", SID, message("x"), {})
    assert err.value.reason == "SESSION_NOT_FOUND"


async def test_a_remote_stream_that_drops_starts_the_grace_period_as_a_local_one() -> None:
    turns = HeldTurns()
    chat = hub(turns, resume_grace=0.01)
    live, reader, _ = await chat.attach("acme", opening())
    await chat.relayed("frame", "acme", SID, message("first"), {})
    await eventually(lambda: turns.running == ["first"])
    await chat.relayed("attach", "acme", SID, b"", {})  # a stream on another replica
    live.detach(reader, clean=False)  # the local one drops: the remote one still reads
    assert live._grace is None  # no grace period runs: nothing will cancel the turn
    await chat.relayed("detach", "acme", SID, b"", {"Sb-Clean": "0"})  # it drops too
    await eventually(lambda: turns.cancelled == ["first"])


async def test_a_draining_replica_tells_its_streams_to_go_and_lets_its_turns_finish() -> None:
    turns = HeldTurns()
    chat = hub(turns, resume_grace=0.01)
    live, reader, _ = await chat.attach("acme", opening())
    await chat.relayed("frame", "acme", SID, message("first"), {})
    await eventually(lambda: turns.running == ["first"])
    draining = asyncio.create_task(chat.drain(within=5))
    with pytest.raises(Unavailable) as err:
        while True:
            await next_frame(reader)
    assert err.value.reason == "SHUTTING_DOWN"
    live.detach(reader, clean=False)  # the client resumes elsewhere: nothing is cancelled
    with pytest.raises(Unavailable):  # and new streams go elsewhere too
        await chat.attach("acme", opening())
    assert live._grace is None  # the stream's leaving started no grace period
    assert not draining.done() and turns.cancelled == []
    turns.go.set()
    await asyncio.wait_for(draining, 2)
    assert turns.finished == ["first"]
    with pytest.raises(Moved):  # let go: the next replica to serve it claims it
        await chat.relayed("owns", "", SID, b"", {})
