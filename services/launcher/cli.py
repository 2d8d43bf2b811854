"""`switchboard up | down | status | logs | keys | chat | trace`: the local mesh from the
command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
from switchboard.control.v1 import control_pb2, control_service_pb2_grpc

from services.launcher import chat, traces
from services.launcher._config import load_launcher_config
from services.launcher._mesh import LaunchError, Mesh
from services.runtime import ConfigError

logger = logging.getLogger(__name__)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the mesh and wait until every part is healthy")
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also start a Prometheus server scraping every process, with the SLO rules"
        " (SWITCHBOARD_PROMETHEUS=1 does the same)",
    )
    commands.add_parser("down", help="stop everything `up` started")
    commands.add_parser("status", help="what is running: processes, replicas and their health")
    scale = commands.add_parser("scale", help="set how many replicas a service runs")
    scale.add_argument("service", help="inference, admission, rag, execution, worker, chat, ...")
    scale.add_argument("replicas", type=int)
    rollout = commands.add_parser(
        "rollout", help="replace a service's replicas one at a time (every service by default)"
    )
    rollout.add_argument("service", nargs="?", default="")
    logs = commands.add_parser("logs", help="show a component's log")
    logs.add_argument("name", nargs="?", help="component (postgres, nats, triton-0, envoy, ...)")
    logs.add_argument("-n", "--lines", type=int, default=40)
    keys = commands.add_parser(
        "keys", help="create, list or revoke tenants' API keys and operator credentials"
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser(
        "create", help="a new key for a tenant, or an operator credential (shown once)"
    )
    whose = create.add_mutually_exclusive_group(required=True)
    whose.add_argument("--tenant", help="the tenant the key acts for (its own data only)")
    whose.add_argument(
        "--operator",
        action="store_true",
        help="an operator credential: admission policies of any tenant, no tenant's data",
    )
    create.add_argument("--name", default="", help="what the key is for")
    listing = key_commands.add_parser("list", help="keys (never their secrets)")
    listing.add_argument("--tenant", default="")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    talk = commands.add_parser("chat", help="an interactive chat session through Envoy")
    chat.add_arguments(talk)
    trace = commands.add_parser(
        "trace", help="a trace from the run directory's trace store, as a waterfall"
    )
    which = trace.add_mutually_exclusive_group(required=True)
    which.add_argument("ident", nargs="?", help="a trace id, or a request id from an error")
    which.add_argument("--slowest", type=int, metavar="N", help="list the N slowest traces")
    args = parser.parse_args(argv)
    if args.command == "trace" and args.slowest is not None and args.slowest < 1:
        parser.error("--slowest must be at least 1")

    try:
        config = load_launcher_config()
    except ConfigError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    if args.command == "trace":
        return _trace(config.run_dir / "traces", args)
    if args.command == "up" and args.prometheus:
        config = dataclasses.replace(config, prometheus=True)
    mesh = Mesh(config, progress=_progress)
    if args.command == "keys":
        return asyncio.run(_keys(args, mesh))
    if args.command == "chat":
        try:
            return asyncio.run(chat.chat(args, mesh.envoy_address))
        except KeyboardInterrupt:
            return 130

    if args.command == "up":
        try:
            mesh.up()
        except LaunchError as exc:
            print(f"switchboard: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "down":
        count = mesh.down()
        _progress(f"stopped {count} process(es)" if count else "nothing was running")
        return 0
    if args.command == "status":
        return _status(mesh)
    if args.command in ("scale", "rollout"):
        return _operate(mesh, args)
    # logs
    log_dir = config.run_dir / "logs"
    names = [args.name] if args.name else sorted(p.stem for p in log_dir.glob("*.log"))
    for name in names:
        path = Path(log_dir / f"{name}.log")
        if not path.exists():
            print(f"no log for {name!r} in {log_dir}", file=sys.stderr)
            return 1
        print(f"==> {path} <==")
        print("\n".join(path.read_text(errors="replace").splitlines()[-args.lines :]))
    return 0


def _trace(traces_dir: Path, args: argparse.Namespace) -> int:
    try:
        store = traces.load_spans(traces_dir)
    except FileNotFoundError:
        print(f"switchboard: no traces yet: {traces_dir} does not exist", file=sys.stderr)
        return 1
    counted = f"{len(store.spans)} spans from {store.files} files" + (
        f", {store.skipped} unreadable lines skipped" if store.skipped else ""
    )
    if args.slowest is not None:
        lines = traces.slowest(store.spans, args.slowest)
        if not lines:
            print(f"switchboard: no traces in {traces_dir} ({counted})", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0
    found = traces.find_traces(store.spans, args.ident)
    if not found:
        print(
            f"switchboard: no trace with id or request id {args.ident!r} in {traces_dir}"
            f" ({counted})",
            file=sys.stderr,
        )
        return 1
    if len(found) > 1:
        print(f"request id {args.ident!r} is in {len(found)} traces\n")
    known = store.by_id()
    print("\n\n".join("\n".join(traces.render_waterfall(t, known=known)) for t in found))
    return 0


def _status(mesh: Mesh) -> int:
    """The launcher's processes, then every replica as the control plane sees it."""
    rows = [(r, alive) for r, alive in mesh.status() if r in mesh.state.load()]
    if not rows:
        print("nothing is running")
        return 1
    for record, alive in rows:
        print(
            f"{record.name:<12} pid {record.pid:<8} {'running' if alive else 'DEAD':<8} "
            f"{record.log}"
        )
        if record.name == "prometheus":
            print(f"{'':<12} {mesh.prometheus_url}")
    healthy = all(alive for _, alive in rows)
    try:
        listing = _control_call(mesh, "ListReplicas", control_pb2.ListReplicasRequest())
    except grpc.RpcError as exc:
        print(f"switchboard: the control plane does not answer: {exc.details()}", file=sys.stderr)
        return 1
    print(f"\n{'replica':<14}{'state':<10}{'address':<18}{'pid':<9}{'restarts':<10}uptime")
    for replica in listing.replicas:
        state = control_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_")
        print(
            f"{replica.name:<14}{state:<10}{replica.address:<18}{replica.pid:<9}"
            f"{replica.restarts:<10}{replica.uptime.ToTimedelta().total_seconds():.0f}s"
        )
        if replica.last_log:
            print("  " + replica.last_log.replace("\n", "\n  "))
        healthy = healthy and replica.state in (
            control_pb2.REPLICA_STATE_SERVING,
            control_pb2.REPLICA_STATE_STOPPED,
        )
    for node in listing.envoy_nodes:
        print(
            f"\nenvoy {node.node_id}: {'connected' if node.connected else 'DISCONNECTED'},"
            f" config version {node.acked_version} acknowledged of {listing.config_version}"
            + (f"; last rejected: {node.last_rejection}" if node.last_rejection else "")
        )
    return 0 if healthy else 1


