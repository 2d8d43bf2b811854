"""The mesh on Kubernetes: the files the Helm chart (`deploy/helm/switchboard/`) reads, and
its schema-migration step.

    python -m services.launcher.kubernetes write   # the chart's files/ (see chart_files)
    python -m services.launcher.kubernetes check   # fails when those files are out of date
    python -m services.launcher.kubernetes migrate # the chart's pre-install/pre-upgrade Job

Envoy's bootstraps come from the same renderer as the local edge (`_edge.edge_config`'s
pieces: `render_envoy_config`, then `add_browser_access`), so the routes, the retry
policies, ext_authz and the header rules cannot drift from what runs locally. What differs:

- Endpoints are host names, the headless Service of each kind: the renderer makes those
  STRICT_DNS clusters (Envoy resolves every ready pod's address and health-checks each).
  Kubernetes restarts and rolls replicas, so no control plane (and no ADS) is needed.
- No control plane route (there is none), no Envoy spans sent to it, and no edge-side key
  check (`_envoy_keys` needs the revoked keys the control plane feeds): every call is
  checked by the auth service, exactly as when the local edge has not read them yet.
- Two bootstraps. The edge (`envoy-edge.yaml`) listens publicly on 0.0.0.0. Each service
  pod that calls other services runs a sidecar (`envoy-sidecar.yaml`): the same config with
  every listener on loopback, whose internal listener is the pod's way into the mesh. The
  internal listener trusts `x-tenant-id`, so it stays on loopback as it does locally
  (`check_consistency` insists), instead of being exposed on a pod address and left to
  NetworkPolicies, which some CNIs do not enforce.
- Both have a `probe` listener on 0.0.0.0 answering 200 on `PROBE_PATH`, for the kubelet:
  it routes nowhere.

Host names carry the tokens `NAMESPACE_TOKEN` and `DOMAIN_TOKEN`, which the chart
replaces with the release's namespace and the cluster's domain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from services.launcher import _envoy, _envoy_http, _envoy_web
from services.launcher._config import REPO_ROOT, LauncherConfig
from services.launcher._envoy_checks import check_consistency
from services.launcher._envoy_shape import AUTHZ_CLUSTER
from services.launcher._services import AUTH, AUTHORIZATION, SERVICES, ServiceSpec
from services.runtime import HTTP_HEALTH_PATH

logger = logging.getLogger(__name__)

CHART_FILES = REPO_ROOT / "deploy" / "helm" / "switchboard" / "files"
NAMESPACE_TOKEN = "NAMESPACE"
DOMAIN_TOKEN = "CLUSTER_DOMAIN"
PREFIX = "switchboard"
"""Every object of the chart is named `switchboard-<part>`: one release per namespace."""
PROBE_PORT = 9902
PROBE_PATH = "/ready"
PROBE_LISTENER = "probe"
NO_MESH_CALLS = frozenset({AUTH.name})
"""Kinds that call no other service, so need no sidecar."""

_DEFAULTS = LauncherConfig()
CONFIG_FILES = {
    "models.yaml": _DEFAULTS.model_policy,
    "tools.yaml": REPO_ROOT / "services" / "execution" / "tools.yaml",
}
"""The model routing policy (SWITCHBOARD_MODEL_POLICY) and the tool registry
(SWITCHBOARD_EXECUTION_TOOLS), copied into the chart as its ConfigMaps' defaults."""


def headless_host(kind: str) -> str:
    """The DNS name of a kind's headless Service (one A record per ready pod)."""
    return f"{PREFIX}-{kind}.{NAMESPACE_TOKEN}.svc.{DOMAIN_TOKEN}"


def port_of(spec: ServiceSpec) -> int:
    return spec.port(_DEFAULTS, 0)


def envoy_config(*, listen_host: str, web_origins: tuple[str, ...] = ()) -> dict[str, Any]:
    """An Envoy bootstrap for the mesh on Kubernetes (module docstring), public listener on
    `listen_host`: "0.0.0.0" for the edge, "127.0.0.1" for a sidecar."""

    def of(spec: ServiceSpec) -> tuple[tuple[str, int], ...]:
        return ((headless_host(spec.name), port_of(spec)),)

    upstreams = [
        _envoy.Upstream(
            name=spec.name,
            services=spec.grpc_services,
            endpoints=of(spec),
            hash_header=spec.hash_header,
        )
        for spec in SERVICES
        if spec.public
    ]
    rendered = _envoy.render_envoy_config(
        listen_host=listen_host,
        listen_port=_DEFAULTS.envoy_port,
        admin_port=_DEFAULTS.envoy_admin_port,
        upstreams=upstreams,
        authz=_envoy.Upstream(name=AUTHZ_CLUSTER, services=(AUTHORIZATION,), endpoints=of(AUTH)),
        internal_port=_DEFAULTS.envoy_internal_port,
        http_upstreams=[
            _envoy_http.HttpUpstream(
                name=spec.name,
                prefixes=spec.service.http_prefixes,
                endpoints=of(spec),
                health_path=HTTP_HEALTH_PATH,
            )
            for spec in SERVICES
            if spec.http
        ],
    )
    config = _envoy_web.add_browser_access(rendered, origins=web_origins, page_dir=None)
    config["node"]["id"] = (
        "switchboard-edge" if listen_host != "127.0.0.1" else "switchboard-sidecar"
    )
    config["static_resources"]["listeners"].append(_probe_listener())
    check_consistency(config)
    return config


