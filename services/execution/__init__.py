"""The execution service: durable multi-step tasks and sandboxed Python.

Modules, each with one job:
- `graph` validates a task (what its contract's annotations cannot say);
- `store` keeps task and step state in PostgreSQL; `bus` is NATS JetStream (work
  queue, event log, dead letters, cancel broadcasts);
- `engine` submits tasks, publishes what their transitions changed, cancels them;
  `events` builds their events; `watch` numbers them for WatchTask; `feed` fans one
  live read of every task's events out to their watchers, `tail` reads the stream for
  it (one live consumer per process, bounded history reads);
- `worker_loop` pulls steps and runs them in chains (the order of effects crash safety
  rests on is stated there); `heartbeats` keeps running steps' messages and leases
  alive; `batcher` coalesces the store's round trips;
- `steps` runs one step by kind; `tools` calls registered tools; `sandbox` runs code
  (`code` maps RunCode to it);
- `servicer` is the gRPC API; `service` the API process; `worker` the worker process
  (`python -m services.execution.worker`; run as many as you like).
"""

from __future__ import annotations

from services.execution.config import ExecutionConfig, load_execution_config
from services.execution.engine import Engine
from services.execution.service import ExecutionService, Parts
from services.execution.steps import StepFailure, StepRunner
from services.execution.tools import ToolExecutor, ToolsConfig, load_tools
from services.execution.worker_loop import Worker

__all__ = [
    "Engine",
    "ExecutionConfig",
    "ExecutionService",
    "Parts",
    "StepFailure",
    "StepRunner",
    "ToolExecutor",
    "ToolsConfig",
    "Worker",
    "load_execution_config",
    "load_tools",
]
