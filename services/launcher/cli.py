"""`switchboard up | down | status | logs | keys | chat`: the local mesh from the command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path

import psycopg

from services.launcher import chat
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
    commands.add_parser("status", help="what is running")
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
    args = parser.parse_args(argv)

    try:
        config = load_launcher_config()
    except ConfigError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    if args.command == "up" and args.prometheus:
        config = dataclasses.replace(config, prometheus=True)
    mesh = Mesh(config, progress=_progress)
    if args.command == "keys":
        return asyncio.run(_keys(args, mesh.database_url))
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
        rows = mesh.status()
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
        return 0 if all(alive for _, alive in rows) else 1
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


async def _keys(args: argparse.Namespace, database_url: str) -> int:
    from services.auth import KeyStore

    store = KeyStore(database_url)
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
