"""A real Prometheus on the test mesh (started as `switchboard up --prometheus` starts
it): it scrapes every process, sees a generation's tokens and a task's steps, and has
the SLO rules loaded."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from switchboard.execution.v1 import execution_pb2, execution_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2

from services.launcher import Mesh
from services.launcher._prometheus import RULES, prometheus_binary, scrape_targets
from tests.integration.conftest import as_tenant
from tests.polling import eventually

pytestmark = pytest.mark.skipif(
    prometheus_binary() is None, reason="needs Debian's prometheus package: make prometheus"
)

INFERENCE = "switchboard.inference.v1.InferenceService"
EXECUTION = "switchboard.execution.v1.ExecutionService"
WAIT_S = 90.0
"""Scrapes are 2 s apart; a loaded two-core machine may take many times that."""


@pytest.fixture(scope="module")
def prometheus(mesh: Mesh) -> Iterator[str]:
    mesh.start_prometheus()
    try:
        yield mesh.prometheus_url
    finally:
        mesh.stop_component("prometheus")


def api(base: str, path: str, **params: str) -> Any:
    """GET one of Prometheus' HTTP API endpoints; its `data`."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}/api/v1/{path}{query}", timeout=10) as reply:  # noqa: S310 - loopback
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


async def query(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    data = await asyncio.to_thread(api, base, "query", query=promql)
    assert data["resultType"] == "vector", data
    return data["result"]


async def test_prometheus_scrapes_every_process(mesh: Mesh, prometheus: str) -> None:
    wanted = {
        f"http://{t.address}{t.metrics_path}": (t.job, t.process)
        for t in scrape_targets(mesh.config)
    }

    async def all_up() -> bool:
        targets = (await asyncio.to_thread(api, prometheus, "targets"))["activeTargets"]
        seen = {t["scrapeUrl"]: t for t in targets}
        assert set(seen) <= set(wanted), sorted(set(seen) - set(wanted))
        if set(seen) != set(wanted):
            return False  # its discovery of the static targets still under way
        for url, (job, process) in wanted.items():
            assert seen[url]["labels"]["job"] == job
            assert seen[url]["labels"]["process"] == process
        return all(t["health"] == "up" for t in targets)

    await eventually(all_up, timeout=WAIT_S, interval=1.0, what="every target up")


async def test_a_generation_and_a_task_show_in_prometheus(
    mesh: Mesh, prometheus: str, inference, envoy_target: str
) -> None:
    tokens = 0
    async for reply in inference.Generate(
        inference_pb2.GenerateRequest(
            prompt="What does Envoy route?",
            context=[inference_pb2.Passage(source_id="envoy", text="Envoy routes gRPC calls.")],
            model="generator_small",
        ),
        timeout=60,
    ):
        if reply.HasField("complete"):
            assert reply.complete.model.name == "generator_small"
            tokens = reply.complete.usage.completion_tokens
    assert tokens > 0

    tenant = f"tenant-{uuid.uuid4().hex[:12]}"
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        execution = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        step = execution_pb2.Step(name="sum", code=execution_pb2.CodeStep(code="1 + 1"))
        task = (
            await execution.SubmitTask(
                execution_pb2.SubmitTaskRequest(steps=[step]),
                metadata=as_tenant(tenant),
                timeout=10,
            )
        ).task

        async def completed() -> bool:
            reply = await execution.GetTask(
                execution_pb2.GetTaskRequest(task_id=task.task_id),
                metadata=as_tenant(tenant),
                timeout=10,
            )
            return reply.task.state == execution_pb2.TASK_STATE_COMPLETED

        await eventually(completed, timeout=60, interval=0.2, what="the task completed")

    async def present(promql: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        async def check() -> bool:
            found[:] = await query(prometheus, promql)
            return bool(found)

        await eventually(check, timeout=WAIT_S, interval=1.0, what=promql)
        return found

    # the gRPC generation, counted by the inference replica that served it (the gateway,
    # which embeds a router for the HTTP API, counts its own generations under its job)
    (output,) = await present(
        'switchboard_genai_tokens_total{model="generator_small",tier="small",type="output",'
        'job="inference"} > 0'
    )
    assert output["metric"]["process"] == "inference"  # the replica, by its process name
    await present('switchboard_genai_tokens_total{model="generator_small",type="input"} > 0')
    await present(
        'switchboard_genai_time_to_first_token_seconds_count{model="generator_small"} > 0'
    )
    await present('switchboard_genai_generations_total{model="generator_small",reason="stop"} > 0')
    await present(
        f'switchboard_rpc_handled_total{{service="{INFERENCE}",method="Generate",code="OK"}} > 0'
    )
    await present(
        f'switchboard_rpc_handled_total{{service="{EXECUTION}",method="SubmitTask",code="OK"}} > 0'
    )
    # the breaker of every Triton replica, closed
    breakers = await present("switchboard_inference_breaker_state == 0")
    assert {b["metric"]["backend"] for b in breakers} >= set(mesh.triton_urls)
    # the work consumer's lag as the execution process reads it, and the step's sandbox
    await present('switchboard_execution_consumer_pending{consumer="workers",job="execution"}')
    await present('switchboard_sandbox_runs_total{termination="exited",job="worker"} > 0')
    # every PostgreSQL-backed service's pool
    pools = await present("switchboard_db_pool_max")
    assert {p["metric"]["job"] for p in pools} >= {"admission", "rag", "execution", "chat"}
    # Envoy's own metrics, and the admission queue
    await present("envoy_server_live == 1")
    await present("switchboard_admission_queue_depth")


async def test_the_slo_rules_are_loaded(prometheus: str) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    wanted = {g["name"]: {r.get("alert") or r["record"] for r in g["rules"]} for g in groups}

    async def loaded() -> bool:
        data = await asyncio.to_thread(api, prometheus, "rules")
        got = {g["name"]: {r["name"] for r in g["rules"]} for g in data["groups"]}
        if got != wanted:
            return False
        # evaluated at least once, without an error
        rules = [r for g in data["groups"] for r in g["rules"]]
        return all(r["health"] == "ok" for r in rules)

    await eventually(loaded, timeout=WAIT_S, interval=1.0, what="the rules loaded and evaluated")
