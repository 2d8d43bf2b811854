"""What one chat replica does about the others, without a network: a cancellation
asked of the replica running the turn, a turn spared when its client resumed on
another replica, and a draining replica that finishes its turns, then interrupts what
is left."""

from __future__ import annotations

import asyncio

from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.leases import TurnRecord
from services.chat.live import Hub, Limits
from services.chat.local import LocalLeases, LocalLog
from services.chat.notices import RESUMED, QuietNotices
from services.chat.recovery import interrupted
from services.runtime import SwitchboardError
from tests.polling import eventually
from tests.unit.test_chat_browser import HeldTurn, HeldTurns, read, send
from tests.unit.test_chat_live import SID, Store, opening


class Notices(QuietNotices):
    """Notices that record the cancellations asked of other replicas."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    async def cancel(self, session_id: str, assistant_id: str) -> bool:
        self.asked.append((session_id, assistant_id))
        return True


class Interruptible(HeldTurn):
    def interrupt(self, error: SwitchboardError) -> None:
        self._ended.append(f"{self.text}: interrupted ({error.reason})")

    def abandon(self) -> None:
        self._ended.append(f"{self.text}: abandoned")


class InterruptibleTurns(HeldTurns):
    def turn(self, tenant_id, session_id, settings, message, *, emit, **_: object) -> HeldTurn:
        return Interruptible(message.text, emit, self.gate, self.ended)


def replica(
    *, leases: LocalLeases | None = None, notices: Notices | None = None, **limits: float
) -> tuple[Hub, InterruptibleTurns]:
    turns = InterruptibleTurns()
    hub = Hub(
        Store(),  # type: ignore[arg-type]
        turns,  # type: ignore[arg-type]
        Limits(**limits),
        log=LocalLog(),
        leases=leases or LocalLeases(),
        notices=notices,
        replica="chat-a:1",
    )
    return hub, turns


async def until(check) -> None:
    await eventually(check, timeout=2, interval=0)


async def test_a_cancel_is_asked_of_the_replica_running_the_turn():
    leases, notices = LocalLeases(), Notices()
    hub, _ = replica(leases=leases, notices=notices)
    cancel = pb.CancelTurnRequest(session_id=SID)
    assert not await hub.cancel("acme", cancel)  # no turn anywhere: nobody is asked
    elsewhere = TurnRecord("acme", SID, "a-9", "c-9", owner="chat-b:2", after=0)
    await leases.acquire(elsewhere)
    named = pb.CancelTurnRequest(session_id=SID, assistant_message_id="not-that-one")
    assert not await hub.cancel("acme", named)
    assert notices.asked == []
    assert await hub.cancel("acme", cancel)
    assert notices.asked == [(SID, "")]


async def test_a_turn_whose_client_resumed_elsewhere_is_not_abandoned():
    hub, turns = replica(resume_grace=0)
    live, reader, _ = await hub.attach("acme", opening())
    await live.submit(pb.UserMessage(client_message_id="c-1", text="question"))
    assert (await read(reader)).HasField("turn_started")
    await hub._heard(SID, RESUMED)  # the client came back on another replica
    await live.detach(reader, clean=False)  # and its stream here drops
    for _ in range(10):
        await asyncio.sleep(0)
    assert turns.ended == []
    turns.gate.set()
    await until(lambda: turns.ended == ["question: completed"])


async def test_a_draining_replica_finishes_its_turns_then_interrupts_the_rest():
    hub, turns = replica(resume_grace=0)
    live, reader, _ = await hub.attach("acme", opening())
    await live.submit(pb.UserMessage(client_message_id="c-1", text="question"))
    await hub.send("acme", send("waiting"))
    assert (await read(reader)).HasField("turn_started")
    hub.drain()
    await live.detach(reader, clean=False)  # the stream drops as the replica stops
    for _ in range(10):
        await asyncio.sleep(0)
    assert turns.ended == []  # not abandoned: a client resuming elsewhere gets it
    await hub.finish(0, interrupted())
    assert turns.ended == ["question: interrupted (SHUTTING_DOWN)", "question: cancelled"]
    assert live.idle  # the message waiting behind it was dropped
