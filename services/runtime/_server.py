"""gRPC server bootstrap: health, reflection, metrics, limits, keepalive, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.runtime._catalogue import public_services
from services.runtime._config import load_config
from services.runtime._heap import settle_heap
from services.runtime._interceptors import InstrumentingRegistry
from services.runtime._logging import configure_logging, flush_logs
from services.runtime._metrics import serve_metrics, watch_event_loop
from services.runtime._tracing import configure_tracing, flush_traces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """What every service's server needs; read from `SWITCHBOARD_<SERVICE>_*`."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    """Port of the Prometheus `/metrics` endpoint; 0 disables it."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest message accepted or sent; larger requests get RESOURCE_EXHAUSTED."""
    drain: timedelta = timedelta(seconds=1)
    """How long the service reports NOT_SERVING before it stops accepting calls."""
    grace: timedelta = timedelta(seconds=10)
    """How long in-flight calls may take to finish after the drain."""
    keepalive_min_interval: timedelta = timedelta(seconds=10)
    """Clients pinging more often than this are told to go away (GOAWAY)."""
    readiness_interval: timedelta = timedelta(seconds=1)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be within 0..65535")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")


class Service(Protocol):
    """What a service hands the runtime: its servicers, its dependencies' lifecycle."""

    name: str
    service_names: Sequence[str]

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def shutdown(self) -> None: ...


def process_name(service: str) -> str:
    """This process's name in the mesh (`inference-1`): the launcher's
    `SWITCHBOARD_<SERVICE>_REPLICA_ID`, or the service and its PID."""
    return os.environ.get(f"SWITCHBOARD_{service.upper()}_REPLICA_ID") or f"{service}-{os.getpid()}"


def load_server_config(service: str) -> ServerConfig:
    return load_config(ServerConfig, prefix=f"SWITCHBOARD_{service.upper()}_")


def create_server(
    config: ServerConfig, service: Service
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """Builds the server with every standard piece; binds the port (0 picks a free one)."""
    ms = lambda d: int(d.total_seconds() * 1000)  # noqa: E731
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(config.keepalive_min_interval)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ],
    )
    service.register(InstrumentingRegistry(server))  # type: ignore[arg-type]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *public_services(),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    return server, port, health


async def _report_readiness(
    service: Service, health: HealthServicer, interval: timedelta, stopping: asyncio.Event
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    last: bool | None = None
    while not stopping.is_set():
        try:
            ok = await service.ready()
        except Exception:  # noqa: BLE001 - a failing probe means not ready
            logger.exception("readiness probe failed")
            ok = False
        if ok != last:
            logger.info("readiness changed", extra={"ready": ok})
            for name in service.service_names:
                await health.set(name, serving if ok else not_serving)
            # The server as a whole ("") stays SERVING while it runs and has named
            # services whose own status says whether they are ready: a health check of a
            # service through Envoy reaches a replica whose database is down and hears
            # NOT_SERVING, not NOT_FOUND from a replica of another service.
            if not service.service_names or last is None:
                await health.set("", serving if ok or service.service_names else not_serving)
            last = ok
        flush_logs()
        try:
            await asyncio.wait_for(stopping.wait(), interval.total_seconds())
        except TimeoutError:
            pass


async def serve(service: Service, config: ServerConfig | None = None) -> None:
    """Runs `service` until SIGTERM/SIGINT, then drains and stops gracefully."""
    config = config or load_server_config(service.name)
    configure_logging(service=service.name, level=config.log_level)
    configure_tracing(service=service.name, process=process_name(service.name))
    if config.metrics_port:
        serve_metrics(config.metrics_port, config.host)
        watch_event_loop(asyncio.get_running_loop())
    await service.start()
    settle_heap()  # what start made lives as long as the process: never scan it again
    server, port, health = create_server(config, service)
    await server.start()
    logger.info("listening", extra={"address": f"{config.host}:{port}"})

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    probe = asyncio.create_task(
        _report_readiness(service, health, config.readiness_interval, stopping)
    )
    await stopping.wait()
    logger.info("stopping: draining", extra={"drain_s": config.drain.total_seconds()})
    if (draining := getattr(service, "drain", None)) is not None:
        await draining()  # optional: a service told it is stopping before its calls end
    await probe
    await health.enter_graceful_shutdown()
    await asyncio.sleep(config.drain.total_seconds())
    await server.stop(config.grace.total_seconds())
    await service.shutdown()
    flush_traces()
    logger.info("stopped")


def main(service: Service) -> None:
    """Entry point for `python -m services.<name>`: serves on uvloop's event loop."""
    uvloop.run(serve(service))
