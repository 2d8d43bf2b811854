"""A session's events as the chat replicas share them in JetStream, read back: where a
stream on another replica starts (`start_after`), its cursor (`SharedReader`: each event
once, no incarnation's marker), and how events travel, several to a NATS message
(`pack`, `unpack`). What is shared, and how it is written, is `shared`."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from switchboard.chat.v1 import chat_pb2 as pb

from services.chat.events import Expired

__all__ = ["EVENT_STREAM", "Scan", "SharedReader", "pack", "start_after", "unpack"]

EVENT_STREAM = "SB_CHAT_EVENTS"
SCAN_TIMEOUT_S = 5.0
"""How long a reader may take to read a session's kept events before it starts."""
FINISH_WAIT_S = 2.0
"""How long a finishing reader waits for the owner's last event before it ends."""


@dataclass
class Scan:
    """Where a shared reader starts, found by reading the kept events in order."""

    after: str
    """The id to start after ("" from the first kept)."""
    held: bool
    """Start at the turn in progress (StreamEvents with no id) instead."""
    caught_up: int
    """The stream sequence of the session's last kept event when the reader started:
    the kept events end there."""


class SharedReader:
    """A stream's cursor into a session's shared events (see `events.Reader`): it
    delivers each event once, and no marker."""

    def __init__(self, after: str) -> None:
        self._sub = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._ready: list[pb.ConverseResponse] = []
        self._at = _position(after)
        """The incarnation and number of the last event taken: one read again (sent
        before the reader started, and kept after it looked) is dropped."""
        self._finish_at: str | None = None
        self.last = ""

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        subject: str,
        config: js_api.ConsumerConfig,
        after: str,
        scan: Scan | None = None,
    ) -> SharedReader:
        """Subscribes, for the events after the event `after`; with `scan`, reads the
        kept events first and keeps those to deliver (`start_after`).

        Raises:
            Expired: as `start_after`.
        """
        reader = cls(after)

        async def received(msg: Msg) -> None:
            reader._queue.put_nowait(msg)

        reader._sub = await js.subscribe(
            subject, stream=EVENT_STREAM, cb=received, ordered_consumer=True, config=config
        )
        if scan is not None:
            try:
                kept = await asyncio.wait_for(reader._kept(scan), SCAN_TIMEOUT_S)
                reader._take(start_after(kept, scan.after, held=scan.held))
            except BaseException:
                await reader.close()
                raise
        return reader

    async def _kept(self, scan: Scan) -> list[pb.ConverseResponse]:
        kept: list[pb.ConverseResponse] = []
        while scan.caught_up:
            msg = await self._queue.get()
            assert isinstance(msg, Msg)
            kept.extend(unpack(msg.data))
            if msg.metadata.sequence.stream >= scan.caught_up:
                break
        return kept

    @property
    def waiting(self) -> list[pb.ConverseResponse]:
        """The events read and not yet delivered."""
        return list(self._ready)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    def finish(self, last_event_id: str = "") -> None:
        """Ends the reader once it has read the event `last_event_id` (at once if it
        has, or if it is empty)."""
        self._finish_at = last_event_id
        self._queue.put_nowait(_FINISH)

    async def next(self) -> pb.ConverseResponse | None:
        while True:
            if self._ready:
                frame = self._ready.pop(0)
                self.last = frame.event_id
                return frame
            if self._finish_at is not None and self._finish_at in ("", self.last):
                return None
            try:
                item = await asyncio.wait_for(
                    self._queue.get(), None if self._finish_at is None else FINISH_WAIT_S
                )
            except TimeoutError:
                return None  # told to finish after an event that never came
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Msg):
                self._take(unpack(item.data))

    def _take(self, frames: list[pb.ConverseResponse]) -> None:
        """Keeps the events to deliver of `frames`: not the markers, nor an event at or
        before the last one taken of its incarnation."""
        for frame in frames:
            if frame.WhichOneof("frame") is None:
                continue  # an incarnation's marker
            at = _position(frame.event_id)
            if at[0] == self._at[0] and at[1] <= self._at[1]:
                continue
            self._at = at
            self._ready.append(frame)


def start_after(
    frames: list[pb.ConverseResponse], after: str, *, held: bool = False
) -> list[pb.ConverseResponse]:
    """What a reader delivers of the kept `frames`: those after the event `after`
    ("" every one), or `held`, from the turn in progress's start (none if no turn is in
    progress).

    An `after` of an incarnation whose last kept event is older than it was seen by the
    client before its owner died (those events were lost with it): the reader starts at
    the next incarnation's first event, or at new events.

    Raises:
        Expired: `after` is none of the kept events' and of no incarnation kept.
    """
    if held:
        start = len(frames)
        for i, frame in enumerate(frames):
            if frame.HasField("turn_started"):
                start = i
            elif frame.HasField("turn_completed"):
                start = len(frames)
        return frames[start:]
    if not after:
        return frames
    incarnation, _, number = after.partition(".")
    if not (number.isascii() and number.isdigit()):
        raise Expired(after)
    seen_incarnation = False
    for i, frame in enumerate(frames):
        if frame.event_id == after:
            return frames[i + 1 :]
        theirs, _, n = frame.event_id.partition(".")
        if theirs == incarnation:
            if int(n) > int(number):
                raise Expired(after)  # it was kept once and is no longer
            seen_incarnation = True
        elif seen_incarnation:
            return frames[i:]  # the rest of its incarnation was lost with its owner
    if seen_incarnation:
        return []
    raise Expired(after)


_FINISH = object()


def _position(event_id: str) -> tuple[str, int]:
    """(incarnation, number) of an event id; number -1 when it is none."""
    incarnation, _, number = event_id.partition(".")
    if number.isascii() and number.isdigit() and len(number) <= 18:
        return incarnation, int(number)
    return incarnation, -1


def pack(frames: list[bytes]) -> bytes:
    """Encoded events as one NATS message: each length-prefixed, as a stream of
    length-delimited protobuf messages is."""
    return b"".join(_varint(len(frame)) + frame for frame in frames)


def unpack(data: bytes) -> list[pb.ConverseResponse]:
    """The events of one NATS message (`pack`)."""
    frames, at = [], 0
    while at < len(data):
        size, at = _read_varint(data, at)
        frames.append(pb.ConverseResponse.FromString(data[at : at + size]))
        at += size
    return frames


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
