"""Fuzzing every public RPC through Envoy, longer than `make test` does: generated and
malformed requests (`tests/fuzz_run.py`), FUZZ_CASES per RPC (default 2,000). Writes
`bench/results/fuzz.json`; `fuzz_cases` and `fuzz_internal_errors` are also merged into
`bench/results/faults.json`."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from bench._common import (
    api_key_metadata,
    merge_metrics,
    operator_metadata,
    running_mesh,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "fuzz"
CASES_PER_RPC = int(os.environ.get("FUZZ_CASES", "2000"))
CONCURRENCY = 16


def run() -> dict[str, Any]:
    from tests import fuzz_run

    with running_mesh() as mesh:
        before = fuzz_run.processes(mesh)
        tenants = fuzz_run.fuzz_tenants(
            lambda tenant: api_key_metadata(mesh, tenant),
            lambda tenant: operator_metadata(mesh) + (("x-tenant-id", tenant),),
        )
        fuzzed = asyncio.run(_fuzz(mesh.envoy_address, tenants))
        after = fuzz_run.processes(mesh)
        crashed = sorted(n for n in before if after.get(n) != before[n])
        sick = fuzz_run.unhealthy(mesh)
    tally = fuzzed.tally
    if tally.findings:
        print(fuzz_run.summary(tally.findings))
    for name in crashed:
        print(f"  process gone or replaced: {name}")
    for problem in sick:
        print(f"  unhealthy afterwards: {problem}")
    per_rpc = min(tally.cases.values())
    codes = ", ".join(f"{code} {n}" for code, n in tally.codes.most_common())
    notes = (
        f"{tally.total:,} cases over {len(tally.cases)} public RPCs through Envoy "
        f"(at least {per_rpc:,} each, one in {fuzz_run.RAW_SHARE} malformed bytes, "
        f"concurrency {CONCURRENCY}, {tally.seconds:.0f} s); outcomes: {codes}; "
        f"{len(crashed)} processes lost, {len(sick)} unhealthy afterwards"
    )
    metrics = {
        "fuzz_cases": tally.total,
        "fuzz_cases_per_rpc": per_rpc,
        "fuzz_internal_errors": len(tally.findings),
        "fuzz_processes_lost": len(crashed),
        "fuzz_unhealthy_after": len(sick),
    }
    targets = {
        "fuzz_internal_errors": "<= 0",
        "fuzz_processes_lost": "<= 0",
        "fuzz_unhealthy_after": "<= 0",
    }
    result = write_result(NAME, metrics, targets, notes)
    merge_metrics(
        "faults",
        {k: metrics[k] for k in ("fuzz_cases", "fuzz_internal_errors")},
        source=NAME,
    )
    return result


async def _fuzz(target: str, tenants: Any) -> Any:
    from tests import fuzz_run

    return await fuzz_run.fuzz(
        target,
        tenants,
        per_rpc=CASES_PER_RPC,
        concurrency=CONCURRENCY,
        progress=lambda line: print(f"  {line}", flush=True),
    )


if __name__ == "__main__":
    run()
