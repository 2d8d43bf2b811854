"""A replica's slices of its tenants' quotas: admissions granted ahead of need.

The admission replica owning a tenant grants a slice (leases decided ahead, charged and
holding their slots as any admission) over the tenant's AdmitSession stream; requests
then take a lease from it here, with no round trip. A pool is kept per (tenant, tier,
priority): a request takes a lease whose charged tokens cover its own, and the pool asks
for more once it is half empty. Nothing here does I/O: the gate sends what these
decisions call for.

A slice is never used against contention: the owner grants none while anything waits
there, and recalls the unclaimed leases when something starts waiting; leases unused
for `idle_s` go back too, so an idle tenant holds no slots.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)
"""What a lease was granted over (the gate's AdmitSession stream): gone with it."""

Key = tuple[str, str, int]
"""(tenant, tier, priority)."""


@dataclass(frozen=True, slots=True)
class Reserved(Generic[S]):
    lease_id: str
    charged_tokens: int
    stream: S
    since: float


@dataclass(slots=True)
class _Pool(Generic[S]):
    leases: deque[Reserved[S]] = field(default_factory=deque)
    asking: bool = False
    quiet_until: float = 0.0
    """No slice is asked for before this (the last ask got none, or was recalled)."""


class Slices(Generic[S]):
    """The pools of one replica.

    Args:
        size: leases a pool holds when full (0: no slices, every request is admitted
            by a round trip).
        idle_s: a lease unused this long goes back.
        retry_s: after a slice came back empty or was recalled, how long before the
            pool asks again.
        alive: whether leases granted over a stream may still be used (the owner gives
            back the unclaimed leases of a stream that ended).
    """

    def __init__(
        self,
        *,
        size: int,
        idle_s: float = 2.0,
        retry_s: float = 1.0,
        alive: Callable[[S], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 0:
            raise ValueError("the slice size must be at least 0")
        self.size = size
        self._idle_s = idle_s
        self._retry_s = retry_s
        self._alive = alive
        self._clock = clock
        self._pools: dict[Key, _Pool[S]] = {}

    def __len__(self) -> int:
        """Leases held, every pool together."""
        return sum(len(pool.leases) for pool in self._pools.values())

    def take(self, key: Key, tokens: int) -> Reserved[S] | None:
        """A lease for a request needing `tokens`, claimed by the caller; None: admit it
        by a round trip. Leases of ended streams are dropped on the way."""
        pool = self._pools.get(key)
        if pool is None:
            return None
        leases = pool.leases
        for _ in range(len(leases)):
            lease = leases.popleft()
            if not self._alive(lease.stream):
                continue
            if lease.charged_tokens >= tokens:
                return lease
            leases.append(lease)
        return None

    def wanted(self, key: Key) -> int:
        """How many leases to ask for now for `key` (0: none); a positive answer marks
        the pool asking until `granted`."""
        if self.size == 0:
            return 0
        pool = self._pools.setdefault(key, _Pool())
        held = len(pool.leases)
        if pool.asking or held > self.size // 2 or self._clock() < pool.quiet_until:
            return 0
        pool.asking = True
        return self.size - held

    def granted(self, key: Key, leases: list[tuple[str, int]], stream: S) -> None:
        """The answer to an ask: (lease id, charged tokens) of each lease granted (none:
        the pool asks again after `retry_s`)."""
        pool = self._pools.setdefault(key, _Pool())
        pool.asking = False
        now = self._clock()
        if not leases:
            pool.quiet_until = now + self._retry_s
        elif self._alive(stream):  # else the owner gave them back when the stream ended
            pool.leases.extend(Reserved(lease, tokens, stream, now) for lease, tokens in leases)

    def ended(self, key: Key) -> None:
        """An ask will get no answer (its stream ended first)."""
        if (pool := self._pools.get(key)) is not None:
            pool.asking = False

    def recall(self, stream: S) -> list[str]:
        """Requests wait at the owner: every unclaimed lease granted over `stream` goes
        back (returned), and its pools ask for none for a while."""
        back: list[str] = []
        until = self._clock() + self._retry_s
        for pool in self._pools.values():
            mine = [lease for lease in pool.leases if lease.stream == stream]
            if mine:
                pool.leases = deque(lease for lease in pool.leases if lease.stream != stream)
                pool.quiet_until = until
                back += [lease.lease_id for lease in mine]
        return back

    def idle(self) -> list[Reserved[S]]:
        """Takes out, and returns, the leases unused for `idle_s`; forgets empty pools."""
        now = self._clock()
        cutoff = now - self._idle_s
        out: list[Reserved[S]] = []
        for key, pool in list(self._pools.items()):
            if any(lease.since <= cutoff for lease in pool.leases):
                out += [lease for lease in pool.leases if lease.since <= cutoff]
                pool.leases = deque(lease for lease in pool.leases if lease.since > cutoff)
            if not pool.leases and not pool.asking and now >= pool.quiet_until:
                del self._pools[key]
        return out
