"""Admission decisions: how fast the controller decides, and what a gRPC Admit costs.

Two parts:

- in-process: `AdmissionController` as the service builds it (real monotonic clock, the
  Prometheus wait observer), many tenants with generous policies, a `small` tier with a
  ceiling never reached. Each decision is a `submit` admitted at once plus the `release`
  of a lease taken LEASES_HELD decisions earlier, so leases are always in flight. Timed
  with the thread's CPU clock: decisions per CPU-second is decisions per second on one
  core, whatever else shares the machine;
- gRPC: the real mesh; Admit then Release, CONCURRENCY workers back to back, sent to ONE
  admission replica on its own port (not through Envoy), and in the same run the bare
  grpc.aio echo server of `grpc_ceiling` (its own process) at the same concurrency, and
  that echo on the Switchboard runtime (the runtime's share of Admit's cost). The three
  take turns in short slices. Admit is timed alone (it is the call on a request's
  path; Release happens after the request); Release is reported too.

Every admission must be granted at once: a refusal, or an Admit that waited, fails the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from bench._common import (
    ms,
    operator_metadata,
    percentile,
    print_table,
    rotated,
    running_mesh,
    stop_process,
    write_result,
)
from bench.grpc_ceiling import METHOD, PAYLOAD
from bench.grpc_ceiling import _start as start_echo_server

NAME = "admission-decisions"

# -- in-process ------------------------------------------------------------------------------

TENANTS = 1_000
LEASES_HELD = 64
"""Leases in flight throughout: each decision releases the lease taken this many before."""
DECISIONS = 20_000
"""Per round (admit + release = one decision)."""
ROUNDS = 7
"""The median round is reported; one warm-up round first."""
PROMPT_TOKENS, COMPLETION_TOKENS, USED_TOKENS = 120, 64, 150

# -- gRPC ------------------------------------------------------------------------------------

CONCURRENCY = 16
WARMUP_S = 1.0
SLICE_S = 0.5
SLICES = 20
"""Per arm: 20 x 0.5 s = 10 s measured for each, alternating slice by slice."""
GRPC_TENANTS = 16
TIMEOUT_S = 10.0
POLICY_APPLIED_S = 15.0

GENEROUS = {
    "requests_per_second": 1_000_000.0,
    "request_burst": 1_000_000,
    "tokens_per_minute": 1_000_000_000_000,
    "token_burst": 1_000_000_000,
    "max_in_flight": 100_000,
    "max_queued": 1_000,
}
"""Limits no benchmark here reaches (the default policy allows 10 requests/s)."""


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call to an admission replica's own port (no Envoy, so no API key)."""
    return (("x-tenant-id", tenant),)


# -- in-process decision rate ----------------------------------------------------------------


def _decision_rate() -> tuple[float, float, int]:
    """(median decisions per CPU-second, median per wall-second, refusals)."""
    from services.admission import DEFAULT_POLICY, AdmissionController, AdmissionRequest, metrics
    from services.runtime import ResourceExhausted

    controller = AdmissionController(wait_observer=metrics.observe_wait)
    limits = dataclasses.replace(DEFAULT_POLICY, **GENEROUS)
    tenants = [f"tenant-{i:04d}" for i in range(TENANTS)]
    for tenant in tenants:
        controller.set_policy(tenant, limits)
    controller.set_tier_capacity("small", max_in_flight=TENANTS * LEASES_HELD)
    held: deque[str] = deque()
    refused = 0

    def one_round(n: int, offset: int) -> None:
        nonlocal refused
        submit, release = controller.submit, controller.release
        for i in range(offset, offset + n):
            try:
                ticket = submit(
                    AdmissionRequest(  # built per decision, as the servicer does per call
                        tenant_id=tenants[i % TENANTS],
                        tier="small",
                        prompt_tokens=PROMPT_TOKENS,
                        completion_tokens=COMPLETION_TOKENS,
                        no_wait=True,
                    )
                )
            except ResourceExhausted:
                refused += 1
                continue
            held.append(ticket.lease.lease_id)  # type: ignore[union-attr]
            if len(held) > LEASES_HELD:
                release(held.popleft(), actual_tokens=USED_TOKENS)

    one_round(DECISIONS, 0)  # warm-up
    cpu_rates, wall_rates = [], []
    for r in range(ROUNDS):
        cpu, wall = time.thread_time(), time.perf_counter()
        one_round(DECISIONS, (r + 1) * DECISIONS)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        cpu_rates.append(DECISIONS / cpu)
        wall_rates.append(DECISIONS / wall)
    if controller.in_flight() != len(held):
        raise RuntimeError(f"{controller.in_flight()} leases in flight, {len(held)} held")
    return statistics.median(cpu_rates), statistics.median(wall_rates), refused


# -- gRPC, shared with admission_fairness ----------------------------------------------------


