"""Benchmarks: `make bench` runs them all, `make bench-<name>` one (see DESIGN.md)."""

BENCHMARKS = {
    "embed-batching": "bench.embed_batching",
    "mesh-tax": "bench.mesh_tax",
    "grpc-ceiling": "bench.grpc_ceiling",
    "admission-decisions": "bench.admission_decisions",
    "admission-fairness": "bench.admission_fairness",
    "rag-ingest": "bench.rag_ingest",
    "rag-retrieval": "bench.rag_retrieval",
    "execution-throughput": "bench.execution_throughput",
}
"""Benchmark name -> module with a `run()` that prints its table and writes its JSON."""
