"""A real Prometheus for the local mesh (`switchboard up --prometheus`): its scrape
config, written into the run directory, and its command line.

Debian's `prometheus` package gives the binaries (`make prometheus` installs it); only
`/usr/bin/prometheus` is run, never the package's service. Every service replica's
metrics port is a target labelled with its service (`job`) and process (`process`),
read from a file per service that the control plane rewrites whenever its replicas
change (`file_sd`); Triton's metrics, Envoy's `/stats/prometheus` and the control
plane's own are static targets. The SLO rules are `deploy/prometheus/rules.yml`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from services.launcher._config import REPO_ROOT, LauncherConfig
from services.launcher._services import SERVICES, service_processes

logger = logging.getLogger(__name__)

TARGETS_DIR = "scrape-targets"
"""The run directory's folder of the services' file_sd files."""
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
"""Recording and alerting rules of the SLOs (tested by `promtool test rules` against
`rules_test.yml` beside it)."""
SCRAPE_INTERVAL = timedelta(seconds=2)
"""Short, so a test or a look right after some calls sees them."""
RETENTION = timedelta(days=2)
BINARY = "/usr/bin/prometheus"


@dataclass(frozen=True)
class ScrapeTarget:
    """One `/metrics` endpoint: `job` is the kind of process, `process` the one."""

    job: str
    process: str
    address: str
    metrics_path: str = "/metrics"


def prometheus_binary() -> str | None:
    """Debian's binary, else one on PATH; None when neither is there."""
    if os.access(BINARY, os.X_OK):
        return BINARY
    return shutil.which("prometheus")


def scrape_targets(config: LauncherConfig) -> list[ScrapeTarget]:
    """Every metrics endpoint of the mesh `config` describes as `up` starts it: each
    service process's, each embedded Triton replica's, the control plane's, Envoy's."""
    host = config.host
    targets = [
        ScrapeTarget(
            spec.name, spec.process_name(config, slot), f"{host}:{spec.metrics_port(config, slot)}"
        )
        for spec, slot in service_processes(config)
    ]
    if not config.triton_url:
        targets += [
            ScrapeTarget("triton", f"triton-{i}", f"{host}:{config.triton_ports(i)[2]}")
            for i in range(config.triton_replicas)
        ]
    targets.append(ScrapeTarget("control", "control", f"127.0.0.1:{config.metrics_base_port + 50}"))
    targets.append(
        ScrapeTarget(
            "envoy",
            "envoy",
            f"127.0.0.1:{config.envoy_admin_port}",
            metrics_path="/stats/prometheus",
        )
    )
    return targets


def render_config(
    targets: Sequence[ScrapeTarget],
    *,
    rules: Sequence[Path] = (RULES,),
    interval: timedelta = SCRAPE_INTERVAL,
    targets_dir: Path | None = None,
) -> dict[str, Any]:
    """prometheus.yml: one scrape job per kind of process (and metrics path); a service's
    targets are read from `targets_dir/<service>.json` (`write_service_targets`) when
    given, every other target is static."""
    seconds = f"{interval.total_seconds():g}s"
    jobs: dict[tuple[str, str], list[ScrapeTarget]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.metrics_path), []).append(target)
    return {
        "global": {
            "scrape_interval": seconds,
            "scrape_timeout": seconds,
            "evaluation_interval": seconds,
            "external_labels": {"mesh": "switchboard"},
        },
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [
            {"job_name": job, "metrics_path": path, **_targets(job, group, targets_dir, seconds)}
            for (job, path), group in jobs.items()
        ],
    }


SERVICE_JOBS = frozenset(spec.name for spec in SERVICES)
"""The jobs whose targets the control plane keeps in files (its replicas come and go)."""


def _targets(
    job: str, group: Sequence[ScrapeTarget], targets_dir: Path | None, refresh: str
) -> dict[str, Any]:
    if targets_dir is not None and job in SERVICE_JOBS:
        return {
            "file_sd_configs": [
                {"files": [str(targets_dir / f"{job}.json")], "refresh_interval": refresh}
            ]
        }
    return {"static_configs": [_group(t) for t in group]}


def _group(target: ScrapeTarget) -> dict[str, Any]:
    return {"targets": [target.address], "labels": {"process": target.process}}


def write_service_targets(targets_dir: Path, targets: Sequence[ScrapeTarget]) -> None:
    """One file_sd file per service with its targets now (an empty list for a service
    without any), each replaced atomically."""
    targets_dir.mkdir(parents=True, exist_ok=True)
    for job in sorted(SERVICE_JOBS):
        groups = [_group(t) for t in targets if t.job == job]
        fd, tmp = tempfile.mkstemp(dir=targets_dir, prefix=f".{job}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(groups, out)
            os.replace(tmp, targets_dir / f"{job}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Writes `config` as YAML, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(config, out, sort_keys=False, default_flow_style=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prometheus_command(
    *, binary: str, config_path: Path, data_dir: Path, host: str, port: int
) -> list[str]:
    """The argv of a Prometheus server on `host:port`, its TSDB in `data_dir`."""
    return [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={int(RETENTION.total_seconds() // 3600)}h",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
