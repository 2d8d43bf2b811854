"""The key store's cache of verifications: fresh answers for `ttl`, and known keys kept
working through a key-store outage for `stale_grace`.

An entry is keyed by the hash of the key (the cache holds no key in clear) and holds
who the key identified (None: it identified nobody) and when that was read from the
database. Within `ttl` of that read the entry is the answer; after it the database is
asked again. When the database cannot answer, an entry read less than `stale_grace` ago
is the answer instead of an outage at the edge:

- a revoked key stops working within `ttl` while the database is up, as without the
  grace;
- while it is down, a key verified in the last `stale_grace` keeps working (nothing can
  be revoked meanwhile: revoking writes to the same database), and a key it never saw,
  or saw too long ago, is refused with UNAVAILABLE, so the edge still fails closed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    value: T
    read_at: float
    """When the database said it (the cache's clock)."""


class VerificationCache(Generic[T]):
    """LRU-bounded verifications with a freshness and a stale-if-error horizon (seconds,
    on whatever clock the caller passes as `now`)."""

    def __init__(self, *, ttl: float, stale_grace: float, size: int = 10_000) -> None:
        if stale_grace < ttl:
            raise ValueError("the stale grace must be at least the cache's ttl")
        self.ttl = ttl
        self.stale_grace = stale_grace
        self._size = size
        self._entries: OrderedDict[bytes, Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, slot: bytes, now: float) -> Entry[T] | None:
        """The entry if it was read less than `ttl` ago."""
        return self._within(slot, now, self.ttl)

    def stale(self, slot: bytes, now: float) -> Entry[T] | None:
        """The entry if it was read less than `stale_grace` ago (the database is down)."""
        return self._within(slot, now, self.stale_grace)

    def put(self, slot: bytes, value: T, now: float) -> None:
        self._entries[slot] = Entry(value, now)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, which: Callable[[T], bool]) -> int:
        """Forgets the entries whose value `which` picks (a revoked key's); how many."""
        gone = [slot for slot, entry in self._entries.items() if which(entry.value)]
        for slot in gone:
            del self._entries[slot]
        return len(gone)

    def _within(self, slot: bytes, now: float, horizon: float) -> Entry[T] | None:
        entry = self._entries.get(slot)
        if entry is None or now - entry.read_at >= horizon:
            return None
        self._entries.move_to_end(slot)
        return entry
