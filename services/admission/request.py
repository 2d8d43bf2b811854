"""What a caller asks admission for: one frozen request value, checked when it is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from services.admission.limits import MAX_REQUEST_TOKENS, Priority
from services.runtime import FieldViolation, invalid

logger = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
"""Most characters of a caller's id for an admission attempt."""

_PRIORITIES = {0: Priority.INTERACTIVE, **{int(p): p for p in Priority}}


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionRequest:
    """One request to admit: who it is for, how urgent, what it will cost, how it waits.

    Built once per call by the servicer (from its proto request) and handed to
    `AdmissionController.submit`. A value that exists is valid; field violations name
    the attributes below, and the servicer names them by its own request's field paths.

    Raises:
        InvalidArgument: on construction, one field violation per bad attribute: no
            tenant, an unknown priority, token counts outside 0..10,000,000 (or not
            integers), a negative max_wait, a request id over 128 characters.
    """

    tenant_id: str
    user_id: str = ""
    """The user within the tenant; their own policy, if they have one, applies too."""
    priority: Priority = Priority.INTERACTIVE
    """A `Priority`, or its int value; 0 (unspecified) stands for interactive."""
    tier: str = ""
    """The model tier, whose ceiling then applies; "" = no tier ceiling."""
    prompt_tokens: int = 0
    """Estimated prompt tokens: charged now, with completion_tokens, and corrected on
    release."""
    completion_tokens: int = 0
    """Most completion tokens the request may generate."""
    no_wait: bool = False
    """Admit at once or refuse at once (as does a zero max_wait)."""
    max_wait: timedelta | None = None
    """Longest time to wait in the queue; None = until cancelled (the servicer passes the
    time left before the caller's deadline)."""
    request_id: str = ""
    """The caller's id for this attempt, unique within the tenant while it waits or holds
    its lease, so that a caller that never got the lease can release it by this id;
    "" = none."""

    def __post_init__(self) -> None:
        priority = _PRIORITIES.get(self.priority)
        if (
            priority is None
            or not self.tenant_id
            or type(self.prompt_tokens) is not int
            or type(self.completion_tokens) is not int
            or not 0 <= self.prompt_tokens <= MAX_REQUEST_TOKENS
            or not 0 <= self.completion_tokens <= MAX_REQUEST_TOKENS
            or (self.max_wait is not None and self.max_wait < timedelta(0))
            or len(self.request_id) > MAX_REQUEST_ID
        ):
            raise invalid(self._violations())
        if priority is not self.priority:
            object.__setattr__(self, "priority", priority)

    @property
    def tokens(self) -> int:
        """What the request is charged at admission: prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def _violations(self) -> list[FieldViolation]:
        violations = []
        if not self.tenant_id:
            violations.append(FieldViolation("tenant_id", "required"))
        if self.priority not in _PRIORITIES:
            violations.append(
                FieldViolation(
                    "priority",
                    f"unknown priority class {self.priority!r}; "
                    "use PRIORITY_INTERACTIVE or PRIORITY_BATCH",
                )
            )
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_REQUEST_TOKENS:
                violations.append(
                    FieldViolation(name, f"must be 0..{MAX_REQUEST_TOKENS:,}, not {value!r}")
                )
        if self.max_wait is not None and self.max_wait < timedelta(0):
            violations.append(FieldViolation("max_wait", "must not be negative"))
        if len(self.request_id) > MAX_REQUEST_ID:
            violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters"))
        return violations
