"""The Envoy configs the Kubernetes chart deploys (its ConfigMaps, as Helm renders them
for a namespace) are accepted by the Envoy the mesh runs: `envoy --mode validate` loads
each one whole (listeners, filters, STRICT_DNS clusters, health checks) without serving.
It starts Envoy, so it lives here, not with the chart's unit tests; it needs no mesh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.launcher._envoy_process import envoy_binary
from tests.unit.test_deploy_chart import SECRETS, by_name, render


def validate(directory: Path, config: str) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` of `config`: loads it whole, serves nothing."""
    path = directory / "envoy.yaml"
    path.write_text(config)
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("config_map", ["switchboard-envoy-edge", "switchboard-envoy-sidecar"])
def test_envoy_accepts_the_config_the_chart_deploys(tmp_path: Path, config_map: str) -> None:
    text = by_name(render(SECRETS, namespace="ai"), "ConfigMap", config_map)["data"]["envoy.yaml"]
    assert "switchboard-chat.ai.svc.cluster.local" in text  # the namespace filled in
    done = validate(tmp_path, text)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration" in done.stdout and "OK" in done.stdout, done.stdout


def test_envoy_refuses_a_broken_config(tmp_path: Path) -> None:
    """The check can fail: a config naming a cluster that does not exist is refused."""
    text = by_name(render(SECRETS), "ConfigMap", "switchboard-envoy-edge")["data"]["envoy.yaml"]
    broken = text.replace("cluster: chat\n", "cluster: no-such-cluster\n", 1)
    assert broken != text
    assert validate(tmp_path, broken).returncode != 0
