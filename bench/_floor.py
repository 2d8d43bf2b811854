"""The floor of the mesh's paths: Envoy -> a bare grpc.aio hop, as the least a gRPC mesh
of this shape costs.

- `floor_path`: the hop relays Triton's ModelStreamInfer bytes unparsed over a persistent
  channel (no authentication, admission, routing or contract checks), and ModelInfer's
  the same way. The mesh-tax benchmark calls Triton through it, in the same rounds as
  the other arms, so that `over_floor` is what Switchboard's own work costs.
- `call_floor`: the hop answers ExecutionService.SubmitTask at once with a fixed reply
  (on uvloop, as the services run): the CPU of a bare unary call through a bare Envoy,
  which every task submitted one per call pays at the least (the tasks benchmark).

`python -m bench._floor PORT TRITON` runs the relay, `python -m bench._floor PORT` the
answering hop; both helpers start the hop and its Envoy and stop both (by PID).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench._common import free_port, stop_process
from services.launcher._envoy_process import envoy_command

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UNARY_METHOD = "/inference.GRPCInferenceService/ModelInfer"
SUBMIT_SERVICE = "switchboard.execution.v1.ExecutionService"
_API = "type.googleapis.com/envoy"
READY_S = 30.0


async def _serve(port: int, triton: str) -> None:
    upstream = grpc.aio.insecure_channel(triton)
    forward = upstream.stream_stream(METHOD)  # bytes in, bytes out: nothing parsed
    forward_unary = upstream.unary_unary(UNARY_METHOD)

    async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        call = forward(requests)
        async for reply in call:
            yield reply

    async def relay_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await forward_unary(request)

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(relay),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(relay_unary),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _answer(port: int) -> None:
    """SubmitTask answered at once with a task's bytes: nothing parsed, stored or sent."""
    from switchboard.execution.v1 import execution_pb2 as pb

    reply = pb.Task(task_id=str(uuid.uuid4()), state=pb.TASK_STATE_RUNNING).SerializeToString()

    async def submit(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        SUBMIT_SERVICE, {"SubmitTask": grpc.unary_unary_rpc_method_handler(submit)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _envoy_config(listen: int, hop: int, admin: int) -> str:
    """One listener, one route, one HTTP/2 cluster: the least an Envoy hop can be (JSON,
    which Envoy reads as YAML)."""

    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    manager = {
        "@type": f"{_API}.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "floor",
        "codec_type": "HTTP2",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "floor",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "hop", "timeout": "0s"}}
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_API}.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    cluster = {
        "name": "hop",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_API}.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "hop",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(hop)}}]}],
        },
    }
    listener = {
        "name": "floor",
        "address": address(listen),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    config = {
        "admin": {"address": address(admin)},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }
    return json.dumps(config)


def _wait_ready(target: str, procs: list[subprocess.Popen[bytes]]) -> None:
    with grpc.insecure_channel(target) as channel:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError("the floor's Envoy or hop exited")
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
    raise RuntimeError(f"{target} did not answer within {READY_S:.0f}s")


@contextmanager
def floor_path(triton: str, directory: Path) -> Iterator[str]:
    """Starts the relaying hop (to `triton`) and an Envoy in front of it; yields Envoy's
    address."""
    with _bare_path(directory, [triton]) as (address, _):
        yield address


@contextmanager
def call_floor(directory: Path) -> Iterator[tuple[str, list[int]]]:
    """Starts the answering hop and an Envoy in front of it; yields Envoy's address and
    the PIDs of the hop and Envoy."""
    with _bare_path(directory, []) as path:
        yield path


@contextmanager
def _bare_path(directory: Path, hop_args: list[str]) -> Iterator[tuple[str, list[int]]]:
    hop_port, listen, admin = free_port(), free_port(), free_port()
    config = directory / "floor-envoy.yaml"
    config.write_text(_envoy_config(listen, hop_port, admin))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (directory / "floor-hop.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench._floor", str(hop_port), *hop_args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).resolve().parents[1],
                )
            )
        _wait_ready(f"127.0.0.1:{hop_port}", procs)
        argv = envoy_command(
            config_path=config, base_id=listen, log_path=directory / "floor-envoy.log"
        )
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_ready(f"127.0.0.1:{listen}", procs)
        yield f"127.0.0.1:{listen}", [proc.pid for proc in procs]
    finally:
        for proc in reversed(procs):
            stop_process(proc)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
    else:
        uvloop.run(_answer(int(sys.argv[1])))
