"""The request value the servicer builds, and how the servicer names its fields."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from services.admission import AdmissionController, AdmissionRequest, FakeClock, Priority
from services.admission.clock import duration
from services.admission.servicer import ADMIT_FIELDS, RELEASE_FIELDS, named_fields
from services.runtime import InvalidArgument


@pytest.mark.parametrize(
    "request_fields, fields, paths",
    [
        ({"priority": 7}, ["priority"], ["context.priority"]),
        ({"priority": -1}, ["priority"], ["context.priority"]),
        ({"prompt_tokens": -1}, ["prompt_tokens"], ["estimated_prompt_tokens"]),
        ({"completion_tokens": 10_000_001}, ["completion_tokens"], ["max_completion_tokens"]),
        ({"prompt_tokens": 2.5}, ["prompt_tokens"], ["estimated_prompt_tokens"]),
        ({"tenant_id": ""}, ["tenant_id"], ["context.tenant_id"]),
        ({"max_wait": timedelta(seconds=-1)}, ["max_wait"], ["max_wait"]),
        ({"request_id": "x" * 129}, ["request_id"], ["context.request_id"]),
        (
            {"priority": 9, "prompt_tokens": -5, "completion_tokens": -5},
            ["priority", "prompt_tokens", "completion_tokens"],
            ["context.priority", "estimated_prompt_tokens", "max_completion_tokens"],
        ),
    ],
)
def test_a_bad_request_is_refused_naming_its_fields_and_the_servicer_names_their_paths(
    request_fields, fields, paths
):
    with pytest.raises(InvalidArgument) as invalid:
        AdmissionRequest(**{"tenant_id": "acme", **request_fields})
    assert invalid.value.reason == "INVALID_REQUEST"
    assert [v.field for v in invalid.value.field_violations] == fields
    named = named_fields(invalid.value, ADMIT_FIELDS)
    assert [v.field for v in named.field_violations] == paths
    streamed = named_fields(invalid.value, ADMIT_FIELDS, "request.")
    assert [v.field for v in streamed.field_violations] == [f"request.{p}" for p in paths]
    assert named.message.startswith(f"invalid request: {paths[0]}: ")


def test_every_request_attribute_has_a_path_in_admit_request():
    assert set(ADMIT_FIELDS) == {f.name for f in dataclasses.fields(AdmissionRequest)}


def test_priorities_are_the_proto_values_and_unspecified_is_interactive():
    assert AdmissionRequest(tenant_id="acme").priority is Priority.INTERACTIVE
    assert AdmissionRequest(tenant_id="acme", priority=0).priority is Priority.INTERACTIVE
    assert AdmissionRequest(tenant_id="acme", priority=2).priority is Priority.BATCH


def test_a_request_is_a_frozen_value_charged_its_prompt_and_completion_tokens():
    request = AdmissionRequest(tenant_id="acme", prompt_tokens=120, completion_tokens=80)
    assert request.tokens == 200
    assert request == AdmissionRequest(tenant_id="acme", prompt_tokens=120, completion_tokens=80)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.tenant_id = "other"  # type: ignore[misc]


def test_the_core_names_its_state_dependent_refusals_by_attribute_too():
    controller = AdmissionController(clock=FakeClock())
    controller.submit(AdmissionRequest(tenant_id="acme", request_id="dup"))
    with pytest.raises(InvalidArgument) as in_use:
        controller.submit(AdmissionRequest(tenant_id="acme", request_id="dup"))
    assert [v.field for v in in_use.value.field_violations] == ["request_id"]
    named = named_fields(in_use.value, ADMIT_FIELDS, "request.")
    assert [v.field for v in named.field_violations] == ["request.context.request_id"]

    lease = controller.submit(AdmissionRequest(tenant_id="acme")).lease
    assert lease is not None
    with pytest.raises(InvalidArgument) as bad_usage:
        controller.release(lease.lease_id, actual_tokens=-1)
    named = named_fields(bad_usage.value, RELEASE_FIELDS)
    assert [v.field for v in named.field_violations] == ["actual_usage.total_tokens"]


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, timedelta(0)),
        (-1.5, timedelta(0)),
        (2, timedelta(seconds=2)),
        (1e-7, timedelta(microseconds=1)),  # rounded up: never shorter than the wait
        (float("inf"), timedelta.max),
    ],
)
def test_durations_told_to_callers_are_never_shorter_than_the_wait(seconds, expected):
    assert duration(seconds) == expected
