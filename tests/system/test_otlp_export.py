"""A service's spans reach an OpenTelemetry collector over OTLP/gRPC when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (a loopback collector: the control plane's OTLP
receiver), as well as the run directory's store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from services.control.traces import TraceReceiver
from services.runtime import tracing
from tests.polling import eventually


async def test_spans_go_to_the_collector_and_the_store(tmp_path: Path):
    collected = tmp_path / "collector.jsonl"
    receiver = TraceReceiver(path=collected)
    server = grpc.aio.server()
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    store = tmp_path / "store"
    try:
        tracing.configure_tracing(
            service="unit",
            process="unit-0",
            env={
                tracing.SAMPLING_ENV: "1",
                tracing.TRACES_DIR_ENV: str(store),
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            },
        )
        with tracing.span("exported", attributes={"gen_ai.request.model": "tiny"}) as span:
            pass
        trace_id = tracing.trace_id_of(span)
        # the exporters run in their own threads: flushing waits for the collector,
        # which answers on this loop
        await asyncio.to_thread(tracing.flush_traces)

        def lines(path: Path) -> list[dict]:
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text().splitlines()]

        await eventually(lambda: lines(collected), timeout=10, what="the collector's spans")
        (sent,) = lines(collected)
        (stored,) = lines(store / "unit-0.jsonl")
        for record in (sent, stored):
            assert record["trace_id"] == trace_id and record["name"] == "exported"
            assert record["attributes"]["gen_ai.request.model"] == "tiny"
        assert sent["span_id"] == stored["span_id"]
    finally:
        tracing.configure_tracing(service="unit", process="unit-0", env={})
        await server.stop(None)
        await receiver.shutdown()
