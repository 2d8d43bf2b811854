"""The gateway's HTTP server: the API's routes, its error shape, health, metrics, and a
graceful stop on SIGTERM (unhealthy first, then the requests in flight finish)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvloop
from aiohttp import web
from prometheus_client import Counter, Histogram
from switchboard.inference.v1 import inference_service_pb2_grpc

from services.gateway.config import GatewayConfig, load_gateway_config
from services.gateway.handlers import Api, HttpFailure, error_response
from services.inference import InferenceService, load_inference_config
from services.runtime import (
    HTTP_HEALTH_PATH,
    REQUEST_ID_HEADER,
    HttpError,
    Internal,
    LocalChannel,
    SwitchboardError,
    configure_logging,
    flush_logs,
    http_error,
    process_name,
    serve_metrics,
    settle_heap,
    stop_task,
    tracing,
    watch_event_loop,
)

logger = logging.getLogger(__name__)

SERVICE = "gateway"
READINESS_INTERVAL_S = 1.0
HTTP_REQUESTS = Counter(
    "switchboard_http_requests_total",
    "HTTP requests answered, by route and status.",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "switchboard_http_request_duration_seconds",
    "Time from an HTTP request's arrival to its handler's return (a stream's whole length).",
    ["route"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)


def _unrouted(error: web.HTTPException, request: web.Request) -> HttpError:
    """OpenAI's answer to a path or method it does not serve."""
    message = f"Invalid URL ({request.method} {request.path})"
    if isinstance(error, web.HTTPMethodNotAllowed):
        message = f"{request.method} is not allowed on {request.path}"
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return HttpError(status=error.status, body=body)


@web.middleware
async def _errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Every failure as OpenAI's JSON error, with the status and ErrorInfo reason the
    same failure has over gRPC."""
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    )
    started = time.monotonic()
    with tracing.span(
        f"{request.method} {route}",
        kind=tracing.SpanKind.SERVER,
        parent=tracing.extract(request.headers),
        attributes={"http.request.method": request.method, "url.path": request.path},
    ) as span:
        if rid := request.headers.get(REQUEST_ID_HEADER):
            span.set_attribute(tracing.REQUEST_ID, rid)
        response = await _answer(request, handler)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            tracing.fail(span, f"HTTP {response.status}")
    HTTP_REQUESTS.labels(route, str(response.status)).inc()
    HTTP_LATENCY.labels(route).observe(time.monotonic() - started)
    return response


async def _answer(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpFailure as failure:
        return error_response(failure.error)
    except SwitchboardError as error:
        return error_response(http_error(error.to_rpc_status()))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(_unrouted(error, request))
    except Exception:  # noqa: BLE001 - a bug: answered as INTERNAL, logged in full
        logger.exception("request failed", extra={"path": request.path})
        return error_response(http_error(Internal("internal error").to_rpc_status()))


class Gateway:
    """The HTTP server in front of an InferenceService embedded in this process: a
    request is served by an in-process call of its RPC (`LocalChannel`: the same contract
    checks, admission, routing and errors as a gRPC caller gets, without a second gRPC
    hop). `start()` starts the service and binds, `shutdown()` stops both (idempotent);
    `async with` does both."""

    def __init__(self, config: GatewayConfig, inference: InferenceService) -> None:
        self._config = config
        self._inference = inference
        self._runner: web.AppRunner | None = None
        self._readiness: asyncio.Task[None] | None = None
        self.ready = False
        """Whether the embedded service can serve (a Triton replica is ready)."""
        self.serving = False
        self.port = 0

    def app(self, stub: inference_service_pb2_grpc.InferenceServiceStub) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=self._config.max_body_bytes)
        app.add_routes(Api(stub, self._config).routes())
        app.router.add_get(HTTP_HEALTH_PATH, self._health)
        return app

    async def start(self) -> int:
        """Starts the embedded service, binds the port (0 picks a free one) and serves;
        returns the port."""
        try:
            await self._inference.start()
            self.ready = await self._inference.ready()
        except BaseException:
            await self._inference.shutdown()
            raise
        self._readiness = asyncio.create_task(self._watch_readiness())
        local = LocalChannel(self._inference.register)
        stub = inference_service_pb2_grpc.InferenceServiceStub(local)  # type: ignore[no-untyped-call]
        self._runner = web.AppRunner(
            self.app(stub),
            handler_cancellation=True,  # a client gone cancels its handler and its call
            access_log=None,
            shutdown_timeout=self._config.grace.total_seconds(),
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.serving = True
        logger.info("listening", extra={"address": f"{self._config.host}:{self.port}"})
        return self.port

    async def shutdown(self) -> None:
        self.serving = False
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        readiness, self._readiness = self._readiness, None
        if readiness is not None:
            await stop_task(readiness)
            await self._inference.shutdown()

    async def _watch_readiness(self) -> None:
        """Re-checks the backends every READINESS_INTERVAL_S, as a gRPC replica's
        readiness probe does (it also tells the router which backends are up)."""
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            try:
                ready = await self._inference.ready()
            except Exception:  # noqa: BLE001 - a failing probe means not ready
                logger.exception("readiness probe failed")
                ready = False
            if ready != self.ready:
                logger.info("readiness changed", extra={"ready": ready})
                self.ready = ready

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def _health(self, request: web.Request) -> web.Response:
        if self.serving and self.ready:
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)


async def serve(config: GatewayConfig | None = None) -> None:
    """Runs the gateway until SIGTERM/SIGINT, then drains and stops gracefully."""
    config = config or load_gateway_config()
    configure_logging(service=SERVICE, level=config.log_level)
    tracing.configure_tracing(service=SERVICE, process=process_name(SERVICE))
    if config.metrics_port:
        serve_metrics(config.metrics_port, config.host)
        watch_event_loop(asyncio.get_running_loop())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    gateway = Gateway(config, InferenceService(load_inference_config()))
    await gateway.start()
    settle_heap()
    while not stopping.is_set():
        flush_logs()
        try:
            await asyncio.wait_for(stopping.wait(), 1.0)
        except TimeoutError:
            pass
    logger.info("stopping: draining", extra={"drain_s": config.drain.total_seconds()})
    gateway.serving = False  # health says so; the edge stops sending
    await asyncio.sleep(config.drain.total_seconds())
    await gateway.shutdown()
    tracing.flush_traces()
    logger.info("stopped")
    flush_logs()


def main() -> None:
    """Entry point for `python -m services.gateway`: serves on uvloop's event loop."""
    uvloop.run(serve())
