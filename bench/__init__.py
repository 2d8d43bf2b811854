"""Benchmarks: `make bench` runs them all, `make bench-<name>` one (see DESIGN.md)."""

BENCHMARKS = {
    "embed-batching": "bench.embed_batching",
    "mesh-tax": "bench.mesh_tax",
    "grpc-ceiling": "bench.grpc_ceiling",
    "admission-decisions": "bench.admission_decisions",
    "admission-fairness": "bench.admission_fairness",
    "rag-ingest": "bench.rag_ingest",
    "rag-retrieval": "bench.rag_retrieval",
    "tasks-throughput": "bench.tasks_throughput",
    "step-overhead": "bench.step_overhead",
    "sandbox": "bench.sandbox",
    "chat-latency": "bench.chat_latency",
    "chat-sessions": "bench.chat_sessions",
    "contract-checks": "bench.contract_checks",
    "http": "bench.http_api",
    "rollout": "bench.rollout",
    "fuzz": "bench.fuzz",
    "jetstream-sync": "bench.jetstream_sync",
    "full-disk": "bench.full_disk",
    "network-faults": "bench.network_faults",
    "tracing": "bench.tracing",
    "pg-faults": "bench.pg_faults",
}
"""Benchmark name -> module with a `run()` that prints its table and writes its JSON."""
