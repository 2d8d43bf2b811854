"""Every public RPC fuzzed through Envoy: generated requests (from the descriptors, from
valid requests with fields changed, and malformed bytes), as a tenant of their own and,
where the contract allows, as an operator.

Whatever a case sends, no call ends INTERNAL or UNKNOWN (nor does any item status inside
a reply), no process of the mesh dies, and every service is healthy afterwards.
SWITCHBOARD_FUZZ_CASES sets the cases per RPC (`make fuzz` runs more, and records
the figures in bench/results/fuzz.json and faults.json).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest
from switchboard.admission.v1 import admission_pb2 as adm
from switchboard.auth.v1 import auth_pb2
from switchboard.chat.v1 import chat_pb2
from switchboard.common.v1 import common_pb2

from services.runtime import Principal, error_details, method_contract, page_token
from tests import fuzz_run, fuzzing
from tests.integration.conftest import as_operator, as_tenant
from tests.polling import eventually

CASES_PER_RPC = int(os.environ.get("SWITCHBOARD_FUZZ_CASES", "600"))
"""Cases per public RPC here: about 23,000 in all, 2 minutes of sending on two quiet
cores (`make fuzz` sends 2,000 per RPC)."""
SECONDS = float(os.environ.get("SWITCHBOARD_FUZZ_SECONDS", "120"))
"""No round of cases starts after this much sending: on a busy machine the test sends
fewer, never runs away."""
AT_LEAST = 200
"""Cases per RPC the test insists on, however busy the machine."""
SEED = int(os.environ.get("SWITCHBOARD_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def tenants() -> fuzz_run.FuzzTenants:
    return fuzz_run.fuzz_tenants(as_tenant, as_operator)


async def settled(mesh: Any) -> None:
    """Waits until every service reports SERVING (an earlier test may have killed one)."""

    async def healthy() -> bool:
        return not await asyncio.to_thread(fuzz_run.unhealthy, mesh)

    await eventually(healthy, timeout=60, interval=0.5, what="every service SERVING")


@pytest.mark.timeout(420)
async def test_no_generated_request_fails_internally_crashes_or_sickens_a_service(
    mesh, envoy_target, tenants
):
    await settled(mesh)
    before = fuzz_run.processes(mesh)
    run = await fuzz_run.fuzz(
        envoy_target, tenants, per_rpc=CASES_PER_RPC, seed=SEED, seconds=SECONDS, progress=print
    )
    tally = run.tally
    print(
        f"fuzz: {tally.total} cases in {tally.seconds:.0f} s; "
        + ", ".join(f"{code} {n}" for code, n in tally.codes.most_common())
    )
    assert {m.full_name for m in fuzz_run.public_methods()} == set(tally.cases)
    assert not tally.findings, fuzz_run.summary(tally.findings)
    # ListModelsRequest has no fields: its messages are few, its malformed bytes many
    assert min(tally.cases.values()) >= min(AT_LEAST, CASES_PER_RPC // 2), tally.cases
    after = fuzz_run.processes(mesh)
    gone = {name: pid for name, pid in before.items() if after.get(name) != pid}
    assert not gone, f"processes died or were replaced while fuzzed: {gone}"
    problems = await asyncio.to_thread(fuzz_run.unhealthy, mesh)
    assert not problems, problems
    # the leases it was granted are released: the tiers' ceilings, which every tenant
    # shares, are as the run found them
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        get_quota = channel.unary_unary(
            "/switchboard.admission.v1.AdmissionService/GetQuota",
            request_serializer=adm.GetQuotaRequest.SerializeToString,
            response_deserializer=adm.GetQuotaResponse.FromString,
        )

        async def nothing_in_flight() -> bool:
            reply = await get_quota(
                adm.GetQuotaRequest(), metadata=as_tenant(tenants.tenant), timeout=10
            )
            return reply.quota.in_flight == 0

        await eventually(nothing_in_flight, timeout=15, what="the run's leases released")


# -- the findings, one by one ----------------------------------------------------------------


def not_a_message(method: Any) -> list[bytes]:
    """A lone byte no field starts with, a length past the end, and (where the request
    has a string field) that field holding invalid UTF-8."""
    found = [b"\xff", b"\n\x05\x00"]
    strings = [f for f in method.input_type.fields if f.type == f.TYPE_STRING]
    if strings:
        found.append(fuzzing.wire_field(strings[0].number, 2, b"abc\x80"))
    return found


async def test_bytes_that_are_no_message_are_invalid_argument_for_every_rpc(envoy_target, tenants):
    """grpc answers a request it cannot parse UNKNOWN, before any handler: the runtime
    parses it itself and refuses it with INVALID_REQUEST (in a stream, after the
    messages before it)."""
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        with grpc.insecure_channel(envoy_target) as blocking:
            run = fuzz_run.FuzzRun(channel, blocking, tenants)
            for method in fuzz_run.public_methods():
                operator = Principal.TENANT not in method_contract(method.full_name).principals
                for raw in not_a_message(method):
                    case = fuzz_run.Case(method, (raw,), operator=operator)
                    code, details, _ = await run.call(case)
                    if code != grpc.StatusCode.INVALID_ARGUMENT:
                        wrong.append(f"{method.full_name} {raw!r}: {code.name} {details}")
    assert not wrong, "\n".join(wrong)


async def test_a_broken_frame_ends_a_bidirectional_stream_invalid_argument(envoy_target, tenants):
    me = as_tenant(tenants.tenant)
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        session = await channel.unary_unary(
            "/switchboard.chat.v1.ChatService/CreateSession",
            request_serializer=chat_pb2.CreateSessionRequest.SerializeToString,
            response_deserializer=chat_pb2.CreateSessionResponse.FromString,
        )(chat_pb2.CreateSessionRequest(title="broken frames"), metadata=me, timeout=10)
        opened = chat_pb2.ConverseRequest(
            open=chat_pb2.OpenSession(session_id=session.session.session_id)
        )
        admit = adm.AdmitSessionRequest(
            request=adm.AdmitRequest(
                tier=common_pb2.MODEL_TIER_SMALL, estimated_prompt_tokens=1, no_wait=True
            )
        )
        for path, first in (
            ("/switchboard.chat.v1.ChatService/Converse", opened),
            ("/switchboard.admission.v1.AdmissionService/AdmitSession", admit),
        ):
            call = channel.stream_stream(path)(metadata=me, timeout=10)
            await call.write(first.SerializeToString())
            await call.write(b"\xff")
            replies = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (reply := await call.read()) is not grpc.aio.EOF:
                    replies.append(reply)
            details = error_details(ended.value)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (path, details)
            assert details.error_info.reason == "INVALID_REQUEST"
        release = channel.unary_unary(
            "/switchboard.admission.v1.AdmissionService/Release",
            request_serializer=adm.ReleaseRequest.SerializeToString,
        )
        for reply in map(adm.AdmitSessionResponse.FromString, replies):  # the admission's
            if reply.HasField("admitted"):  # lease, if it came before the broken frame
                await release(
                    adm.ReleaseRequest(lease_id=reply.admitted.lease.lease_id),
                    metadata=me,
                    timeout=10,
                )


async def test_values_postgresql_cannot_hold_are_invalid_argument(envoy_target, tenants):
    """A key's name with a NUL, a page token that decodes to too few parts or to a NUL:
    refused naming the field, not INTERNAL from the key store's query."""
    operator = as_operator(tenants.operated)
    nul_tenant = page_token("tenant\x00")
    calls = [
        ("CreateKey", auth_pb2.CreateKeyRequest(tenant_id=tenants.operated, name="a\x00b"), "name"),
        ("ListKeys", auth_pb2.ListKeysRequest(page_token="😀😀😀"), "page_token"),
        ("ListKeys", auth_pb2.ListKeysRequest(page_token=nul_tenant), "page_token"),
        ("ListTenants", auth_pb2.ListTenantsRequest(page_token=nul_tenant), "page_token"),
    ]
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        for method, request, field in calls:
            call = channel.unary_unary(
                f"/switchboard.auth.v1.KeyService/{method}",
                request_serializer=type(request).SerializeToString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request, metadata=operator, timeout=10)
            details = error_details(refused.value)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
            assert [v.field for v in details.field_violations] == [field]
