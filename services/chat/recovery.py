"""Turns whose replica died mid-answer: their streams told, their partial answer stored.

A turn is interrupted when the replica generating it stops before the turn's end: at
its shutdown, for turns still running after the grace period (`live.Hub.finish`), or
killed, when another replica takes its expired lease over (`leases`). Either way the
session's streams get an ErrorFrame (UNAVAILABLE `SHUTTING_DOWN`) and a TurnCompleted
FAILED, and the history gets the answer as far as it went, FAILED with that error, as
any failed turn's answer is stored.

A dead replica cannot say how far it got; the session log can: its TurnStarted and
tokens are there (`partial_answer`). If the log holds the turn's TurnCompleted, the
turn ended and its answer was stored (a turn stores its answer before announcing its
end), and there is nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.common.v1 import common_pb2

from services.chat.events import SessionLog
from services.chat.leases import TurnRecord
from services.chat.store import SessionStore
from services.runtime import NotFound, SwitchboardError, Unavailable

logger = logging.getLogger(__name__)

__all__ = ["Partial", "Recovery", "interrupted", "partial_answer"]


def interrupted() -> Unavailable:
    """What a client is told of an answer whose replica stopped generating it."""
    return Unavailable(
        "the chat replica generating this answer stopped; the partial answer is stored."
        " Send the message again for a whole one",
        reason="SHUTTING_DOWN",
    )


@dataclass
class Partial:
    """How far a turn got, as its events in the log show."""

    started: bool = False
    completed: bool = False
    tokens: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def partial_answer(frames: Sequence[pb.ConverseResponse], assistant_id: str) -> Partial:
    """The answer `assistant_id` as far as `frames` (the session's events) carry it."""
    partial = Partial()
    for frame in frames:
        if frame.message_id != assistant_id:
            continue
        kind = frame.WhichOneof("frame")
        if kind == "turn_started":
            partial.started = True
        elif kind == "token":
            partial.tokens.append(frame.token.text)
        elif kind == "turn_completed":
            partial.completed = True
    return partial


class Recovery:
    """Recovers turns whose owner is gone (the `recover` of `leases.KvLeases`)."""

    def __init__(self, log: SessionLog, store: SessionStore) -> None:
        self._log = log
        self._store = store

    async def recover(self, record: TurnRecord) -> None:
        sid = record.session_id
        partial = partial_answer(await self._log.read(sid, record.after + 1), record.assistant_id)
        if partial.completed:
            return
        error = interrupted().to_rpc_status()
        usage = common_pb2.TokenUsage(
            completion_tokens=len(partial.tokens), total_tokens=len(partial.tokens)
        )
        answer = pb.Message(
            message_id=record.assistant_id,
            role=pb.MESSAGE_ROLE_ASSISTANT,
            status=pb.MESSAGE_STATUS_FAILED,
            text=partial.text,
            usage=usage,
            error=error,
        )
        try:
            if not await self._store.has_message(record.tenant_id, sid, record.assistant_id):
                await self._store.append(record.tenant_id, sid, answer)
        except NotFound:
            return  # the session was deleted meanwhile
        except SwitchboardError as problem:
            logger.warning("answer not stored: %s", problem.reason, extra=_where(record))
        frames = []
        if not partial.started:
            frames.append(
                pb.ConverseResponse(
                    turn_started=pb.TurnStarted(
                        client_message_id=record.client_message_id,
                        assistant_message_id=record.assistant_id,
                    )
                )
            )
        frames.append(
            pb.ConverseResponse(
                error=pb.ErrorFrame(status=error, client_message_id=record.client_message_id)
            )
        )
        frames.append(
            pb.ConverseResponse(
                turn_completed=pb.TurnCompleted(
                    assistant_message_id=record.assistant_id,
                    status=pb.MESSAGE_STATUS_FAILED,
                    usage=usage,
                )
            )
        )
        for frame in frames:
            frame.message_id = record.assistant_id
            await self._log.append(sid, frame)
        await self._log.flush()
        logger.info("interrupted turn recovered", extra=_where(record))


def _where(record: TurnRecord) -> dict[str, str]:
    return {"session_id": record.session_id, "message_id": record.assistant_id}
