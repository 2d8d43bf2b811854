"""Live sessions without a network: each Converse frame checked against its contract
(the first one ending the stream, later ones answered with an ErrorFrame), resume
points that were never given out, and deletion by any spelling of a session id."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import field_mask_pb2
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import EventLog, Expired
from services.chat.live import Hub, Limits, Reader
from services.chat.store import SessionRow, canonical_id
from services.runtime import FailedPrecondition, InvalidArgument, NotFound, error_details

SID = "0f0e0d0c-0b0a-4908-8706-050403020100"


class Store:
    """A session store holding every session id, in memory."""

    def __init__(self) -> None:
        self.settings: dict[str, pb.SessionSettings] = {}

    async def get(self, tenant_id: str, session_id: str) -> SessionRow:
        session_id = canonical_id(session_id)
        return self._row(tenant_id, session_id, self.settings.get(session_id))

    async def client_message_ids(self, tenant_id: str, session_id: str, *, limit: int) -> set[str]:
        return set()

    async def update(
        self, tenant_id: str, session_id: str, *, title: str, settings: pb.SessionSettings
    ) -> SessionRow:
        self.settings[session_id] = settings
        return self._row(tenant_id, session_id, settings)

    @staticmethod
    def _row(tenant_id: str, session_id: str, settings: pb.SessionSettings | None) -> SessionRow:
        now = datetime.now(UTC)
        return SessionRow(
            session_id=session_id,
            tenant_id=tenant_id,
            title="",
            settings=settings or pb.SessionSettings(),
            message_count=0,
            prompt_tokens=0,
            completion_tokens=0,
            last_event_id="",
            create_time=now,
            update_time=now,
        )


@dataclass
class RecordedTurn:
    """A turn that only records its message."""

    text: str
    record: list[str]
    assistant_id: str = "a-1"

    async def run(self) -> None:
        self.record.append(self.text)


class Turns:
    def __init__(self) -> None:
        self.answered: list[str] = []

    def turn(self, tenant_id, session_id, settings, message, **_: object) -> RecordedTurn:
        return RecordedTurn(message.text, self.answered)


class Session:
    """A hub over sessions that always load, and turns that only record their message."""

    def __init__(self) -> None:
        self.store = Store()
        self.made = Turns()
        self.hub = Hub(self.store, self.made, Limits())  # type: ignore[arg-type]

    @property
    def turns(self) -> list[str]:
        return self.made.answered


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
