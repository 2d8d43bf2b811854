"""Admission fairness under overload: two tenants, one sending 10x the other, through Envoy.

Capacity is small and explicit: the `small` tier may hold CEILING leases at once on each
admission replica (`SWITCHBOARD_ADMISSION_TIER_MAX_IN_FLIGHT`, set before the mesh starts),
and every admitted request holds its lease HOLD_S, so one replica admits about
CEILING / HOLD_S requests per second. The two tenants are picked so that Envoy's ring hash
puts both on the same replica (they then compete for the same ceiling), and get the same
policy: weight 1 and limits far above anything sent, so only the tier ceiling binds.

Open loop: each tenant sends at a fixed rate (heavy = 10 x light, together about 3x
capacity), for RUN_S. A request is Admit (tier small, max_wait MAX_WAIT_S), then, if
admitted, hold the lease HOLD_S and Release. Waiters still queued after max_wait are
refused (that is the overload showing; they are counted, by tenant and reason).

Fairness is measured against max-min fair (water-filling) expectations over the
measuring window (after WARMUP_S): capacity C = the admitted rate of both tenants
together; each tenant's fair share is C/2 (equal weights); a tenant asking for less than
its fair share should get all it asks, and the other tenant the rest. So, with light's
demand d below C/2, light's expectation is d and heavy's C - d; otherwise C/2 each.
`*_vs_fair` = admitted rate / expectation; `light_share_error_pct` =
|light admitted / light expectation - 1| x 100; `jain_index` = Jain's index over the two
`*_vs_fair` (1 = perfectly fair).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.common.v1 import common_pb2

from bench._common import (
    RESULTS_DIR,
    api_key_metadata,
    ms,
    percentile,
    print_table,
    running_mesh,
    write_result,
)
from bench.admission_decisions import replica_targets, set_policies

NAME = "admission-fairness"
CEILING = 4
"""Leases the `small` tier may hold at once, per admission replica."""
HOLD_S = 0.1
"""How long every admitted request holds its lease: capacity ~ CEILING / HOLD_S = 40/s."""
LIGHT_PER_S = 11.0
HEAVY_PER_S = 110.0
"""10x the light tenant; 121/s together, about 3x capacity."""
RUN_S = 35.0
WARMUP_S = 5.0
"""Measured from WARMUP_S to RUN_S (the heavy tenant's queue fills first)."""
MAX_WAIT_S = 1.0
TIMEOUT_S = 10.0
REPLICA_HEADER = "x-admission-replica"
POLICY = {
    "weight": 1,
    "requests_per_second": 100_000.0,
    "request_burst": 100_000,
    "tokens_per_minute": 1_000_000_000_000,
    "token_burst": 1_000_000_000,
    "max_in_flight": 10_000,
    "max_queued": 10_000,
}
"""Equal weights; limits never reached, so only the tier ceiling binds."""
PLOT = RESULTS_DIR / f"{NAME}.png"


@dataclass
class Outcome:
    tenant: str  # "heavy" or "light"
    sent_at: float  # seconds since the run started
    done_at: float  # when Admit returned (admitted or refused)
    admitted: bool
    reason: str = ""  # the refusal's reason (ErrorInfo), or the status code
    queue_wait: float = 0.0  # as the service reports it

    @property
    def wait(self) -> float:
        """The Admit call as the client sees it: send to lease in hand (or refusal)."""
        return self.done_at - self.sent_at


@contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _replica_of(
    stub: admission_service_pb2_grpc.AdmissionServiceStub, metadata: tuple[tuple[str, str], ...]
) -> str:
    call = stub.GetQuota(admission_pb2.GetQuotaRequest(), metadata=metadata, timeout=TIMEOUT_S)
    await call
    return dict(await call.initial_metadata())[REPLICA_HEADER]


async def _pick_tenants(mesh: Any) -> tuple[str, str, str]:
    """(heavy, light, replica name): two fresh tenants Envoy routes to the same replica."""
    run = uuid.uuid4().hex[:6]
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        heavy = f"fair-heavy-{run}"
        replica = await _replica_of(stub, api_key_metadata(mesh, heavy))
        for n in range(64):
            light = f"fair-light-{run}-{n}"
            if await _replica_of(stub, api_key_metadata(mesh, light)) == replica:
                return heavy, light, replica
    raise RuntimeError("no light tenant found on the heavy tenant's replica")


async def _drive(mesh: Any, tenants: dict[str, str]) -> tuple[list[Outcome], int]:
    """Sends both tenants' requests for RUN_S (each with its API key); returns every
    outcome and the most leases the client held at once."""
    outcomes: list[Outcome] = []
    held = peak = 0
    keys = {tenant: api_key_metadata(mesh, tenant) for tenant in tenants.values()}
    async with grpc.aio.insecure_channel(mesh.envoy_address) as channel:
        stub = admission_service_pb2_grpc.AdmissionServiceStub(channel)
        start = time.perf_counter()

        async def one(kind: str, tenant: str, request: admission_pb2.AdmitRequest) -> None:
            nonlocal held, peak
            metadata = keys[tenant]
            sent = time.perf_counter() - start
            try:
                reply = await stub.Admit(request, metadata=metadata, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                reason = error.code().name
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                for key, value in error.trailing_metadata() or ():
                    if key == "grpc-status-details-bin":
                        reason = _reason(value) or reason
                outcomes.append(Outcome(kind, sent, time.perf_counter() - start, False, reason))
                return
            done = time.perf_counter() - start
            outcomes.append(
                Outcome(
                    kind,
                    sent,
                    done,
                    True,
                    queue_wait=reply.queue_wait.ToTimedelta().total_seconds(),
                )
            )
            held += 1
            peak = max(peak, held)
            await asyncio.sleep(HOLD_S)
            held -= 1
            await stub.Release(
                admission_pb2.ReleaseRequest(lease_id=reply.lease.lease_id),
                metadata=metadata,
                timeout=TIMEOUT_S,
            )

        async def sender(kind: str, tenant: str, per_s: float, phase: float) -> list[asyncio.Task]:
            request = admission_pb2.AdmitRequest(
                context=common_pb2.RequestContext(
                    tenant_id=tenant, priority=common_pb2.PRIORITY_INTERACTIVE
                ),
                tier=common_pb2.MODEL_TIER_SMALL,
                estimated_prompt_tokens=100,
                max_completion_tokens=50,
            )
            request.max_wait.FromTimedelta(timedelta(seconds=MAX_WAIT_S))
            tasks = []
            n = 0
            while (due := phase + n / per_s) < RUN_S:
                delay = due - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(kind, tenant, request)))
                n += 1
            return tasks

        senders = [
            sender("heavy", tenants["heavy"], HEAVY_PER_S, 0.0),
            sender("light", tenants["light"], LIGHT_PER_S, 0.5 / LIGHT_PER_S),
        ]
        requests = [t for tasks in await asyncio.gather(*senders) for t in tasks]
        await asyncio.gather(*requests)
    return outcomes, peak


