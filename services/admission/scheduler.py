"""The waiting room: strict priority classes, weighted fair queueing across tenants.

Order of service, from the outside in:

1. **Priority classes**, strictly: a class is served only when no better class has a
   request that may run now. Guard against starving the lower classes: each class
   counts the grants made to better classes while it had requests waiting (its
   *streak*); once the streak reaches `starvation_guard`, the class's next eligible
   request goes before every better class, and the streak restarts. Under sustained
   overload a lower class therefore gets at least one grant in `starvation_guard + 1`.
2. **Tenants within a class**, by weighted fair queueing on virtual time: start-time
   fair queueing (Goyal, Vin and Cheng, 1996), each grant costing one unit. A tenant's
   flow keeps the virtual finish time of its last grant, `finish`; the class keeps a
   virtual time `vtime`, the start tag of its last grant. The next grant goes to the
   flow with the smallest start tag, `max(finish, vtime)` (ties by arrival), and moves
   that flow's finish on by `1 / weight`; so backlogged tenants are served in
   proportion to their weights, whatever their demand. Taking `max(.., vtime)` means a
   tenant that was idle, or held back by its own limits, re-enters at the current
   virtual time: it cannot bank credit and then crowd the others out.
3. **FIFO within a tenant and class**, per lane: a request whose own user is over their
   limit, or whose model tier is full, is passed over so that it does not hold up the
   tenant's requests for other users or tiers; later requests of the same user (or
   tier) stay behind it. When the tenant itself is over a limit, the whole flow waits.

The queue knows nothing about buckets: `pop_next` asks a `check` callback whether each
candidate may run now. A request that cannot is simply left in place; no grant is
wasted, so the order is work-conserving.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from services.admission.limits import Priority

logger = logging.getLogger(__name__)


class Queued(Protocol):
    """What the queue needs to know about a waiting request."""

    @property
    def seq(self) -> int:
        """Arrival order, unique and increasing."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def tier(self) -> str: ...

    @property
    def priority(self) -> Priority: ...


T = TypeVar("T", bound=Queued)


class Verdict(enum.Enum):
    """Whether a waiting request may run now, and if not, what holds it back."""

    GRANT = enum.auto()
    BLOCKED_TENANT = enum.auto()
    """Its tenant is over a limit: nothing more of this tenant and class can go."""
    BLOCKED_USER = enum.auto()
    """Its user is over their own limit: pass over it and that user's later requests."""
    BLOCKED_TIER = enum.auto()
    """Its model tier is full: pass over it and every request for that tier."""


class _Blocked:
    """Lanes found blocked while choosing one grant: later requests on them wait too."""

    __slots__ = ("tiers", "users")

    def __init__(self) -> None:
        self.tiers: set[str] = set()
        self.users: set[tuple[str, str]] = set()


class _Flow(Generic[T]):
    """One tenant's waiting requests in one class, oldest first."""

    __slots__ = ("tenant_id", "weight", "entries", "finish")

    def __init__(self, tenant_id: str, weight: int) -> None:
        self.tenant_id = tenant_id
        self.weight = weight
        self.entries: deque[T] = deque()
        self.finish = 0.0


class _Class(Generic[T]):
    """The flows of one priority class."""

    __slots__ = ("priority", "flows", "vtime", "waiting", "streak")

    def __init__(self, priority: Priority) -> None:
        self.priority = priority
        self.flows: dict[str, _Flow[T]] = {}
        self.vtime = 0.0
        self.waiting = 0
        self.streak = 0


