"""JSON logs, one object per line, carrying the request id and tenant of the current call."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

from services.runtime import _context

logger = logging.getLogger(__name__)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats records as JSON with time, level, logger, message and any `extra` fields."""

    def __init__(self, *, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StampContext(logging.Filter):
    """Copies the current call's request id and tenant onto the record when it is made
    (records are formatted later, outside the call's context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if rid := _context.request_id.get():
            record.request_id = rid
        if tenant := _context.tenant_id.get():
            record.tenant = tenant
        return True


def configure_logging(*, service: str, level: str = "INFO") -> None:
    """Sends every log record to stderr as JSON.

    Records are buffered and written in batches (at 256 records, on any warning or
    error, and by `flush_logs`, which the server calls every second): one write per
    access-log line would cost a system call per RPC.
    """
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter(service=service))
    buffered = logging.handlers.MemoryHandler(
        capacity=256, flushLevel=logging.WARNING, target=stream, flushOnClose=True
    )
    buffered.addFilter(_StampContext())
    root = logging.getLogger()
    root.handlers[:] = [buffered]
    root.setLevel(level.upper())


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
