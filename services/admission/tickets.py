"""One request's way through admission: its ticket, and the values it is answered with."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from dataclasses import dataclass
from datetime import timedelta

from services.admission.clock import duration
from services.admission.ledger import Lease
from services.admission.policies import Scope, Tier
from services.admission.request import AdmissionRequest
from services.runtime import SwitchboardError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: its lease, how long it waited and where it entered the queue."""

    lease: Lease
    queue_wait: timedelta
    initial_queue_position: int


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """Where a waiting request stands (the proto's `switchboard.common.v1.QueuePosition`)."""

    position: int
    """Requests that will be admitted before it (0 = next)."""
    estimated_wait: timedelta


class TicketState(enum.Enum):
    WAITING = enum.auto()
    ADMITTED = enum.auto()
    REFUSED = enum.auto()
    CANCELLED = enum.auto()


class Ticket:
    """One request's way through admission: admitted at once, waiting, or finished.

    Returned by `AdmissionController.submit`; `lease` is set once admitted, `error` once
    refused while waiting (its deadline passed, or the controller shut down). Carries
    the scopes and tier it is charged to, so that deciding it looks nothing up.
    """

    __slots__ = (
        "seq",
        "tenant_id",
        "user_id",
        "request_id",
        "tier",
        "priority",
        "tokens",
        "submitted_at",
        "deadline",
        "state",
        "lease",
        "error",
        "admitted_at",
        "initial_position",
        "tenant_scope",
        "user_scope",
        "tier_state",
        "_future",
    )

    def __init__(
        self,
        seq: int,
        request: AdmissionRequest,
        tenant_scope: Scope,
        user_scope: Scope | None,
        tier_state: Tier | None,
        now: float,
    ) -> None:
        self.seq = seq
        self.tenant_id = request.tenant_id
        self.user_id = request.user_id
        self.request_id = request.request_id
        self.tier = request.tier
        self.priority = request.priority
        self.tokens = request.prompt_tokens + request.completion_tokens
        self.submitted_at = now
        self.deadline = math.inf
        self.state = TicketState.WAITING
        self.lease: Lease | None = None
        self.error: SwitchboardError | None = None
        self.admitted_at = now
        self.initial_position = 0
        self.tenant_scope = tenant_scope
        self.user_scope = user_scope
        """The user's own limits; None if the user has no policy of their own."""
        self.tier_state = tier_state
        """The tier's ceiling; None for a request without a tier."""
        self._future: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        return self.state is TicketState.WAITING

    def result(self) -> Admission:
        """The admission; raises the refusal if there was one."""
        if self.lease is not None:
            return Admission(
                lease=self.lease,
                queue_wait=duration(self.admitted_at - self.submitted_at),
                initial_queue_position=self.initial_position,
            )
        if self.error is not None:
            raise self.error
        raise RuntimeError("the request is still waiting")

    def decided(self) -> asyncio.Future[None]:
        """A future done once the ticket leaves WAITING (made on the running loop)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if not self.waiting:
                self._future.set_result(None)
        return self._future

    def settle(self) -> None:
        """Wakes whoever awaits `decided` (the ticket was just decided)."""
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def __repr__(self) -> str:
        return (
            f"Ticket(#{self.seq} {self.tenant_id}/{self.user_id} {self.priority.label} "
            f"tier={self.tier!r} tokens={self.tokens} {self.state.name})"
        )