class FairQueue(Generic[T]):
    """Waiting requests in service order (see the module docstring)."""

    def __init__(
        self, *, classes: Sequence[Priority] = tuple(Priority), starvation_guard: int = 8
    ) -> None:
        if starvation_guard < 1:
            raise ValueError(f"starvation_guard must be at least 1, not {starvation_guard}")
        self._classes: list[_Class[T]] = [_Class(p) for p in sorted(classes)]
        self._by_priority = {c.priority: c for c in self._classes}
        self._guard = starvation_guard
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        """Every waiting request, class by class, flow by flow."""
        for cls in self._classes:
            for flow in cls.flows.values():
                yield from flow.entries

    def depth(self, priority: Priority) -> int:
        return self._by_priority[priority].waiting

    def push(self, entry: T, *, weight: int) -> None:
        """Adds a request at the back of its tenant's flow in its class."""
        cls = self._by_priority[entry.priority]
        flow = cls.flows.get(entry.tenant_id)
        if flow is None:
            flow = cls.flows[entry.tenant_id] = _Flow(entry.tenant_id, weight)
        flow.entries.append(entry)
        cls.waiting += 1
        self._size += 1

    def remove(self, entry: T) -> bool:
        """Takes a request out of the queue (cancelled, expired, refused); False if absent."""
        cls = self._by_priority[entry.priority]
        flow = cls.flows.get(entry.tenant_id)
        if flow is None:
            return False
        try:
            flow.entries.remove(entry)
        except ValueError:
            return False
        self._left(cls)
        return True

    def set_weight(self, tenant_id: str, weight: int) -> None:
        """Applies a tenant's new weight to its flows from their next grant on."""
        for cls in self._classes:
            if (flow := cls.flows.get(tenant_id)) is not None:
                flow.weight = weight

    def pop_next(self, check: Callable[[T], Verdict]) -> T | None:
        """Removes and returns the request to grant next, or None if none may run now."""
        if not self._size:
            return None
        blocked = _Blocked()
        tried: list[_Class[T]] = []
        for cls in self._classes:
            if cls.waiting and cls.streak >= self._guard:
                tried.append(cls)
                if (picked := self._best(cls, check, blocked)) is not None:
                    return self._take(cls, *picked)
        for cls in self._classes:
            if cls.waiting and cls not in tried:
                if (picked := self._best(cls, check, blocked)) is not None:
                    return self._take(cls, *picked)
        return None

    def _best(
        self, cls: _Class[T], check: Callable[[T], Verdict], blocked: _Blocked
    ) -> tuple[_Flow[T], T] | None:
        """The eligible request of the class with the smallest start tag."""
        vtime = cls.vtime
        best: tuple[_Flow[T], T] | None = None
        best_key = math.inf
        idle: list[str] = []
        for tenant_id, flow in cls.flows.items():
            if not flow.entries:
                if flow.finish <= vtime:  # no credit or debt left to remember
                    idle.append(tenant_id)
                continue
            key = max(flow.finish, vtime)
            if key > best_key:
                continue
            entry = self._first_eligible(flow, check, blocked)
            if entry is None:
                continue
            if best is None or key < best_key or entry.seq < best[1].seq:
                best, best_key = (flow, entry), key
        for tenant_id in idle:
            del cls.flows[tenant_id]
        return best

    @staticmethod
    def _first_eligible(
        flow: _Flow[T], check: Callable[[T], Verdict], blocked: _Blocked
    ) -> T | None:
        tiers, users = blocked.tiers, blocked.users
        for entry in flow.entries:
            if entry.tier in tiers or (users and (entry.tenant_id, entry.user_id) in users):
                continue
            verdict = check(entry)
            if verdict is Verdict.GRANT:
                return entry
            if verdict is Verdict.BLOCKED_TENANT:
                return None
            if verdict is Verdict.BLOCKED_USER:
                users.add((entry.tenant_id, entry.user_id))
            else:
                tiers.add(entry.tier)
        return None

    def _take(self, cls: _Class[T], flow: _Flow[T], entry: T) -> T:
        if flow.entries[0] is entry:
            flow.entries.popleft()
        else:
            flow.entries.remove(entry)
        start = max(flow.finish, cls.vtime)
        flow.finish = start + 1.0 / flow.weight
        cls.vtime = start
        for other in self._classes:
            if other.priority > cls.priority and other.waiting:
                other.streak += 1
        cls.streak = 0
        self._left(cls)
        return entry

    def _left(self, cls: _Class[T]) -> None:
        cls.waiting -= 1
        self._size -= 1
        if not cls.waiting:
            # Nobody waits in this class: there is no one left to be fair to.
            cls.flows.clear()
            cls.vtime = 0.0
            cls.streak = 0

    def heads(self) -> Iterator[T]:
        """The oldest waiting request of every flow."""
        for cls in self._classes:
            for flow in cls.flows.values():
                if flow.entries:
                    yield flow.entries[0]

    def position(self, entry: T) -> int:
        """Estimated number of requests that will be granted before `entry`.

        Everything waiting in better classes, the requests ahead of it in its own flow,
        and, from every other flow of its class, the requests whose start tags come no
        later than its own. Assumes everyone stays eligible; -1 if `entry` is not queued.
        """
        cls = self._by_priority[entry.priority]
        flow = cls.flows.get(entry.tenant_id)
        if flow is None:
            return -1
        try:
            index = flow.entries.index(entry)
        except ValueError:
            return -1
        ahead = index + sum(c.waiting for c in self._classes if c.priority < cls.priority)
        tag = max(flow.finish, cls.vtime) + index / flow.weight
        for other in cls.flows.values():
            if other is flow or not other.entries or tag < (base := max(other.finish, cls.vtime)):
                continue
            served_first = math.floor((tag - base) * other.weight + 1e-9) + 1
            ahead += min(len(other.entries), served_first)
        return ahead

    def head(self, tenant_id: str, priority: Priority) -> T | None:
        """The oldest waiting request of a tenant in a class."""
        flow = self._by_priority[priority].flows.get(tenant_id)
        return flow.entries[0] if flow is not None and flow.entries else None

    def ahead_in_tenant(self, entry: T) -> list[T]:
        """The requests of the same tenant that will be served before `entry`."""
        ahead: list[T] = []
        for cls in self._classes:
            flow = cls.flows.get(entry.tenant_id)
            if flow is None:
                continue
            if cls.priority < entry.priority:
                ahead.extend(flow.entries)
            elif cls.priority == entry.priority:
                for other in flow.entries:
                    if other is entry:
                        break
                    ahead.append(other)
        return ahead
