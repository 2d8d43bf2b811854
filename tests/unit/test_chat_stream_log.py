"""The chat session log's appends and flush, on a fake JetStream whose acks the test
resolves: a flush waits for the appends made before it and fails only those, never an
append another session made meanwhile."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.stream import StreamLog


class FakeJetStream:
    """publish_async hands out futures the test resolves (PubAck-like results)."""

    def __init__(self) -> None:
        self.acks: list[asyncio.Future[SimpleNamespace]] = []

    async def publish_async(self, subject: str, payload: bytes, **_: object):
        ack: asyncio.Future[SimpleNamespace] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


def frame() -> pb.ConverseResponse:
    return pb.ConverseResponse(error=pb.ErrorFrame())


async def test_a_flush_leaves_other_sessions_appends_made_meanwhile_alone() -> None:
    js = FakeJetStream()
    log = StreamLog(js)  # type: ignore[arg-type]
    first = await log.append("a", frame())
    flushing = asyncio.ensure_future(log.flush())
    await asyncio.sleep(0)  # the flush is waiting for a's ack
    later = await log.append("b", frame())  # b appends while a's session flushes
    js.acks[0].set_result(SimpleNamespace(seq=1))
    await flushing
    assert await first == 1
    assert not later.done()  # b's append is still waiting for its own ack, not failed
    js.acks[1].set_result(SimpleNamespace(seq=2))
    assert await later == 2
    assert log.appended("b") == 2