def _probe_listener() -> dict[str, Any]:
    """Answers the kubelet's probes; routes nowhere, trusts nothing."""
    return {
        "name": PROBE_LISTENER,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": PROBE_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": PROBE_LISTENER,
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.http.router.v3.Router"
                                    },
                                }
                            ],
                            "route_config": {
                                "name": PROBE_LISTENER,
                                "virtual_hosts": [
                                    {
                                        "name": PROBE_LISTENER,
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "name": "ready",
                                                "match": {"path": PROBE_PATH},
                                                "direct_response": {"status": 200},
                                            },
                                            {
                                                "name": "other",
                                                "match": {"prefix": "/"},
                                                "direct_response": {"status": 404},
                                            },
                                        ],
                                    }
                                ],
                            },
                        },
                    }
                ]
            }
        ],
    }


def mesh_catalogue() -> dict[str, Any]:
    """What the chart needs to know of each kind of process (`files/mesh.yaml`): ports,
    how to start it, how to probe it. From `_services.SERVICES`, never spelled twice."""
    kinds = []
    for spec in SERVICES:
        kinds.append(
            {
                "name": spec.name,
                "module": spec.module,
                "envPrefix": f"SWITCHBOARD_{spec.name.upper()}_",
                "port": port_of(spec),
                "metricsPort": spec.metrics_port(_DEFAULTS, 0),
                # the grpc.health.v1 name it reports SERVING under; gateway: HTTP
                "grpcHealthService": None if spec.http else spec.health_service,
                "httpHealthPath": HTTP_HEALTH_PATH if spec.http else None,
                "hashHeader": spec.hash_header,
                "sidecar": spec.name not in NO_MESH_CALLS,
            }
        )
    return {
        "kinds": kinds,
        "envoy": {
            "port": _DEFAULTS.envoy_port,
            "internalPort": _DEFAULTS.envoy_internal_port,
            "probePort": PROBE_PORT,
            "probePath": PROBE_PATH,
        },
        "tokens": {"namespace": NAMESPACE_TOKEN, "clusterDomain": DOMAIN_TOKEN},
    }


HEADER = (
    "# Generated by `python -m services.launcher.kubernetes write` from the launcher's\n"
    "# renderer; do not edit (tests/unit/test_deploy_envoy.py fails when it is stale).\n"
)


def chart_files() -> dict[str, str]:
    """File name under the chart's `files/` → its content."""

    def dump(data: Any) -> str:
        return HEADER + yaml.safe_dump(data, sort_keys=False, width=100)

    return {
        "envoy-edge.yaml": dump(envoy_config(listen_host="0.0.0.0")),
        "envoy-sidecar.yaml": dump(envoy_config(listen_host="127.0.0.1")),
        "mesh.yaml": dump(mesh_catalogue()),
        # the defaults the ConfigMaps carry (values may replace them)
        "models.yaml": CONFIG_FILES["models.yaml"].read_text(),
        "tools.yaml": CONFIG_FILES["tools.yaml"].read_text(),
    }


def stale_files(directory: Path = CHART_FILES) -> list[str]:
    """The chart files that differ from what the renderer makes now."""
    return [
        name
        for name, text in chart_files().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]


# -- migrations -------------------------------------------------------------------------


async def migrate(database_url: str, *, rag_database_url: str = "") -> None:
    """Applies every service's schema migrations, as each service would at start (the same
    migrations under the same advisory locks, so a replica starting meanwhile waits), and
    gives the RAG service's role the password of `rag_database_url`, if it has one.

    `database_url` must be the tables' owner (or a superuser)."""
    import psycopg
    from psycopg import sql

    from services.admission.store import MIGRATION_LOCK, MIGRATIONS
    from services.auth.store import KeyStore
    from services.chat.store import SessionStore
    from services.execution.store import TaskStore
    from services.rag.schema import APP_ROLE
    from services.rag.schema import migrate as migrate_rag
    from services.runtime import apply_migrations

    for store in (KeyStore(database_url), SessionStore(database_url), TaskStore(database_url)):
        await store.open()
        await store.close()
        logger.info("migrated", extra={"store": type(store).__name__})
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await apply_migrations(conn, prefix="admission", lock=MIGRATION_LOCK, migrations=MIGRATIONS)
        await migrate_rag(conn)
        password = unquote(urlsplit(rag_database_url).password or "")
        if password:
            await conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(APP_ROLE), sql.Literal(password)
                )
            )
    logger.info("every schema migrated")


# -- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher.kubernetes")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write the chart's generated files")
    write.add_argument("--dir", type=Path, default=CHART_FILES)
    check = commands.add_parser("check", help="fail when the chart's generated files are stale")
    check.add_argument("--dir", type=Path, default=CHART_FILES)
    commands.add_parser(
        "migrate",
        help="apply every schema migration (SWITCHBOARD_DATABASE_URL, _RAG_DATABASE_URL)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "write":
        args.dir.mkdir(parents=True, exist_ok=True)
        for name, text in chart_files().items():
            (args.dir / name).write_text(text)
            print(f"wrote {args.dir / name}")
        return 0
    if args.command == "check":
        stale = stale_files(args.dir)
        if stale:
            print(
                f"out of date in {args.dir}: {', '.join(stale)}; run"
                " `python -m services.launcher.kubernetes write`",
                file=sys.stderr,
            )
            return 1
        return 0

    url = os.environ.get("SWITCHBOARD_DATABASE_URL", "")
    if not url:
        print("SWITCHBOARD_DATABASE_URL is not set", file=sys.stderr)
        return 2
    asyncio.run(migrate(url, rag_database_url=os.environ.get("SWITCHBOARD_RAG_DATABASE_URL", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
