"""The Celery side of the tasks-throughput benchmark: one task that calls the local
echo over HTTP, chained three times; what a Python team would otherwise write.

Broker and result backend: the Redis at `BENCH_REDIS_URL`; the echo at `BENCH_ECHO_URL`.
Late acks and reject-on-worker-lost, so that a worker crash redelivers the task, as the
Switchboard side guarantees.
"""

from __future__ import annotations

import http.client
import json
import os
from urllib.parse import urlsplit

from celery import Celery

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ECHO = urlsplit(os.environ.get("BENCH_ECHO_URL", "http://127.0.0.1:8000/echo"))

app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_connection: http.client.HTTPConnection | None = None


def _post(payload: dict) -> dict:
    global _connection
    if _connection is None:
        _connection = http.client.HTTPConnection(ECHO.hostname, ECHO.port, timeout=5)
    body = json.dumps(payload)
    try:
        _connection.request("POST", ECHO.path, body, {"Content-Type": "application/json"})
        reply = _connection.getresponse()
        return json.loads(reply.read())
    except (OSError, http.client.HTTPException):
        _connection.close()
        _connection = None
        raise


@app.task(name="bench.echo")
def echo(previous: object, step: int) -> dict:
    """One cheap step: the same HTTP round trip a Switchboard tool step makes."""
    return _post({"previous": previous, "step": step})
