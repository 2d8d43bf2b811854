"""The admission service's pieces that need no network: config, paging, relaying, ports."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.admission import AdmissionConfig, AdmissionController, AdmissionRequest, PolicyLimits
from services.admission.capacity import size_tiers
from services.admission.metrics import ControllerCollector
from services.admission.servicer import policy_cursor
from services.inference.admission import RelayedError, relay_error
from services.launcher._config import LauncherConfig, isolated_config
from services.launcher._mesh import Mesh
from services.launcher._services import MAX_SLOTS, SERVICES, service_processes
from services.runtime import (
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    page_token,
    read_page_token,
)


def test_tier_ceilings_parse_and_bad_entries_fail_at_start() -> None:
    config = AdmissionConfig(
        database_url="postgresql://x", admission_tier_max_in_flight=("small=64", "large=16")
    )
    assert config.tier_ceilings() == {"small": 64, "large": 16}
    with pytest.raises(ValueError, match="tier=count"):
        AdmissionConfig(database_url="postgresql://x", admission_tier_max_in_flight=("small",))
    with pytest.raises(ValueError, match="DATABASE_URL"):
        AdmissionConfig(database_url="")
    with pytest.raises(ValueError, match="max_in_flight"):
        AdmissionConfig(database_url="postgresql://x", admission_default_max_in_flight=0)


@pytest.mark.parametrize("user", ["bob", "", "b\x1fo\x00b"])
def test_page_tokens_round_trip_and_foreign_ones_are_refused(user: str) -> None:
    token = page_token("acme", user)
    assert read_page_token(token, policy_cursor, what="ListPoliciesRequest") == ("acme", user)
    assert read_page_token("", policy_cursor, what="ListPoliciesRequest") is None
    with pytest.raises(InvalidArgument) as refused:
        read_page_token("bm90LWEtdG9rZW4=", policy_cursor, what="ListPoliciesRequest")
    assert [v.field for v in refused.value.field_violations] == ["page_token"]


def test_a_relayed_refusal_keeps_every_detail() -> None:
    refusal = ResourceExhausted("over quota", reason="QUOTA_EXCEEDED").to_rpc_status()
    relayed = RelayedError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
    assert relayed.reason == "QUOTA_EXCEEDED"
    assert relayed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert relayed.to_rpc_status() == refusal
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(relayed.to_rpc_status().SerializeToString()).details[0].Unpack(
        info
    )
    assert info.reason == "QUOTA_EXCEEDED"


def test_admission_replicas_get_their_own_ports_and_names(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path)
    processes = [
        (spec.process_name(config, i), spec.port(config, i))
        for spec, i in service_processes(config)
    ]
    assert processes == [
        ("inference", 7051),
        ("admission-0", 7052),
        ("admission-1", 7062),
        ("rag", 7054),
        ("execution", 7055),
        ("worker-0", 7056),
        ("chat", 7057),
        ("auth", 7058),
        ("gateway", 7059),
    ]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_isolated_ports_never_overlap(tmp_path: Path, replicas: int) -> None:
    config = isolated_config(tmp_path, admission_replicas=replicas, triton_replicas=3)
    ports = [port for _, port in Mesh(config)._planned_ports()]
    # every slot the control plane may start a replica in (scale to the maximum + surge)
    ports += [
        port
        for spec in SERVICES
        for slot in range(spec.replicas(config), MAX_SLOTS)
        for port in (spec.port(config, slot), spec.metrics_port(config, slot))
    ]
    assert len(ports) == len(set(ports))
    assert max(ports) - config.envoy_port < 140


def test_tier_ceilings_come_from_healthy_backends_split_over_replicas() -> None:
    healthy = inference_pb2.BackendInfo(state=inference_pb2.BACKEND_STATE_HEALTHY)
    open_ = inference_pb2.BackendInfo(state=inference_pb2.BACKEND_STATE_OPEN)
    generator = inference_pb2.MODEL_KIND_GENERATOR
    models = inference_pb2.ListModelsResponse(
        models=[
            inference_pb2.ModelInfo(
                tier=common_pb2.MODEL_TIER_SMALL, kind=generator, backends=[healthy, healthy]
            ),
            inference_pb2.ModelInfo(
                tier=common_pb2.MODEL_TIER_LARGE, kind=generator, backends=[open_, healthy]
            ),
            inference_pb2.ModelInfo(kind=inference_pb2.MODEL_KIND_EMBEDDER, backends=[healthy]),
        ]
    )
    assert size_tiers(models, streams_per_backend=16, replicas=2) == {"small": 16, "large": 8}
    for model in models.models:
        del model.backends[:]
        model.backends.append(open_)
    # nothing healthy: no ceiling, the inference service refuses with its own status
    assert size_tiers(models, streams_per_backend=16, replicas=2) == {
        "small": None,
        "large": None,
    }


def test_metrics_count_decisions_per_tenant_and_class() -> None:
    controller = AdmissionController(
        default_policy=PolicyLimits(
            requests_per_second=1.0,
            request_burst=1,
            tokens_per_minute=60_000,
            token_burst=10_000,
            max_in_flight=10,
        )
    )
    controller.submit(AdmissionRequest(tenant_id="acme"))
    with pytest.raises(ResourceExhausted):
        controller.submit(AdmissionRequest(tenant_id="acme", no_wait=True))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in ControllerCollector(controller).collect()
        for s in family.samples
    }
    acme = (("priority", "interactive"), ("tenant", "acme"))
    assert samples[("switchboard_admission_admitted_total", acme)] == 1
    refused = (*acme[:1], ("reason", "QUOTA_EXCEEDED"), acme[1])
    assert samples[("switchboard_admission_refused_total", refused)] == 1
    assert samples[("switchboard_admission_queue_depth", (("priority", "batch"),))] == 0
    assert samples[("switchboard_admission_leases", ())] == 1


def _rpc_error(code: grpc.StatusCode, trailing: tuple = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="from admission"
    )


def test_an_unreachable_admission_fails_the_call_with_a_retry_time() -> None:
    error = relay_error(_rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "DEPENDENCY_UNAVAILABLE"
    assert error.retry_after is not None and error.retry_after.total_seconds() > 0


def test_an_admission_refusal_reaches_the_caller_unchanged() -> None:
    refusal = ResourceExhausted(
        "over quota",
        reason="QUOTA_EXCEEDED",
        quota_violations=[QuotaViolation("tenant:acme", "requests_per_second")],
        retry_after=timedelta(seconds=3),
    ).to_rpc_status()
    blob = ("grpc-status-details-bin", refusal.SerializeToString())
    error = relay_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, (blob,)))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "QUOTA_EXCEEDED"
    assert error.to_rpc_status() == refusal
