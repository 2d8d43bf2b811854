"""How long a call waits for a pooled connection (pure): never past its deadline, and
briefly while the database is seen down."""

from __future__ import annotations

import pytest

from services.runtime._database import (
    ANSWER_RESERVE_S,
    DOWN_WAIT_S,
    POOL_WAIT_S,
    pool_wait,
)


@pytest.mark.parametrize(
    ("requested", "remaining", "down", "expected"),
    [
        (None, None, False, POOL_WAIT_S),  # no deadline: the pool's own bound
        (2.0, None, False, 2.0),
        (None, 3.0, False, 3.0 - ANSWER_RESERVE_S),  # ends before the caller's deadline
        (1.0, 3.0, False, 1.0),
        (None, None, True, DOWN_WAIT_S),  # down: fail fast
        (None, 0.2, True, 0.2 - ANSWER_RESERVE_S),
        (None, 0.01, False, 0.001),  # (almost) no time left: try once, at once
        (None, -1.0, False, 0.001),
    ],
)
def test_the_wait_for_a_connection(requested, remaining, down, expected):
    assert pool_wait(requested, remaining, down=down) == pytest.approx(expected)
