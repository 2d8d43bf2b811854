"""Prometheus metrics of the execution service: the work queue's backlog as JetStream
reports it, and the step messages delivered again.

The backlog is read from the durable `workers` consumer by the API process, which runs
whether or not any worker does (a queue no worker drains is what the lag alert is for).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from prometheus_client import Counter, Gauge

from services.execution.bus import WORK_STREAM, WORKERS, Bus

logger = logging.getLogger(__name__)

__all__ = [
    "CONSUMER_ACK_PENDING",
    "CONSUMER_PENDING",
    "CONSUMER_REDELIVERED",
    "REDELIVERIES",
    "watch_consumer",
]

CONSUMER_PENDING = Gauge(
    "switchboard_execution_consumer_pending",
    "Step messages in the work queue not yet delivered to any worker (JetStream's"
    " num_pending of the consumer): the queue's lag.",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "switchboard_execution_consumer_ack_pending",
    "Step messages delivered to a worker and not yet acknowledged (steps running).",
    ["consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "switchboard_execution_consumer_redelivered",
    "Step messages out for redelivery now (JetStream's num_redelivered of the consumer).",
    ["consumer"],
)
REDELIVERIES = Counter(
    "switchboard_execution_redeliveries",
    "Step messages a worker received again (a worker died, or the step's lease ran out).",
)

CONSUMER_POLL = timedelta(seconds=2)


async def watch_consumer(bus: Bus, *, every: timedelta = CONSUMER_POLL) -> None:
    """Reads the work consumer's state every `every` into the gauges, until cancelled."""
    pending = CONSUMER_PENDING.labels(WORKERS)
    ack_pending = CONSUMER_ACK_PENDING.labels(WORKERS)
    redelivered = CONSUMER_REDELIVERED.labels(WORKERS)
    while True:
        try:
            info = await bus.js.consumer_info(WORK_STREAM, WORKERS)
        except Exception as exc:  # noqa: BLE001 - keep reading through outages
            logger.debug("cannot read the work consumer: %s", exc)
        else:
            pending.set(info.num_pending or 0)
            ack_pending.set(info.num_ack_pending or 0)
            redelivered.set(info.num_redelivered or 0)
        await asyncio.sleep(every.total_seconds())
