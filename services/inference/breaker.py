"""A backend's circuit breaker: the runtime's `CircuitBreaker` with the backends' defaults.

Open after `SWITCHBOARD_BREAKER_FAIL_MAX` failures in a row, a probe once
`SWITCHBOARD_BREAKER_RESET` has passed, one probe at a time; the router reports each
call's (or stream's) outcome with `record_success` / `record_failure`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from services.runtime import CircuitBreaker

logger = logging.getLogger(__name__)

__all__ = ["BackendBreaker"]


class BackendBreaker(CircuitBreaker):
    """One backend's circuit, named by its address; a lost probe holds it for `reset`."""

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 3,
        reset: timedelta = timedelta(seconds=5),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, fail_max=fail_max, reset=reset, clock=clock)
