"""Pure logic of the shared runtime: config parsing, error mapping, deadline propagation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from services.runtime import (
    ERROR_DOMAIN,
    ConfigError,
    DeadlineExceeded,
    FieldViolation,
    QuotaViolation,
    ResourceExhausted,
    ServerConfig,
    _context,
    invalid,
    load_config,
    outbound_timeout,
    parse_duration,
    propagated_metadata,
)


@dataclass(frozen=True)
class Sample:
    port: int
    urls: tuple[str, ...]
    ratio: float = 0.5
    debug: bool = False
    wait: timedelta = timedelta(seconds=1)
    path: Path = Path("/tmp")
    name: str | None = None


def test_load_config_parses_every_type():
    env = {
        "X_PORT": "8080",
        "X_URLS": "a:1, b:2",
        "X_RATIO": "0.25",
        "X_DEBUG": "yes",
        "X_WAIT": "250ms",
        "X_PATH": "/srv",
        "X_NAME": "n",
    }
    cfg = load_config(Sample, prefix="X_", env=env)
    assert cfg == Sample(
        8080, ("a:1", "b:2"), 0.25, True, timedelta(milliseconds=250), Path("/srv"), "n"
    )


def test_load_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(Sample, prefix="X_", env={"X_URLS": "a", "X_RATIO": "lots", "X_DEBUG": "maybe"})
    text = str(err.value)
    assert "X_PORT is required" in text
    assert "X_RATIO='lots'" in text
    assert "X_DEBUG='maybe'" in text


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="ports must be within"):
        load_config(ServerConfig, prefix="S_", env={"S_PORT": "70000"})


@pytest.mark.parametrize("text,seconds", [("2", 2), ("2s", 2), ("1.5m", 90), ("30ms", 0.03)])
def test_parse_duration(text, seconds):
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


def test_parse_duration_rejects_garbage():
    with pytest.raises(ValueError):
        parse_duration("soon")


def _details(status, kind):
    found = []
    for any_ in status.details:
        if any_.Is(kind.DESCRIPTOR):
            msg = kind()
            any_.Unpack(msg)
            found.append(msg)
    return found


def test_invalid_argument_carries_one_error_info_and_field_violations():
    err = invalid(
        [
            FieldViolation("prompt", "must not be empty"),
            FieldViolation("parameters.max_tokens", "too big"),
        ]
    )
    status = err.to_rpc_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (info,) = _details(status, error_details_pb2.ErrorInfo)
    assert info.domain == ERROR_DOMAIN and info.reason == "INVALID_REQUEST"
    (bad,) = _details(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["prompt", "parameters.max_tokens"]


def test_quota_failure_and_retry_info():
    err = ResourceExhausted(
        "slow down",
        reason="TENANT_QUOTA",
        quota_violations=[QuotaViolation("tenant:a", "tokens/min")],
        retry_after=timedelta(milliseconds=1500),
    )
    status = err.to_rpc_status()
    (quota,) = _details(status, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "tenant:a"
    (retry,) = _details(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(milliseconds=1500)
    assert err.to_grpc_status().code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reasons_are_upper_snake_and_short():
    import re

    from services import runtime

    for reason in runtime.REASONS:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,62}", reason), reason
    for name in runtime.__all__:
        obj = getattr(runtime, name)
        if isinstance(obj, type) and issubclass(obj, runtime.SwitchboardError):
            # a default reason is from the catalogue; "" = each raise names its own
            assert obj.reason == "" or obj.reason in runtime.REASONS, name


def test_outbound_timeout_is_the_least_of_request_and_remaining_deadline():
    token = _context.deadline.set(time.monotonic() + 5)
    try:
        assert outbound_timeout(None) == pytest.approx(5, abs=0.1)
        assert outbound_timeout(1.0) == 1.0
        assert outbound_timeout(30.0) == pytest.approx(5, abs=0.1)
    finally:
        _context.deadline.reset(token)
    assert outbound_timeout(None, default=7.0) == 7.0
    assert outbound_timeout(2.0, default=7.0) == 2.0


def test_outbound_call_after_the_deadline_fails_fast():
    token = _context.deadline.set(time.monotonic() - 0.01)
    try:
        with pytest.raises(DeadlineExceeded):
            outbound_timeout(10.0)
    finally:
        _context.deadline.reset(token)


def test_request_id_and_tenant_propagate():
    t1 = _context.request_id.set("rid-1")
    t2 = _context.tenant_id.set("acme")
    try:
        md = dict(propagated_metadata([("x-extra", "1")]))
    finally:
        _context.request_id.reset(t1)
        _context.tenant_id.reset(t2)
    assert md == {"x-extra": "1", "x-request-id": "rid-1", "x-tenant-id": "acme"}


def test_a_relayed_status_keeps_its_details_or_gets_the_one_error_info_it_lacks():
    import grpc
    from google.rpc import status_pb2

    from services import runtime

    downstream = runtime.NotFound("gone", reason="TASK_NOT_FOUND").to_rpc_status()
    relayed = runtime.RelayedError(grpc.StatusCode.NOT_FOUND, downstream)
    assert relayed.to_rpc_status() == downstream and relayed.reason == "TASK_NOT_FOUND"
    for code, reason in (
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE"),
        (grpc.StatusCode.UNKNOWN, "INTERNAL"),
    ):
        bare = status_pb2.Status(code=code.value[0], message="from grpc itself")
        details = runtime.error_details(runtime.RelayedError(code, bare).to_rpc_status())
        assert (details.code, details.error_info.reason) == (code, reason)
        assert details.error_info_count == 1 and details.error_info.reason in runtime.REASONS
