"""The auth service's configuration, read from `SWITCHBOARD_*`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthConfig:
    database_url: str
    """PostgreSQL holding the keys (`SWITCHBOARD_DATABASE_URL`)."""
    auth_cache_ttl: timedelta = timedelta(seconds=30)
    """How long a verified (or refused) key is remembered. A revoked key leaves the
    cache sooner, within the revocation feed's poll interval (`revocations`)."""
    auth_signing_key: str = ""
    """The mesh's key-signing key (a PEM file, `signing`): new keys are tokens it signs,
    which the edge checks without this service. Empty: new keys take the older form,
    which every call has checked here."""
    auth_stale_grace: timedelta = timedelta(minutes=10)
    """While the key database is down, a key verified less than this long ago keeps
    working (keys never verified, or verified earlier, are refused: UNAVAILABLE)."""

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the key database")
