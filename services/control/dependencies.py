"""The mesh's own NATS server, kept running and healthy by the control plane.

The launcher starts NATS (`state.json` records it); the control plane watches it while it
is recorded there. Its monitoring endpoint's full `/healthz` reports, besides the server,
each JetStream stream's health: a stream that met a critical write error (its disk filled
up) stays failed, taking no publish, until the server restarts, even once the space is
back. So the server is restarted when

- its process is gone (at once; repeated exits back off as a replica's do, and a crash
  loop is given up and reported), or
- it runs but `/healthz` has failed for `grace` seconds, and its store's filesystem has
  `min_free_bytes` free: a restart on a disk that is still full would fail the same way,
  so it waits for the space.

Stopping NATS on purpose (`Mesh.stop_component("nats")`, `switchboard down`) forgets its
record first, and nothing forgotten is restarted.

`judge` is the decision, on plain values (tested with a fake clock); `NatsWatch` is the
loop around it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

from services.control.events import EventBus
from services.control.restarts import RestartPolicy
from services.launcher._procs import ProcessRecord, StateFile, spawn, stop

logger = logging.getLogger(__name__)

NATS = "nats"

RESTARTS = Counter(
    "switchboard_control_dependency_restarts",
    "Restarts of a dependency the control plane supervises, by dependency and cause.",
    ["dependency", "cause"],
)


class Verdict(enum.Enum):
    HEALTHY = "healthy"
    WAIT = "wait"
    """Unhealthy, not for long enough yet (or not enough space to restart into)."""
    RESTART_EXITED = "exited"
    RESTART_UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class WatchPolicy:
    interval: float = 1.0
    """Seconds between health checks."""
    grace: float = 5.0
    """Seconds a running server may fail its health check before it is restarted (its
    start-up, recovering a large store, fails it too)."""
    min_free_bytes: int = 8 * 2**20
    """Free space its store's filesystem needs before an unhealthy server is restarted."""


@dataclass
class Observation:
    """What one check saw."""

    alive: bool
    healthy: bool
    free_bytes: int


def judge(
    seen: Observation, unhealthy_since: float | None, now: float, policy: WatchPolicy
) -> Verdict:
    """What to do about the server, given this check and since when (monotonic) it has
    been failing its health check, if it has."""
    if not seen.alive:
        return Verdict.RESTART_EXITED
    if seen.healthy:
        return Verdict.HEALTHY
    if unhealthy_since is None or now - unhealthy_since < policy.grace:
        return Verdict.WAIT
    if seen.free_bytes < policy.min_free_bytes:
        return Verdict.WAIT
    return Verdict.RESTART_UNHEALTHY


@dataclass
class NatsWatch:
    """Watches (and restarts) the NATS server `state` records, through its monitoring
    endpoint at `monitor_url` (`http://host:port`); `store_dir` is its JetStream store."""

    state: StateFile
    monitor_url: str
    store_dir: Path
    events: EventBus
    policy: WatchPolicy = field(default_factory=WatchPolicy)
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    _unhealthy_since: float | None = None
    _exits: list[float] = field(default_factory=list)
    _given_up: bool = False

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a watch that stops watching helps nobody
                logger.exception("checking NATS failed")
            await asyncio.sleep(self.policy.interval)

    async def tick(self) -> Verdict | None:
        """One check (and restart, if it comes to that); None when no NATS is recorded
        (stopped on purpose, or not the mesh's own)."""
        record = self._record()
        if record is None:
            self._unhealthy_since = None
            self._given_up = False
            return None
        seen = await asyncio.to_thread(self._observe, record)
        now = self.clock()
        if seen.alive and not seen.healthy and self._unhealthy_since is None:
            self._unhealthy_since = now
        verdict = judge(seen, self._unhealthy_since, now, self.policy)
        if verdict is Verdict.HEALTHY:
            self._unhealthy_since = None
        elif verdict in (Verdict.RESTART_EXITED, Verdict.RESTART_UNHEALTHY):
            await self._restart(record, verdict, now)
        return verdict

    def _record(self) -> ProcessRecord | None:
        return next((r for r in self.state.load() if r.name == NATS), None)

    def _observe(self, record: ProcessRecord) -> Observation:
        alive = record.process() is not None
        try:
            free = shutil.disk_usage(self.store_dir).free
        except OSError:
            free = 0
        return Observation(alive=alive, healthy=alive and self._healthz(), free_bytes=free)

    def _healthz(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=2.0) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    async def _restart(self, record: ProcessRecord, verdict: Verdict, now: float) -> None:
        if self._given_up:
            return
        self._exits = [*self.restarts.recent(self._exits, now), now]
        delay = self.restarts.delay(self._exits, now)
        if delay is None:
            self._given_up = True
            message = f"NATS restarted {len(self._exits)} times within a minute; given up"
            logger.error(message)
            self.events.emit("dependency_failed", message, replica=NATS, service=NATS)
            return
        await asyncio.sleep(delay)
        if verdict is Verdict.RESTART_UNHEALTHY:
            message = "NATS failed its health check (a JetStream stream's write error?); restarted"
        else:
            message = "NATS exited; restarted"
        fresh = await asyncio.to_thread(self._replace, record)
        if fresh is None:
            return  # stopped or replaced meanwhile
        self._unhealthy_since = None
        RESTARTS.labels(NATS, verdict.value).inc()
        logger.warning("%s (pid %d, was %d)", message, fresh.pid, record.pid)
        self.events.emit("dependency_restarted", message, replica=NATS, service=NATS)

    def _replace(self, record: ProcessRecord) -> ProcessRecord | None:
        """Stops `record`'s process and starts the same command line in its place, unless
        the state no longer records it."""
        if self._record() != record:
            return None
        stop(record, timeout=10.0)
        fresh: list[ProcessRecord] = []

        def swap(records: list[ProcessRecord]) -> list[ProcessRecord]:
            if record not in records:
                return records  # forgotten while it stopped: stays stopped
            fresh.append(spawn(NATS, record.argv, log=Path(record.log)))
            return [fresh[0] if r == record else r for r in records]

        self.state.update(swap)
        return fresh[0] if fresh else None


__all__ = ["NATS", "NatsWatch", "Observation", "Verdict", "WatchPolicy", "judge"]
