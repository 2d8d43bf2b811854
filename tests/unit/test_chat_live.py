"""Live sessions without a network: each Converse frame checked against its contract
(the first one ending the stream, later ones answered with an ErrorFrame), resume
points that were never given out, and deletion by any spelling of a session id."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import EventLog, Expired
from services.chat.live import Hub, Limits, LiveSession, Reader
from services.chat.store import canonical_id
from services.runtime import FailedPrecondition, InvalidArgument, NotFound, error_details

SID = "0f0e0d0c-0b0a-4908-8706-050403020100"


class Session:
    """A hub over sessions that always load, and turns that only record their message."""

    def __init__(self) -> None:
        self.turns: list[str] = []
        self.hub = Hub(
            load=self._load, run_turn=self._run, change_settings=self._change, limits=Limits()
        )

    async def _load(self, tenant: str, session_id: str) -> tuple[pb.Session, set[str]]:
        return pb.Session(session_id=canonical_id(session_id)), set()

    async def _run(self, live: LiveSession, message: pb.UserMessage) -> None:
        self.turns.append(message.text)

    async def _change(self, live: LiveSession, change: pb.ChangeSettings) -> pb.Session:
        return pb.Session(session_id=live.session_id, settings=change.settings)


def opening(session_id: str = SID) -> pb.ConverseRequest:
    return pb.ConverseRequest(open=pb.OpenSession(session_id=session_id))


async def frames_of(queue: asyncio.Queue[pb.ConverseRequest | None]):
    while (frame := await queue.get()) is not None:
        yield frame


async def next_frame(reader: Reader) -> pb.ConverseResponse:
    async with asyncio.timeout(2):
        frame = await reader.next()
    assert frame is not None
    return frame


def violations(frame: pb.ConverseResponse) -> list[str]:
    return [v.field for v in error_details(frame.error.status).field_violations]


async def test_a_first_frame_breaking_its_rules_ends_the_stream():
    session = Session()
    with pytest.raises(InvalidArgument) as exc:
        await session.hub.attach("acme", opening("s" * 65))
    assert [v.field for v in exc.value.field_violations] == ["open.session_id"]
    resume = pb.ResumeSession(session_id=SID, last_event_id="1" * 5000)
    with pytest.raises(InvalidArgument) as exc:
        await session.hub.attach("acme", pb.ConverseRequest(resume=resume))
    assert [v.field for v in exc.value.field_violations] == ["resume.last_event_id"]


@pytest.mark.parametrize("number", ["\u0663", "\u00b2", "1" * 50, "-1", ""])
async def test_a_resume_point_no_log_gave_out_is_history_expired_not_internal(number):
    session = Session()
    live, _, _ = await session.hub.attach("acme", opening())
    resume = pb.ResumeSession(session_id=SID, last_event_id=f"{live.log.incarnation}.{number}")
    with pytest.raises(FailedPrecondition) as exc:
        await session.hub.attach("acme", pb.ConverseRequest(resume=resume))
    assert exc.value.reason == "EVENT_HISTORY_EXPIRED"


def test_the_event_log_reads_only_ascii_event_numbers_it_could_have_given_out():
    log = EventLog()
    for number in ("\u0663", "\u00b2", "1" * 4301, "9" * 19):
        with pytest.raises(Expired):
            log.attach(f"{log.incarnation}.{number}")
    log.attach(f"{log.incarnation}.0")  # before the first event: every event


async def test_later_frames_breaking_their_rules_get_error_frames_and_the_stream_stays():
    session = Session()
    live, reader, _ = await session.hub.attach("acme", opening())
    queue: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
    serving = asyncio.create_task(session.hub.serve(live, reader, frames_of(queue)))
    mask = field_mask_pb2.FieldMask(paths=["tier"])
    long_id = "c" * 200
    for frame in (
        pb.ConverseRequest(message=pb.UserMessage(text="hi", client_message_id=long_id)),
        pb.ConverseRequest(message=pb.UserMessage(text=" \t")),
        pb.ConverseRequest(cancel=pb.CancelTurn(assistant_message_id="a" * 65)),
        pb.ConverseRequest(settings=pb.ChangeSettings(settings=pb.SessionSettings(tier=1))),
        pb.ConverseRequest(
            settings=pb.ChangeSettings(settings=pb.SessionSettings(tier=9), update_mask=mask)
        ),
    ):
        queue.put_nowait(frame)
    expected = [
        ["message.client_message_id"],
        ["message.text"],
        ["cancel.assistant_message_id"],
        ["settings.update_mask"],
        ["settings.settings.tier"],
    ]
    for fields in expected:
        frame = await next_frame(reader)
        assert frame.error.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert violations(frame) == fields
        if fields == ["message.client_message_id"]:
            assert frame.error.client_message_id == long_id[:128]  # what is echoed is bounded
    # the size limit comes first, as its own RESOURCE_EXHAUSTED
    big = pb.UserMessage(text=" " * (33 * 1024), client_message_id="c" * 129)
    queue.put_nowait(pb.ConverseRequest(message=big))
    frame = await next_frame(reader)
    assert error_details(frame.error.status).error_info.reason == "MESSAGE_TOO_LARGE"
    # and the stream still works
    good = pb.ChangeSettings(settings=pb.SessionSettings(tier=1), update_mask=mask)
    queue.put_nowait(pb.ConverseRequest(settings=good))
    assert (await next_frame(reader)).settings_changed.session.settings.tier == 1
    queue.put_nowait(pb.ConverseRequest(message=pb.UserMessage(text="hello")))
    queue.put_nowait(None)
    async with asyncio.timeout(2):
        await serving
    assert session.turns == ["hello"]


async def test_deleting_a_session_by_any_spelling_of_its_id_ends_its_streams():
    session = Session()
    live, reader, _ = await session.hub.attach("acme", opening(SID.upper()))
    assert live.session_id == SID
    session.hub.delete("not a session id")  # nothing to end
    session.hub.delete(SID.upper())
    with pytest.raises(NotFound):
        async with asyncio.timeout(2):
            await reader.next()