def _reason(details: bytes) -> str:
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status.FromString(details)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def _expectations(capacity: float, demand: dict[str, float]) -> dict[str, float]:
    """Max-min fair (water-filling) allocation of `capacity` over equal-weight demands."""
    left, fair = capacity, {}
    pending = sorted(demand, key=demand.get)  # type: ignore[arg-type]
    while pending:
        share = left / len(pending)
        kind = pending.pop(0)
        fair[kind] = min(demand[kind], share) if pending else max(left, 0.0)
        left -= fair[kind]
    return fair


def _plot(outcomes: list[Outcome], rates: dict[str, float], expected: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"heavy": "tab:red", "light": "tab:blue"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8))
    seconds = int(RUN_S)  # the drain after the last send is left out
    for kind in ("heavy", "light"):
        per_s = [0] * seconds
        for o in outcomes:
            if o.tenant == kind and o.admitted and int(o.done_at) < seconds:
                per_s[int(o.done_at)] += 1
        top.step(range(seconds), per_s, where="post", color=colors[kind], label=f"{kind} admitted")
        top.axhline(rates[kind], color=colors[kind], ls=":", lw=1, label=f"{kind} offered")
        top.axhline(expected[kind], color=colors[kind], ls="--", lw=1, label=f"{kind} max-min fair")
    top.axvline(WARMUP_S, color="grey", lw=0.8)
    top.set_ylim(0, max(rates.values()) * 1.15)
    top.set_xlabel("seconds since start (measured after the grey line)")
    top.set_ylabel("admitted per second")
    top.set_title(
        f"admission under overload: tier ceiling {CEILING}, hold {ms(HOLD_S):.0f} ms, "
        f"heavy {HEAVY_PER_S:g}/s, light {LIGHT_PER_S:g}/s"
    )
    top.legend(fontsize=8, ncol=3, loc="center right")
    for kind in ("heavy", "light"):
        waits = sorted(ms(o.wait) for o in outcomes if o.tenant == kind and o.admitted)
        if waits:
            fractions = [(i + 1) / len(waits) for i in range(len(waits))]
            bottom.step(waits, fractions, where="post", color=colors[kind], label=kind)
    bottom.set_xscale("log")
    bottom.set_xlabel("Admit call until admitted, as the client sees it (ms, log)")
    bottom.set_ylabel("fraction of admitted requests")
    bottom.set_title("wait for a lease (admitted requests; refusals excluded)")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)


