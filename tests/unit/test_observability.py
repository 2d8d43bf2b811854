"""Metrics the services export and the Prometheus config the launcher writes (no
sockets, no processes: the registry is read in memory)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from services.inference import metrics as inference_metrics
from services.inference.breaker import BackendBreaker
from services.launcher import LauncherConfig, service_processes
from services.launcher._ports import planned_ports
from services.launcher._prometheus import (
    RULES,
    prometheus_command,
    render_config,
    scrape_targets,
    write_config,
    write_service_targets,
)
from services.runtime import Database


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_generation_counts_its_tokens_first_token_and_time_per_token() -> None:
    model, tier = "unit_model", "small"
    before = {
        "in": sample("switchboard_genai_tokens_total", model=model, tier=tier, type="input"),
        "out": sample("switchboard_genai_tokens_total", model=model, tier=tier, type="output"),
        "stop": sample(
            "switchboard_genai_generations_total", model=model, tier=tier, reason="stop"
        ),
    }
    inference_metrics.record_generation(
        model=model,
        tier=tier,
        reason="stop",
        input_tokens=40,
        output_tokens=11,
        first_token_s=0.2,
        duration_s=0.7,
    )
    assert sample("switchboard_genai_tokens_total", model=model, tier=tier, type="input") == (
        before["in"] + 40
    )
    assert sample("switchboard_genai_tokens_total", model=model, tier=tier, type="output") == (
        before["out"] + 11
    )
    assert (
        sample("switchboard_genai_generations_total", model=model, tier=tier, reason="stop")
        == before["stop"] + 1
    )
    # the first token after 0.2 s; ten more in the next 0.5 s: 0.05 s each
    ttft = "switchboard_genai_time_to_first_token_seconds"
    assert sample(f"{ttft}_bucket", model=model, le="0.25") >= 1
    assert sample(f"{ttft}_bucket", model=model, le="0.1") == 0
    tpot = "switchboard_genai_time_per_output_token_seconds"
    assert sample(f"{tpot}_sum", model=model) == pytest.approx(0.05)


def test_a_generation_without_a_token_has_no_latency_sample() -> None:
    model = "unit_failed_model"
    inference_metrics.record_generation(
        model=model,
        tier="large",
        reason="error",
        input_tokens=5,
        output_tokens=0,
        first_token_s=None,
        duration_s=0.1,
    )
    assert (
        sample("switchboard_genai_generations_total", model=model, tier="large", reason="error")
        == 1
    )
    assert sample("switchboard_genai_time_to_first_token_seconds_count", model=model) == 0


def test_breaker_state_is_read_at_scrape_time() -> None:
    now = [0.0]
    breaker = BackendBreaker(
        "10.0.0.9:8001", fail_max=1, reset=timedelta(seconds=5), clock=lambda: now[0]
    )
    collector = inference_metrics.register(lambda: [(breaker.name, breaker)])
    try:

        def state() -> float | None:
            return REGISTRY.get_sample_value(
                "switchboard_inference_breaker_state", {"backend": "10.0.0.9:8001"}
            )

        assert state() == 0
        breaker.record_failure()
        assert state() == 2
        now[0] = 6.0
        assert state() == 1
        breaker.record_success()
        assert state() == 0
    finally:
        inference_metrics.unregister(collector)
    assert (
        REGISTRY.get_sample_value(
            "switchboard_inference_breaker_state", {"backend": "10.0.0.9:8001"}
        )
        is None
    )


def test_pools_not_open_export_nothing() -> None:
    db = Database("postgresql://nobody@127.0.0.1:1/none", name="unit")
    assert db.name == "unit"
    assert REGISTRY.get_sample_value("switchboard_db_pool_max", {"pool": "unit"}) is None


def test_every_process_is_a_scrape_target(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path, admission_replicas=3, workers=2)
    targets = scrape_targets(config)
    processes = [spec.process_name(config, i) for spec, i in service_processes(config)]
    assert [t.process for t in targets] == [*processes, "triton-0", "triton-1", "control", "envoy"]
    ports = [int(t.address.rsplit(":", 1)[1]) for t in targets]
    assert ports[: len(processes)] == [
        spec.metrics_port(config, i) for spec, i in service_processes(config)
    ]
    assert len(set(ports)) == len(ports)
    assert ports[-4:-2] == [config.triton_ports(0)[2], config.triton_ports(1)[2]]
    assert ports[-2] == config.metrics_base_port + 50
    assert targets[-1].address == f"127.0.0.1:{config.envoy_admin_port}"
    assert targets[-1].metrics_path == "/stats/prometheus"
    external = replace(config, triton_url="gpu-box:8001")
    assert not [t for t in scrape_targets(external) if t.job == "triton"]


def test_the_config_has_a_job_per_kind_the_rules_and_a_short_interval(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path)
    path = tmp_path / "prometheus.yml"
    write_config(path, render_config(scrape_targets(config)))
    written = yaml.safe_load(path.read_text())
    assert written["global"]["scrape_interval"] == "2s"
    assert written["rule_files"] == [str(RULES)]
    assert RULES.exists()
    jobs = {job["job_name"]: job for job in written["scrape_configs"]}
    assert set(jobs) == {spec.name for spec, _ in service_processes(config)} | {
        "triton",
        "envoy",
        "control",
    }
    admission = jobs["admission"]["static_configs"]
    assert [c["labels"]["process"] for c in admission] == ["admission-0", "admission-1"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"


def test_the_services_targets_come_from_files_the_control_plane_keeps(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path)
    targets = scrape_targets(config)
    rendered = render_config(targets, targets_dir=tmp_path / "targets")
    jobs = {job["job_name"]: job for job in rendered["scrape_configs"]}
    assert jobs["admission"]["file_sd_configs"] == [
        {"files": [str(tmp_path / "targets" / "admission.json")], "refresh_interval": "2s"}
    ]
    assert "static_configs" in jobs["triton"] and "static_configs" in jobs["envoy"]
    write_service_targets(tmp_path / "targets", [t for t in targets if t.process != "rag"])
    written = json.loads((tmp_path / "targets" / "admission.json").read_text())
    assert written == [
        {"targets": [f"127.0.0.1:{config.metrics_base_port + 1}"], "labels": {"process": p}}
        for p in ("admission-0",)
    ] + [
        {
            "targets": [f"127.0.0.1:{config.metrics_base_port + 11}"],
            "labels": {"process": "admission-1"},
        }
    ]
    assert json.loads((tmp_path / "targets" / "rag.json").read_text()) == []


def test_prometheus_listens_on_loopback_with_its_data_in_the_run_directory(
    tmp_path: Path,
) -> None:
    argv = prometheus_command(
        binary="/usr/bin/prometheus",
        config_path=tmp_path / "prometheus.yml",
        data_dir=tmp_path / "prometheus",
        host="127.0.0.1",
        port=9090,
    )
    assert f"--storage.tsdb.path={tmp_path / 'prometheus'}" in argv
    assert "--web.listen-address=127.0.0.1:9090" in argv


def test_the_prometheus_port_is_planned_only_when_asked_for(tmp_path: Path) -> None:
    config = LauncherConfig(run_dir=tmp_path)
    assert "prometheus" not in [p.what for p in planned_ports(config)]
    planned = planned_ports(replace(config, prometheus=True))
    (port,) = [p for p in planned if p.what == "prometheus"]
    assert port.port == 9090
    assert port.variable == "SWITCHBOARD_PROMETHEUS_PORT"
    assert len({p.port for p in planned}) == len(planned)
