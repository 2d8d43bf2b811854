"""Backend choice: least outstanding work, bounded session affinity, breaker-aware."""

from __future__ import annotations

import logging
from collections import OrderedDict
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

    A session keeps its backend (for KV-cache reuse) while that backend is available and
    holds at most `affinity_slack` more outstanding calls than the least loaded one, so
    one hot session cannot pile onto a single backend. Otherwise the least loaded backend
    wins and becomes the session's new home. Affinity entries are kept LRU-bounded.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        affinity_slack: int = 4,
        max_sessions: int = 100_000,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is required")
        self.backends = list(backends)
        self._slack = affinity_slack
        self._max_sessions = max_sessions
        self._affinity: OrderedDict[str, str] = OrderedDict()

    def order(self, session_id: str = "") -> list[Backend]:
        """Backends accepting calls, best first; empty when none is."""
        usable = [b for b in self.backends if b.accepting()]
        usable.sort(key=lambda b: b.outstanding)
        if session_id and usable:
            home = self._affinity.get(session_id)
            least = usable[0].outstanding
            pinned = next((b for b in usable if b.name == home), None)
            if pinned is not None and pinned.outstanding <= least + self._slack:
                usable.remove(pinned)
                usable.insert(0, pinned)
                self._affinity.move_to_end(session_id)
            else:
                self._remember(session_id, usable[0].name)
        return usable

    def _remember(self, session_id: str, backend: str) -> None:
        self._affinity[session_id] = backend
        self._affinity.move_to_end(session_id)
        while len(self._affinity) > self._max_sessions:
            self._affinity.popitem(last=False)
