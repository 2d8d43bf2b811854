"""PostgreSQL stalled (SIGSTOP of the postmaster and every backend) under light mixed load,
then resumed (SIGCONT).

A stalled database is worse than a stopped one: connections stay open and TCP accepts
new ones, but nothing answers. While it lasts: calls that need the database fail within
their deadline (plus a small margin) with UNAVAILABLE (ErrorInfo, and RetryInfo for
`DEPENDENCY_UNAVAILABLE`) or DEADLINE_EXCEEDED, never INTERNAL or UNKNOWN; calls that do
not need it keep working. After SIGCONT every service recovers by itself, and no task
SubmitTask acknowledged is lost or duplicated.

One stall serves every test here (`stall`, module-scoped); the probes are the
benchmark's (`bench/pg_faults.py`, `make bench-pg-faults`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import pytest
from switchboard.admission.v1 import admission_service_pb2_grpc

from bench._common import give_tenant_room, unlimited_policy
from bench.pg_faults import (
    DATABASE_KINDS,
    FREE_KINDS,
    Losses,
    Probe,
    Probes,
    all_stopped,
    check_losses,
    postgres_stalled,
)
from tests.integration.conftest import as_operator, as_tenant
from tests.polling import eventually

pytestmark = pytest.mark.timeout(300)

TENANT = "pg-stall"
DEADLINE_S = 3.0
MARGIN_S = 0.5
"""How far past its deadline a failing call may end (scheduling on a loaded machine)."""
STALL_S = 8.0
RECOVERY_S = 30.0
EXPECTED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Stall:
    probes: Probes
    stopped_at: float
    resumed_at: float
    stopped: int
    """Processes the SIGSTOP reached (the postmaster and its children)."""
    recovered: dict[str, float]
    """Kind -> seconds from SIGCONT to its first successful call's end."""
    losses: Losses

    def during(self) -> list[Probe]:
        """The probe calls in flight at some moment of the stall."""
        return self.probes.overlapping(self.stopped_at, self.resumed_at)


@pytest.fixture(scope="module")
async def stall(mesh, credentials, envoy_target) -> Stall:
    tenant = as_tenant(TENANT)
    async with grpc.aio.insecure_channel(envoy_target) as channel:

        async def room_given() -> bool:
            # the policy store may still be reconnecting after an earlier test's outage
            try:
                await give_tenant_room(
                    admission_service_pb2_grpc.AdmissionServiceStub(channel),
                    as_operator(),
                    unlimited_policy(TENANT, in_flight=64),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        await eventually(room_given, timeout=60, interval=0.5, what="the tenant's policy is stored")
    probes = Probes(envoy_target, tenant, deadline=DEADLINE_S)
    async with probes:
        await probes.wait_ok((*DATABASE_KINDS, *FREE_KINDS), since=time.monotonic(), timeout=60)
        with postgres_stalled(mesh) as stopped:
            stopped_at = time.monotonic()
            await eventually(
                lambda: all_stopped(stopped), timeout=5, what="every PostgreSQL process stopped"
            )
            await asyncio.sleep(STALL_S)  # the fault's length, not a wait for a condition
            assert all_stopped(stopped), "PostgreSQL ran again during the stall"
        resumed_at = time.monotonic()
        try:
            await probes.wait_ok(DATABASE_KINDS, since=resumed_at, timeout=RECOVERY_S)
            # a second round: what comes after the first success counts too
            await probes.wait_ok(DATABASE_KINDS, since=time.monotonic(), timeout=RECOVERY_S)
        finally:
            recovered = {
                kind: first.ended - resumed_at
                for kind in DATABASE_KINDS
                if (first := probes.first_ok(kind, since=resumed_at)) is not None
            }
            print(f"stopped {len(stopped)} processes; recovered after SIGCONT: {recovered}")
    losses = await check_losses(envoy_target, tenant, probes)
    return Stall(probes, stopped_at, resumed_at, len(stopped), recovered, losses)


def _shown(records: list[Probe]) -> str:
    return "; ".join(
        f"{r.kind} {r.code.name} {r.reason} after {r.took:.2f}s: {r.message[:120]}"
        for r in records[:10]
    )


def test_the_stall_hit_the_database_calls(stall: Stall):
    assert stall.stopped >= 2, "the postmaster and at least one backend were stopped"
    failed = [r for r in stall.during() if r.kind in DATABASE_KINDS and not r.ok]
    assert {r.kind for r in failed} == set(DATABASE_KINDS), _shown(failed)


def test_database_calls_fail_within_their_deadline_as_unavailable_or_deadline_exceeded(
    stall: Stall,
):
    failed = [r for r in stall.probes.records if not r.ok]
    wrong = [r for r in failed if r.code not in EXPECTED]
    assert not wrong, _shown(wrong)
    late = [r for r in failed if r.took > DEADLINE_S + MARGIN_S]
    assert not late, _shown(late)


def test_unavailable_carries_error_info_and_retry_info(stall: Stall):
    unavailable = [r for r in stall.probes.records if r.code == grpc.StatusCode.UNAVAILABLE]
    without_info = [r for r in unavailable if not r.reason]
    assert not without_info, _shown(without_info)
    without_retry = [r for r in unavailable if r.reason == "DEPENDENCY_UNAVAILABLE" and not r.retry]
    assert not without_retry, _shown(without_retry)


def test_calls_without_the_database_keep_working(stall: Stall):
    free = [r for r in stall.during() if r.kind in FREE_KINDS]
    assert {r.kind for r in free} == set(FREE_KINDS), "each kept being called"
    failed = [r for r in free if not r.ok]
    assert not failed, _shown(failed)


def test_every_service_recovers_by_itself(stall: Stall):
    assert set(stall.recovered) == set(DATABASE_KINDS)
    # after the first success, the rest succeed too (no service is left half-broken)
    settled = stall.resumed_at + max(stall.recovered.values()) + 1.0
    after = [r for r in stall.probes.records if r.started >= settled and not r.ok]
    assert not after, _shown(after)


def test_no_acknowledged_task_is_lost_or_duplicated(stall: Stall):
    assert stall.probes.acknowledged.tasks, "SubmitTask acknowledged tasks"
    assert not stall.losses.tasks_lost
    assert not stall.losses.tasks_duplicated


def test_no_acknowledged_document_or_message_is_lost(stall: Stall):
    assert not stall.losses.documents_lost
    assert not stall.losses.messages_lost
    assert not stall.losses.messages_duplicated