async def set_policies(mesh: Any, replica: str, tenants: list[str], **fields: float) -> None:
    """Stores a policy with `fields` for each tenant (through Envoy with an operator
    credential, as an operator would) and waits until the admission replica at `replica` has it in
    force."""
    async with (
        grpc.aio.insecure_channel(mesh.envoy_address) as via_envoy,
        grpc.aio.insecure_channel(replica) as direct,
    ):
        stub = admission_service_pb2_grpc.AdmissionServiceStub(via_envoy)
        for tenant in tenants:
            await stub.UpdatePolicy(
                admission_pb2.UpdatePolicyRequest(
                    policy=admission_pb2.Policy(tenant_id=tenant, **fields),
                    update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
                ),
                metadata=operator_metadata(mesh),
                timeout=TIMEOUT_S,
            )
        replica_stub = admission_service_pb2_grpc.AdmissionServiceStub(direct)
        deadline = time.monotonic() + POLICY_APPLIED_S
        pending = list(tenants)
        while pending:
            reply = await replica_stub.GetQuota(
                admission_pb2.GetQuotaRequest(),
                metadata=tenant_metadata(pending[0]),
                timeout=TIMEOUT_S,
            )
            policy = reply.quota.policy
            if all(getattr(policy, k) == v for k, v in fields.items()):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{replica} did not apply the policy of {pending[0]!r} "
                    f"within {POLICY_APPLIED_S:g}s"
                )
            await asyncio.sleep(0.2)


def replica_targets(mesh: object) -> list[str]:
    """host:port of each admission replica, as the launcher places them."""
    config = mesh.config  # type: ignore[attr-defined]
    return [
        f"{config.host}:{config.admission_port + 10 * i}" for i in range(config.admission_replicas)
    ]


# -- gRPC latency ----------------------------------------------------------------------------


class _Arm:
    """One side of the comparison: its call, and the latencies of its slices."""

    def __init__(self) -> None:
        self.first: list[float] = []  # Admit, or the echo
        self.second: list[float] = []  # Release (admission only)
        self.calls = 0
        self.seconds = 0.0


async def _slice(call, concurrency: int, seconds: float, arm: _Arm | None) -> None:
    """`concurrency` workers calling back to back for `seconds` (like `closed_loop`, but
    each call records its own phases)."""
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < end:
            await call(i, arm)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    if arm is not None:
        arm.seconds += time.perf_counter() - started


ECHO_SERVERS = {"echo": "bare", "runtime_echo": "runtime"}
"""Arm -> `grpc_ceiling` server mode: the bare grpc.aio echo (the target's reference), and
the same echo on the Switchboard runtime the admission service runs on (interceptor,
metrics, JSON access log), which tells the runtime's share from admission's own."""


async def _grpc_latency(
    admission: str, echoes: dict[str, str], tenants: list[str]
) -> dict[str, _Arm]:
    waited = 0
    channels = {name: grpc.aio.insecure_channel(t) for name, t in echoes.items()}
    async with grpc.aio.insecure_channel(admission) as admission_channel:
        stub = admission_service_pb2_grpc.AdmissionServiceStub(admission_channel)
        requests = [
            admission_pb2.AdmitRequest(
                context=common_pb2.RequestContext(
                    tenant_id=t, priority=common_pb2.PRIORITY_INTERACTIVE
                ),
                tier=common_pb2.MODEL_TIER_UNSPECIFIED,
                estimated_prompt_tokens=PROMPT_TOKENS,
                max_completion_tokens=COMPLETION_TOKENS,
                no_wait=True,
            )
            for t in tenants
        ]
        metadata = [tenant_metadata(t) for t in tenants]
        usage = common_pb2.TokenUsage(
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=USED_TOKENS - PROMPT_TOKENS,
            total_tokens=USED_TOKENS,
        )

        async def admit(i: int, arm: _Arm | None) -> None:
            nonlocal waited
            k = i % len(tenants)
            began = time.perf_counter()
            reply = await stub.Admit(requests[k], metadata=metadata[k], timeout=TIMEOUT_S)
            admitted = time.perf_counter()
            await stub.Release(
                admission_pb2.ReleaseRequest(lease_id=reply.lease.lease_id, actual_usage=usage),
                metadata=metadata[k],
                timeout=TIMEOUT_S,
            )
            released = time.perf_counter()
            if reply.queue_wait.ToTimedelta().total_seconds() > 0:
                waited += 1
            if arm is not None:
                arm.first.append(admitted - began)
                arm.second.append(released - admitted)
                arm.calls += 1

        def echo_arm(channel: grpc.aio.Channel):
            echo_call = channel.unary_unary(METHOD)

            async def echo_once(i: int, arm: _Arm | None) -> None:
                began = time.perf_counter()
                await echo_call(PAYLOAD, timeout=TIMEOUT_S)
                if arm is not None:
                    arm.first.append(time.perf_counter() - began)
                    arm.calls += 1

            return echo_once

        calls = {"admit": admit, **{name: echo_arm(c) for name, c in channels.items()}}
        arms = {name: _Arm() for name in calls}
        try:
            for call in calls.values():
                await _slice(call, CONCURRENCY, WARMUP_S, None)
            for n in range(SLICES):
                for name in rotated(list(calls), n):
                    await _slice(calls[name], CONCURRENCY, SLICE_S, arms[name])
        finally:
            for channel in channels.values():
                await channel.close()
    if waited:
        raise RuntimeError(f"{waited} Admit calls waited in the queue: the policy is not ample")
    return arms