def run() -> dict:
    with _env(SWITCHBOARD_ADMISSION_TIER_MAX_IN_FLIGHT=f"small={CEILING}"):
        with running_mesh(triton_replicas=1) as mesh:
            heavy, light, replica = asyncio.run(_pick_tenants(mesh))
            target = replica_targets(mesh)[int(replica.rsplit("-", 1)[1])]
            print(f"  heavy {heavy!r} and light {light!r} both on {replica}", flush=True)
            asyncio.run(set_policies(mesh, target, [heavy, light], **POLICY))
            outcomes, peak = asyncio.run(_drive(mesh, {"heavy": heavy, "light": light}))
    if peak > CEILING:
        raise RuntimeError(f"{peak} leases held at once, over the tier ceiling {CEILING}")

    window = RUN_S - WARMUP_S
    kinds = ("heavy", "light")
    offered = {"heavy": HEAVY_PER_S, "light": LIGHT_PER_S}
    demand = {
        k: sum(o.tenant == k and WARMUP_S <= o.sent_at < RUN_S for o in outcomes) / window
        for k in kinds
    }
    admitted = {
        k: sum(o.tenant == k and o.admitted and WARMUP_S <= o.done_at < RUN_S for o in outcomes)
        / window
        for k in kinds
    }
    capacity = sum(admitted.values())
    expected = _expectations(capacity, demand)
    vs_fair = {k: admitted[k] / expected[k] for k in kinds}
    jain = sum(vs_fair.values()) ** 2 / (len(kinds) * sum(x * x for x in vs_fair.values()))
    refused = {k: [o.reason for o in outcomes if o.tenant == k and not o.admitted] for k in kinds}
    waits = {k: [o.wait for o in outcomes if o.tenant == k and o.admitted] for k in kinds}
    queue_waits = {
        k: [o.queue_wait for o in outcomes if o.tenant == k and o.admitted] for k in kinds
    }
    reasons = sorted({r for rs in refused.values() for r in rs})

    print_table(
        f"per tenant, {WARMUP_S:g}-{RUN_S:g}s (rates per second)",
        (
            "tenant",
            "offered",
            "admitted",
            "max-min fair",
            "vs fair",
            "refused",
            "wait p50 ms",
            "wait p99 ms",
        ),
        [
            (
                k,
                f"{demand[k]:.1f}",
                f"{admitted[k]:.1f}",
                f"{expected[k]:.1f}",
                f"{vs_fair[k]:.3f}",
                len(refused[k]),
                f"{ms(percentile(waits[k], 50)):.1f}",
                f"{ms(percentile(waits[k], 99)):.1f}",
            )
            for k in kinds
        ],
    )
    _plot(outcomes, offered, expected)
    print(f"  wrote {PLOT}")
    metrics = {
        "light_share_error_pct": abs(vs_fair["light"] - 1) * 100,
        "jain_index": jain,
        "light_wait_p50_ms": ms(percentile(waits["light"], 50)),
        "light_wait_p99_ms": ms(percentile(waits["light"], 99)),
        "light_queue_wait_p99_ms": ms(percentile(queue_waits["light"], 99)),
        "heavy_wait_p99_ms": ms(percentile(waits["heavy"], 99)),
        "refused": float(sum(len(r) for r in refused.values())),
        "light_refused": float(len(refused["light"])),
        "heavy_refused": float(len(refused["heavy"])),
        "capacity_per_s": capacity,
        "light_demand_per_s": demand["light"],
        "heavy_demand_per_s": demand["heavy"],
        "light_admitted_per_s": admitted["light"],
        "heavy_admitted_per_s": admitted["heavy"],
        "light_vs_fair": vs_fair["light"],
        "heavy_vs_fair": vs_fair["heavy"],
        "light_share_of_capacity": admitted["light"] / capacity,
        "heavy_share_of_capacity": admitted["heavy"] / capacity,
    }
    notes = (
        f"through Envoy to 2 admission replicas, both tenants on {replica}; tier 'small' "
        f"ceiling {CEILING} leases per replica (SWITCHBOARD_ADMISSION_TIER_MAX_IN_FLIGHT), "
        f"each lease held {ms(HOLD_S):.0f} ms then released (capacity ~{CEILING / HOLD_S:g}/s, "
        f"measured {capacity:.1f}/s); equal-weight policies (weight 1, other limits never "
        f"reached); open loop at fixed rates, heavy {HEAVY_PER_S:g}/s, light "
        f"{LIGHT_PER_S:g}/s ({(HEAVY_PER_S + LIGHT_PER_S) / capacity:.1f}x capacity), for "
        f"{RUN_S:g}s, measured from {WARMUP_S:g}s; Admit with max_wait {MAX_WAIT_S:g}s, a waiter "
        f"still queued then is refused (reasons: {', '.join(reasons) or 'none'}); refused = all "
        "refusals over the run. Expectations are max-min fair over the window: capacity C = "
        "both tenants' admitted rate; fair share C/2 each; a tenant demanding less than C/2 "
        "is expected to get its whole demand, the other the rest. *_vs_fair = admitted / "
        "expected; light_share_error_pct = |light admitted / light expected - 1| x 100; "
        "jain_index = Jain's index over the *_vs_fair; waits = the Admit call as the client "
        "sees it, admitted requests only (light_queue_wait = as the service reports it); "
        f"at most {peak} leases held at once. Every lease is held exactly {ms(HOLD_S):.0f} ms, "
        "so the ceiling's slots likely free in a bunch about once per hold (they were first "
        "taken by heavy's arrivals a few ms apart), which would put light's wait between 0 "
        f"and about one hold; plot: {PLOT.name}"
    )
    targets: dict[str, str] = {}
    return write_result(NAME, metrics, targets, notes)