def _operate(mesh: Mesh, args: argparse.Namespace) -> int:
    try:
        if args.command == "scale":
            request = control_pb2.ScaleServiceRequest(service=args.service, replicas=args.replicas)
            reply = _control_call(mesh, "ScaleService", request, timeout=600)
        else:
            request = control_pb2.RolloutServiceRequest(service=args.service)
            reply = _control_call(mesh, "RolloutService", request, timeout=1800)
    except grpc.RpcError as exc:
        print(f"switchboard: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    for replica in reply.replicas:
        state = control_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_")
        print(f"{replica.name:<14}{state:<10}{replica.address:<18}generation {replica.generation}")
    return 0


def _control_call(mesh: Mesh, method: str, request: object, *, timeout: float = 10) -> Any:
    """Calls the control plane through Envoy's internal listener (loopback only)."""
    with grpc.insecure_channel(mesh.control_address) as channel:
        stub = control_service_pb2_grpc.ControlServiceStub(channel)
        return getattr(stub, method)(request, timeout=timeout)


async def _keys(args: argparse.Namespace, mesh: Mesh) -> int:
    store = mesh.key_store()
    try:
        await store.open()
    except (OSError, psycopg.Error) as exc:
        print(f"switchboard: cannot reach the database ({exc}); is the mesh up?", file=sys.stderr)
        return 1
    try:
        if args.keys_command == "create":
            try:
                if args.operator:
                    key_id, token = await store.create_operator(args.name)
                    whose = "an operator"
                else:
                    key_id, token = await store.create(args.tenant, args.name)
                    whose = f"tenant {args.tenant!r}"
            except ValueError as exc:
                print(f"switchboard: {exc}", file=sys.stderr)
                return 2
            print(f"key {key_id} for {whose} (shown only now):\n{token}")
        elif args.keys_command == "list":
            for key in await store.list(args.tenant):
                state = f"revoked {key.revoke_time:%Y-%m-%d}" if key.revoke_time else "active"
                who = key.tenant_id or "(operator)"
                print(f"{key.key_id}  {key.kind:<8} {who:<20} {state:<18} {key.name}")
        elif not await store.revoke(args.key_id):
            print(f"switchboard: no active key {args.key_id!r}", file=sys.stderr)
            return 1
        return 0
    finally:
        await store.close()


if __name__ == "__main__":
    raise SystemExit(main())