def _grpc_part() -> dict[str, _Arm]:
    tenants = [f"bench-admit-{i:02d}" for i in range(GRPC_TENANTS)]
    with running_mesh(triton_replicas=1) as mesh, tempfile.TemporaryDirectory() as tmp:
        replica = replica_targets(mesh)[0]
        asyncio.run(set_policies(mesh, replica, tenants, **GENEROUS))
        servers = {}
        try:
            for name, mode in ECHO_SERVERS.items():
                servers[name] = start_echo_server(mode, Path(tmp) / f"{name}.log")
            echoes = {name: target for name, (_, target) in servers.items()}
            return asyncio.run(_grpc_latency(replica, echoes, tenants))
        finally:
            for proc, _ in servers.values():
                stop_process(proc)


def run() -> dict:
    per_core, per_wall_s, refused = _decision_rate()
    print(
        f"  in-process: {per_core:,.0f} decisions per CPU-second "
        f"({per_wall_s:,.0f} per wall-second), {refused} refused",
        flush=True,
    )
    if refused:
        raise RuntimeError(f"{refused} in-process admissions refused: the policy is not ample")
    try:
        arms = _grpc_part()
    except grpc.aio.AioRpcError as error:
        raise RuntimeError(
            f"gRPC part failed (a refusal?): {error.code()} {error.details()}"
        ) from error

    admit, echo, runtime = arms["admit"], arms["echo"], arms["runtime_echo"]
    series = {
        "admit": admit.first,
        "release": admit.second,
        "echo": echo.first,
        "runtime_echo": runtime.first,
    }
    p = {(what, q): ms(percentile(values, q)) for what, values in series.items() for q in (50, 99)}
    print_table(
        f"gRPC latency at {CONCURRENCY} in flight (ms)",
        ("call", "p50", "p99", "n", "per s"),
        [
            ("Admit (one replica, direct)", *(f"{p['admit', q]:.3f}" for q in (50, 99)))
            + (len(admit.first), f"{admit.calls / admit.seconds:.0f}"),
            ("Release (same calls)", *(f"{p['release', q]:.3f}" for q in (50, 99)))
            + (len(admit.second), ""),
            ("bare grpc.aio echo", *(f"{p['echo', q]:.3f}" for q in (50, 99)))
            + (len(echo.first), f"{echo.calls / echo.seconds:.0f}"),
            ("runtime echo", *(f"{p['runtime_echo', q]:.3f}" for q in (50, 99)))
            + (len(runtime.first), f"{runtime.calls / runtime.seconds:.0f}"),
        ],
    )
    metrics = {
        "decisions_per_s_per_core": per_core,
        "decisions_per_wall_s": per_wall_s,
        "admit_p50_ms": p["admit", 50],
        "admit_p99_ms": p["admit", 99],
        "release_p50_ms": p["release", 50],
        "release_p99_ms": p["release", 99],
        "echo_p50_ms": p["echo", 50],
        "echo_p99_ms": p["echo", 99],
        "runtime_echo_p50_ms": p["runtime_echo", 50],
        "runtime_echo_p99_ms": p["runtime_echo", 99],
        "admit_vs_echo_p99": p["admit", 99] / p["echo", 99],
        "admit_vs_runtime_echo_p99": p["admit", 99] / p["runtime_echo", 99],
        "refused": float(refused),
    }
    notes = (
        f"in-process: AdmissionController as the service builds it (monotonic clock, "
        f"Prometheus wait observer), {TENANTS} tenants round-robin with ample policies, tier "
        f"'small' with a ceiling never reached, {LEASES_HELD} leases held throughout; one "
        f"decision = submit (admitted at once) + release of an earlier lease; median of "
        f"{ROUNDS} rounds of {DECISIONS:,} after a warm-up round, per thread CPU-second "
        f"(= per core; per wall-second also given). gRPC: real mesh, admission replica 0 on "
        f"its own port (no Envoy), {GRPC_TENANTS} tenants with ample policies, no tier, "
        f"{CONCURRENCY} workers each Admit then Release back to back (admit = the Admit call "
        f"alone, release = the Release after it); echo = bare grpc.aio echo server of "
        f"grpc-ceiling ({len(PAYLOAD)} bytes) at {CONCURRENCY} in flight, runtime_echo = the "
        f"same echo on services.runtime.serve (what admission runs on: interceptor, metrics, "
        f"JSON access log); the three alternate in {SLICE_S:g}s slices, {SLICES} each, "
        f"after {WARMUP_S:g}s warm-up each; one "
        f"grpc.aio client process; refusals or queue waits fail the run (none)"
    )
    targets = {"decisions_per_s_per_core": ">= 20000", "admit_vs_echo_p99": "<= 2"}
    return write_result(NAME, metrics, targets, notes)
