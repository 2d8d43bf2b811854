"""The bound on each wait of a generation's stream (`StreamWaits`): the call's deadline,
and at most the idle bound for each thing the backend sends, on a fake clock."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from services.inference.config import InferenceConfig
from services.inference.triton import BackendFailure, StreamWaits
from services.runtime import DeadlineExceeded
from tests.fakes import Clock


def test_without_a_deadline_each_wait_is_bounded_by_the_idle_time():
    clock = Clock()
    waits = StreamWaits("triton-0", None, 30.0, clock=clock)
    assert waits.next() == clock.now + 30.0
    clock.advance(1_000.0)  # a long answer: each token resets the bound
    assert waits.next() == clock.now + 30.0
    clock.advance(30.0)
    silent = waits.expired("model")
    assert isinstance(silent, BackendFailure)
    assert silent.code == grpc.StatusCode.UNAVAILABLE
    assert silent.reason == "BACKEND_UNAVAILABLE"
    assert silent.message == "backend triton-0 sent nothing for 30 s"
    assert silent.metadata == {"backend": "triton-0"}


def test_a_deadline_nearer_than_the_idle_time_bounds_the_wait_and_names_itself():
    clock = Clock()
    waits = StreamWaits("triton-0", 5.0, 30.0, clock=clock)
    assert waits.next() == clock.now + 5.0
    clock.advance(5.0)
    late = waits.expired("model")
    assert isinstance(late, DeadlineExceeded)
    assert late.reason == "DEADLINE_EXCEEDED"
    assert late.message == "the model did not finish before the deadline"


def test_a_backend_silent_before_a_distant_deadline_is_the_backend_s_failure():
    clock = Clock()
    waits = StreamWaits("up#m", 600.0, 30.0, clock=clock)
    clock.advance(100.0)
    assert waits.next() == clock.now + 30.0
    clock.advance(30.0)
    assert isinstance(waits.expired("upstream model"), BackendFailure)
    clock.advance(470.0)  # the deadline itself: the nearer bound now
    assert waits.next() == clock.now
    assert isinstance(waits.expired("upstream model"), DeadlineExceeded)


@pytest.mark.parametrize("seconds", [0, -1])
def test_the_idle_bound_must_be_positive(seconds):
    with pytest.raises(ValueError, match="SWITCHBOARD_GENERATION_IDLE_TIMEOUT"):
        InferenceConfig(
            triton_urls=("127.0.0.1:8001",), generation_idle_timeout=timedelta(seconds=seconds)
        )
