"""The ceiling on this machine: unary QPS of a bare grpc.aio echo server.

The echo server runs in its own process (`python -m bench.grpc_ceiling serve MODE PORT`),
started and stopped here; one client process keeps a fixed number of unary calls in flight
for a fixed time. As a reference in the same run, the same echo served by the Switchboard
runtime (`services.runtime.serve` on uvloop: its interceptor, metrics and JSON access log,
as every service runs) and by the runtime with the access log off (log level WARNING).
The bare server runs on asyncio's own loop. The servers
take turns in short slices.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path

import grpc
import uvloop

from bench._common import (
    Window,
    closed_loop,
    free_port,
    ms,
    percentile,
    print_table,
    rotated,
    stop_process,
    write_result,
)

NAME = "grpc-ceiling"
SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"
PAYLOAD = bytes(range(64))
CONCURRENCY = 32
"""Calls in flight, from one client process (on 2 cores a second client process measured
lower: 2,900 vs 3,100 QPS in the same run)."""
WARMUP_S = 1.0
SLICE_S = 0.5
ROUNDS = 12
"""Slices per server; 12 x 0.5 s = 6 s measured for each. The servers take turns slice by
slice: short slices spread the bursts of a shared machine's other load evenly over them."""

SERVERS = {
    "bare": "echo",
    "runtime": "runtime_echo",
    "runtime_quiet": "runtime_quiet_echo",
}
"""Server mode -> metric prefix."""


# -- the servers (run in their own process) --------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )


class EchoService:
    """The smallest Service the runtime can host: one echo method, nothing to start."""

    name = "echo"
    service_names = (SERVICE,)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((_echo_handler(),))

    async def start(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def shutdown(self) -> None:
        pass


async def _serve_bare(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_echo_handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


def serve(mode: str, port: int) -> None:
    if mode == "bare":
        asyncio.run(_serve_bare(port))
        return
    from services.runtime import ServerConfig
    from services.runtime import serve as runtime_serve

    config = ServerConfig(
        host="127.0.0.1",
        port=port,
        log_level="INFO" if mode == "runtime" else "WARNING",
        drain=timedelta(0),
        grace=timedelta(seconds=1),
    )
    uvloop.run(runtime_serve(EchoService(), config))  # the loop every service runs on


# -- the client (runs in its own process) ----------------------------------------------------


async def _drive(targets: dict[str, str]) -> dict[str, list[Window]]:
    channels = {mode: grpc.aio.insecure_channel(target) for mode, target in targets.items()}
    try:
        calls = {}
        for mode, channel in channels.items():
            echo = channel.unary_unary(METHOD)
            await echo(PAYLOAD, timeout=10)

            async def call(_: int, echo: grpc.aio.UnaryUnaryMultiCallable = echo) -> bytes:
                return await echo(PAYLOAD, timeout=10)

            calls[mode] = call
            await closed_loop(call, concurrency=CONCURRENCY, seconds=WARMUP_S)
        slices: dict[str, list[Window]] = {mode: [] for mode in targets}
        for round_ in range(ROUNDS):
            for mode in rotated(list(targets), round_):
                window = await closed_loop(calls[mode], concurrency=CONCURRENCY, seconds=SLICE_S)
                slices[mode].append(window)
        return slices
    finally:
        for channel in channels.values():
            await channel.close()


def _client(targets: dict[str, str]) -> dict[str, list[Window]]:
    return asyncio.run(_drive(targets))


# -- the benchmark ---------------------------------------------------------------------------


def _start(mode: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.grpc_ceiling", "serve", mode, str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            stop_process(proc)
            raise RuntimeError(f"{mode} echo server did not start: {log.read_text()}") from None
    print(f"  started {mode} echo server (pid {proc.pid}) on {target}", flush=True)
    return proc, target


def run() -> dict:
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        try:
            for mode in SERVERS:
                servers[mode] = _start(mode, Path(tmp) / f"{mode}.log")
            targets = {mode: target for mode, (_, target) in servers.items()}
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                slices = pool.submit(_client, targets).result(timeout=300)
        finally:
            for proc, _ in servers.values():
                stop_process(proc)

    rows = []
    metrics: dict[str, float] = {}
    for mode, prefix in SERVERS.items():
        total = Window()
        for window in slices[mode]:
            total.add(window)
        per_slice = sorted(w.per_s for w in slices[mode])
        rows.append(
            (mode, f"{total.per_s:.0f}", *(f"{q:.0f}" for q in (per_slice[0], per_slice[-1])))
        )
        metrics[f"{prefix}_qps"] = total.per_s
        metrics[f"{prefix}_p50_ms"] = ms(percentile(total.latencies, 50))
        metrics[f"{prefix}_p99_ms"] = ms(percentile(total.latencies, 99))
    print_table("servers", ("server", "qps", "slowest slice", "fastest slice"), rows)
    metrics["runtime_vs_bare"] = metrics["runtime_echo_qps"] / metrics["echo_qps"]
    notes = (
        f"unary echo of {len(PAYLOAD)} bytes, {CONCURRENCY} calls in flight from one grpc.aio "
        f"client process; the servers take turns in {SLICE_S:g}s slices, {ROUNDS} each "
        f"({ROUNDS * SLICE_S:g}s per server); servers in their own processes: echo = bare "
        "grpc.aio server on asyncio's loop, runtime_echo = services.runtime.serve on uvloop "
        "(interceptor, metrics, JSON access log to a file), runtime_quiet_echo = the same at "
        f"log level WARNING; client and server share the machine's {os.cpu_count()} cores"
    )
    return write_result(NAME, metrics, {}, notes)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m bench.grpc_ceiling serve bare|runtime|runtime_quiet PORT")
