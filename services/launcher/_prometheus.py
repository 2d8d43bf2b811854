"""A real Prometheus for the local mesh (`switchboard up --prometheus`): its scrape
config, written into the run directory, and its command line.

Debian's `prometheus` package gives the binaries (`make prometheus` installs it); only
`/usr/bin/prometheus` is run, never the package's service. Every replica's metrics port
is a static target, labelled with its service (`job`) and process (`process`), as are
Triton's metrics and Envoy's `/stats/prometheus`; the SLO rules are
`deploy/prometheus/rules.yml`.
"""

from __future__ import annotations

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
from services.launcher._services import service_processes

logger = logging.getLogger(__name__)

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
    """Every metrics endpoint of the mesh `config` describes: each service process's
    `up` starts, each embedded Triton replica's, Envoy's."""
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
) -> dict[str, Any]:
    """prometheus.yml: one scrape job per kind of process (and metrics path), a static
    target per process."""
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
            {
                "job_name": job,
                "metrics_path": path,
                "static_configs": [
                    {"targets": [t.address], "labels": {"process": t.process}} for t in group
                ],
            }
            for (job, path), group in jobs.items()
        ],
    }


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
