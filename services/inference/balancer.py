"""Backend choice: least outstanding work, bounded session affinity, breaker-aware."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    outstanding: int

    def accepting(self) -> bool:
        """Ready and its circuit not open (does not claim a half-open probe)."""
        ...


class Balancer:
    """Orders the backends for a call.

    A session has a home backend (for KV-cache reuse): of the backends accepting calls,
    the one its id ranks highest by rendezvous hashing. The rule needs no memory, so
    every inference replica picks the same home for a session, whichever replica a turn
    lands on, and a backend that goes away moves only its own sessions. A session keeps
    to its home while the home holds at most `affinity_slack` more outstanding calls
    than the least loaded backend, so one hot session cannot pile onto a single backend;
    past that, that call goes to the least loaded one, and the next comes home again.
    """

    def __init__(self, backends: Sequence[Backend], *, affinity_slack: int = 4) -> None:
        if not backends:
            raise ValueError("at least one backend is required")
        self.backends = list(backends)
        self._slack = affinity_slack

    def order(self, session_id: str = "") -> list[Backend]:
        """Backends accepting calls, best first; empty when none is."""
        usable = [b for b in self.backends if b.accepting()]
        usable.sort(key=lambda b: b.outstanding)
        if session_id and usable:
            home = max(usable, key=lambda b: _rank(session_id, b.name))
            if home.outstanding <= usable[0].outstanding + self._slack:
                usable.remove(home)
                usable.insert(0, home)
        return usable


def _rank(session_id: str, backend: str) -> bytes:
    """A session's rendezvous weight for a backend: the same in every process."""
    return hashlib.blake2b(f"{session_id}\0{backend}".encode(), digest_size=8).digest()
