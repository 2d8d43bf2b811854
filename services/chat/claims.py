"""User messages claimed by their client_message_id across chat replicas, so that a
message sent again (a retry after a timeout, a resend after a reconnect) is answered
once, whichever replica each copy reaches.

A replica claims a message when it accepts it: a create (compare-and-set) of the key
`<session_id>.<digest of the id>` in the JetStream KV bucket `SB_CHAT_ACCEPTED`, which
only the first copy wins. A claim is kept for `keep`; by then the message is stored in
the history, where each replica also looks (`sessions.load_session`). A replica that
cannot reach NATS accepts the message (its turn will say whether NATS is back).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Protocol

import nats
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

logger = logging.getLogger(__name__)

__all__ = ["Claims", "KvClaims", "LocalClaims"]

BUCKET = "SB_CHAT_ACCEPTED"
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)


class Claims(Protocol):
    async def claim(self, session_id: str, client_message_id: str) -> bool:
        """Whether this copy of the message is the first one accepted."""
        ...


class LocalClaims:
    """One process: the session's own record of accepted ids is enough."""

    async def claim(self, session_id: str, client_message_id: str) -> bool:
        return True


class KvClaims:
    def __init__(self, js: JetStreamContext, *, keep: timedelta = timedelta(minutes=10)) -> None:
        self._js = js
        self._keep = keep
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        try:
            self._kv = await self._js.key_value(BUCKET)
        except NotFoundError:
            self._kv = await self._js.create_key_value(
                js_api.KeyValueConfig(
                    bucket=BUCKET,
                    history=1,
                    ttl=self._keep.total_seconds(),
                    storage=js_api.StorageType.FILE,
                )
            )

    async def claim(self, session_id: str, client_message_id: str) -> bool:
        assert self._kv is not None, "open() first"
        digest = hashlib.sha256(client_message_id.encode()).hexdigest()[:40]
        try:
            await self._kv.create(f"{session_id}.{digest}", b"")
        except KeyWrongLastSequenceError:
            return False
        except _NATS_ERRORS as exc:
            logger.warning("cannot claim message %s: %s", client_message_id[:64], exc)
        return True
