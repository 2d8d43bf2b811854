"""The replicas the control plane owns, and their lives.

Every replica is a process in a slot of its kind (`kinds`). One loop watches them all
(`tick`, ten times a second): a replica that exited is restarted after its backoff
(`restarts.RestartPolicy`), or marked FAILED with its last log lines when it crash-loops;
a STARTING replica is probed until it reports ready, and only then counts among Envoy's
endpoints. Every change of the set of endpoints calls `on_change`, which pushes a new
config to Envoy (and returns once Envoy has acknowledged it, or after a bound).

Operations change the set on purpose, one per kind at a time: `scale`, `rollout`,
`stop_replica`, `start_replica`. A replica leaves gracefully: DRAINING in Envoy's
endpoints first (no new calls), then SIGTERM (the runtime's graceful shutdown lets
in-flight calls finish and tells streams to go), then it is forgotten.

What is running is written to `replicas.json` in the run directory, so that `down` can
stop every process by PID even without the control plane, and a restarted control plane
adopts the replicas still running instead of starting them again (Envoy keeps routing to
them meanwhile, on its last config).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from services.control.events import EventBus
from services.control.kinds import Kind
from services.control.restarts import RestartPolicy
from services.control.spares import Spares
from services.launcher._procs import (
    ProcessRecord,
    exited,
    kill_group,
    port_free,
    port_owner,
    record_from_json,
    record_json,
    spawn,
    stop,
    tail,
)
from services.launcher._services import MAX_SLOTS
from services.runtime import FailedPrecondition, FieldViolation, NotFound, Unavailable, invalid

logger = logging.getLogger(__name__)

TICK_S = 0.1
"""How often the loop looks at every replica."""
STOP_TIMEOUT_S = 30.0
PORT_WAIT_S = 5.0
"""How long a restart waits for its slot's ports to be let go before it starts anyway
(and fails, and is retried, if they are still held)."""
"""How long a replica has after SIGTERM (drain, in-flight calls' grace, chat's turns)
before SIGKILL."""


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


ROUTED = frozenset({State.SERVING, State.DRAINING})
"""The states in which a replica is among Envoy's endpoints."""
ALIVE = frozenset({State.STARTING, State.SERVING, State.DRAINING})
"""The states in which a replica's process should be running."""


@dataclass
class Replica:
    kind: str
    slot: int
    name: str
    generation: int
    state: State = State.STARTING
    record: ProcessRecord | None = None
    restarts: int = 0
    exits: list[float] = field(default_factory=list)
    """Monotonic times of its recent exits (the crash-loop window)."""
    started_at: float = 0.0
    """Wall time its current process started (0: none runs)."""
    started_mono: float = 0.0
    retry_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment given by StartReplica."""
    last_log: str = ""
    retiring: bool = False
    """Leaving on purpose (drain, then stop): an exit now is not a crash."""

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "slot": self.slot,
            "name": self.name,
            "generation": self.generation,
            "state": self.state.value,
            "env": self.env,
            "restarts": self.restarts,
            "record": None if self.record is None else record_json(self.record),
        }


class Supervisor:
    """Owns the replicas of `kinds`; see the module docstring."""

    def __init__(
        self,
        kinds: Mapping[str, Kind],
        *,
        state_path: Path,
        log_dir: Path,
        on_change: Callable[[], Awaitable[None]],
        events: EventBus,
        policy: RestartPolicy | None = None,
        max_replicas: int = 4,
        spares: bool = False,
    ) -> None:
        self.kinds = dict(kinds)
        self._state_path = state_path
        self._log_dir = log_dir
        self._on_change = on_change
        self._events = events
        self._policy = policy or RestartPolicy()
        self.max_replicas = max_replicas
        self.spares = Spares(kinds, log_dir=log_dir) if spares else None
        self.replicas: dict[str, Replica] = {}
        self.generations: dict[str, int] = dict.fromkeys(self.kinds, 1)
        self._busy: dict[str, str] = {}
        self._dirty = False
        self._probing: set[str] = set()
        # the state file is written in order, off the event loop: a write stalled on a
        # busy disk must not hold up Envoy's ACKs, probes and restarts
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor-state")
        self._pushing: asyncio.Task[None] | None = None
        self._stopper = ThreadPoolExecutor(max_workers=4 * MAX_SLOTS, thread_name_prefix="stop")

    # -- start, adopt, stop everything ------------------------------------------------------

    def restore(self, counts: Mapping[str, int]) -> None:
        """Adopts the replicas a previous control plane left running (`replicas.json`),
        and plans `counts` replicas of each kind that has none recorded."""
        saved = self._load()
        for raw in saved.get("replicas", []):
            replica = _replica_from_json(raw)
            if replica is None or replica.kind not in self.kinds:
                continue
            self.replicas[replica.name] = replica
            if replica.state in (State.STOPPED, State.FAILED):
                continue
            alive = replica.record is not None and replica.record.process() is not None
            if alive:
                replica.started_at = replica.record.started_at()  # type: ignore[union-attr]
            if alive and replica.state != State.DRAINING:
                # Envoy still routes to it on its last config: keep it there.
                replica.state = State.SERVING
                replica.started_mono = time.monotonic()
            elif alive:
                replica.retiring = True
            else:
                replica.state = State.BACKOFF
                replica.record = None
        self.generations.update(
            {k: int(v) for k, v in saved.get("generations", {}).items() if k in self.kinds}
        )
        for kind, count in counts.items():
            if not any(r.kind == kind for r in self.replicas.values()):
                for slot in range(count):
                    self._plan(kind, slot)
        self._save()

    async def start_all(self, *, timeout: float) -> None:
        """Starts every planned replica (kinds in order, each kind's replicas at once)
        and waits until they are SERVING; a replica that cannot start stays supervised
        (it is retried, then FAILED) and this raises."""
        for replica in list(self.replicas.values()):
            if replica.state == State.BACKOFF and replica.record is None:
                self._spawn(replica)
        for replica in [r for r in self.replicas.values() if r.retiring]:
            asyncio.get_running_loop().create_task(self._retire(replica))
        waiting = [r.name for r in self.replicas.values() if r.state == State.STARTING]
        await self.wait_serving(waiting, timeout=timeout)

    async def shutdown(self) -> None:
        """Stops every replica: the services together, then Triton."""
        if self.spares is not None:
            await self.spares.stop_all()
        by_kind: dict[str, list[Replica]] = {}
        for replica in self.replicas.values():
            replica.retiring = True
            by_kind.setdefault(replica.kind, []).append(replica)
        services = [r for k, rs in by_kind.items() if self.kinds[k].scalable for r in rs]
        others = [r for k, rs in by_kind.items() if not self.kinds[k].scalable for r in rs]
        for layer in (services, others):
            await asyncio.gather(*(self._stop_process(r) for r in layer))
        self._save()
        self._writer.shutdown(wait=True)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Watches every replica until cancelled."""
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                logger.exception("supervisor tick failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        now = time.monotonic()
        for replica in list(self.replicas.values()):
            if replica.state in ALIVE and replica.record is not None and not replica.retiring:
                if exited(replica.record):
                    self._exited(replica, now)
            if replica.state == State.BACKOFF and now >= replica.retry_at:
                if self._ports_free(replica) or now >= replica.retry_at + PORT_WAIT_S:
                    self._spawn(replica)
            elif replica.state == State.STARTING and replica.name not in self._probing:
                # A replica alive but not ready (its own dependencies still starting) is
                # left to become ready: it is not routed meanwhile. An operation waiting
                # for it gives up after the kind's start timeout (`wait_serving`).
                self._probing.add(replica.name)
                asyncio.get_running_loop().create_task(self._probe(replica))
        if self.spares is not None and not any(
            r.state == State.STARTING for r in self.replicas.values()
        ):
            # only once every replica has started: a spare's imports would slow them
            for kind in self.spares.fill(self.generations):
                logger.info("a warm spare is starting", extra={"service": kind})
        if self._dirty and (self._pushing is None or self._pushing.done()):
            # in the background: the loop goes on watching (and restarting) meanwhile
            self._dirty = False
            self._save()
            self._pushing = asyncio.get_running_loop().create_task(self._on_change())

    async def _probe(self, replica: Replica) -> None:
        try:
            ready = await self.kinds[replica.kind].ready(replica.slot)
        except Exception:  # noqa: BLE001 - not ready yet
            ready = False
        finally:
            self._probing.discard(replica.name)
        if ready and replica.state == State.STARTING and not replica.retiring:
            replica.state = State.SERVING
            self._event(replica, "serving", f"{replica.name} is SERVING")
            self._dirty = True

    def _exited(self, replica: Replica, now: float) -> None:
        code = replica.record.pid if replica.record else 0
        if replica.record is not None:
            kill_group(replica.record)  # what it started (Triton's backend stubs) goes too
        replica.record = None
        replica.started_at = 0.0
        self.kinds[replica.kind].cleanup(replica.slot)
        replica.exits = [*self._policy.recent(replica.exits, now), now]
        delay = self._policy.delay(replica.exits, now)
        log = self._log_dir / f"{replica.name}.log"
        if delay is None:
            replica.state = State.FAILED
            replica.last_log = tail(log, 20)
            self._event(
                replica,
                "failed",
                f"{replica.name} exited {len(replica.exits)} times within"
                f" {self._policy.window:g}s: not restarted",
            )
        else:
            replica.state = State.BACKOFF
            replica.retry_at = now + delay
            replica.restarts += 1
            self._event(
                replica, "exited", f"{replica.name} (pid {code}) exited; restart in {delay:g}s"
            )
        self._dirty = True

    # -- processes --------------------------------------------------------------------------

    def _ports_free(self, replica: Replica) -> bool:
        """Whether the slot's ports are let go: a killed process's threads may still hold
        its sockets for a moment after its main thread is gone (it already looks dead),
        and a warm spare would start within that moment."""
        ports = self.kinds[replica.kind].ports(replica.slot)
        return all(port_free(host, port) for host, port in ports)

    def _plan(self, kind: str, slot: int) -> Replica:
        name = self.kinds[kind].process_name(slot)
        replica = Replica(kind, slot, name, self.generations[kind], state=State.BACKOFF)
        self.replicas[name] = replica
        return replica

    def _spawn(self, replica: Replica) -> None:
        command = self.kinds[replica.kind].command(replica.slot, replica.env)
        log = self._log_dir / f"{replica.name}.log"
        record = None
        if self.spares is not None:
            record = self.spares.take(
                replica.kind, replica.generation, name=replica.name, command=command, log=log
            )
        how = "from a warm spare" if record is not None else "cold"
        if record is None:
            record = spawn(replica.name, command.argv, log=log, env=command.env, cwd=command.cwd)
        replica.record = record
        replica.state = State.STARTING
        replica.started_at = time.time()
        replica.started_mono = time.monotonic()
        replica.last_log = ""
        self._event(replica, "started", f"{replica.name} started (pid {record.pid}, {how})")
        self._dirty = True

    async def _stop_process(self, replica: Replica) -> None:
        record = replica.record
        if record is not None:
            # each stop waits for its process's graceful shutdown: one thread each, so
            # stopping every replica takes as long as the slowest, not their sum
            await asyncio.get_running_loop().run_in_executor(
                self._stopper, functools.partial(stop, record, timeout=STOP_TIMEOUT_S)
            )
            self.kinds[replica.kind].cleanup(replica.slot)
        replica.record = None
        replica.started_at = 0.0

    async def _retire(self, replica: Replica, *, keep: bool = False) -> None:
        """Drains `replica` (DRAINING in Envoy, acknowledged), stops it, and forgets it
        (or keeps it, STOPPED, with `keep`)."""
        replica.retiring = True
        if replica.state == State.SERVING:
            replica.state = State.DRAINING
            self._event(replica, "draining", f"{replica.name} is DRAINING")
            self._save()
            await self._on_change()
        await self._stop_process(replica)
        if keep:
            replica.state = State.STOPPED
            replica.retiring = False
            self._event(replica, "stopped", f"{replica.name} stopped")
        else:
            self.replicas.pop(replica.name, None)
            self._event(replica, "stopped", f"{replica.name} stopped and removed")
        self._save()
        await self._on_change()

    # -- what Envoy routes to ---------------------------------------------------------------

    def endpoints(self) -> dict[str, list[tuple[str, int, bool]]]:
        """Kind → (host, port, draining) of each replica Envoy may route to."""
        found: dict[str, list[tuple[str, int, bool]]] = {kind: [] for kind in self.kinds}
        for replica in sorted(self.replicas.values(), key=lambda r: (r.kind, r.slot)):
            if replica.state in ROUTED and replica.record is not None:
                host, port = self.kinds[replica.kind].address(replica.slot)
                found[replica.kind].append((host, port, replica.state == State.DRAINING))
        return found

    async def wait_serving(self, names: Iterable[str], *, timeout: float) -> None:
        """Waits until every replica named is SERVING.

        Raises:
            Unavailable: one FAILED, vanished or was not SERVING within `timeout`.
        """
        names = list(names)
        deadline = time.monotonic() + timeout
        while True:
            states = {n: self.replicas[n].state if n in self.replicas else None for n in names}
            if all(s == State.SERVING for s in states.values()):
                return
            bad = [n for n, s in states.items() if s in (None, State.FAILED, State.STOPPED)]
            if bad or time.monotonic() > deadline:
                late = bad or [n for n, s in states.items() if s != State.SERVING]
                raise Unavailable(
                    f"replica(s) {', '.join(late)} did not become SERVING"
                    + "".join(
                        f"; {n}'s last log lines:\n{self.replicas[n].last_log}"
                        for n in late
                        if n in self.replicas and self.replicas[n].last_log
                    ),
                    reason="BACKENDS_UNAVAILABLE",
                    metadata={"replicas": ",".join(late)},
                )
            await asyncio.sleep(TICK_S)

    # -- operations -------------------------------------------------------------------------

    def of_kind(self, kind: str) -> list[Replica]:
        return sorted((r for r in self.replicas.values() if r.kind == kind), key=lambda r: r.slot)

    def check_kind(self, kind: str, *, field_name: str = "service", scalable: bool = True) -> Kind:
        found = self.kinds.get(kind)
        if found is None or (scalable and not found.scalable):
            choices = sorted(k for k, v in self.kinds.items() if v.scalable or not scalable)
            raise invalid(
                [FieldViolation(field_name, f"unknown service {kind!r}; one of {choices}")]
            )
        return found

    def replica(self, name: str) -> Replica:
        found = self.replicas.get(name)
        if found is None:
            raise NotFound(
                f"no replica is named {name!r}",
                reason="REPLICA_NOT_FOUND",
                metadata={"replica": name},
            )
        return found

    def _claim(self, kind: str, operation: str) -> None:
        running = self._busy.get(kind) or self._busy.get("*")
        if running or (kind == "*" and self._busy):
            raise FailedPrecondition(
                f"{kind if kind != '*' else 'the mesh'} is busy: "
                f"{running or next(iter(self._busy.values()))} is under way",
                reason="OPERATION_IN_PROGRESS",
                metadata={"service": kind, "operation": running or operation},
            )
        self._busy[kind] = operation

    def _free_slot(self, kind: str) -> int:
        used = {r.slot for r in self.of_kind(kind)}
        spec = self.kinds[kind]
        for slot in range(spec.slots):
            if slot not in used and port_owner(*spec.address(slot)) is None:
                return slot
        raise FailedPrecondition(
            f"no free slot for another {kind} replica",
            reason="OPERATION_IN_PROGRESS",
            metadata={"service": kind, "operation": "slots"},
        )

    async def _add(self, kind: str, *, timeout: float) -> Replica:
        replica = self._plan(kind, self._free_slot(kind))
        self._spawn(replica)
        try:
            await self.wait_serving([replica.name], timeout=timeout)
        except Unavailable:
            await self._retire(replica)
            raise
        self._dirty = False
        self._save()
        await self._on_change()
        return replica

    async def scale(self, kind: str, count: int) -> list[Replica]:
        spec = self.check_kind(kind)
        most = spec.most or self.max_replicas
        if count > most:
            raise invalid([FieldViolation("replicas", f"{kind} runs at most {most} (the maximum)")])
        self._claim(kind, "scale")
        try:
            live = [r for r in self.of_kind(kind) if r.state not in (State.STOPPED,)]
            if count > len(live):
                await asyncio.gather(
                    *(self._add(kind, timeout=spec.start_timeout) for _ in range(count - len(live)))
                )
            for replica in sorted(live, key=lambda r: -r.slot)[: max(0, len(live) - count)]:
                await self._retire(replica)
            self._event_kind(kind, "scaled", f"{kind} scaled to {count}")
            return self.of_kind(kind)
        finally:
            self._busy.pop(kind, None)

    async def rollout(self, kind: str) -> list[Replica]:
        """Replaces every replica of `kind` (every scalable kind for "")."""
        kinds = [kind] if kind else [k for k, v in self.kinds.items() if v.scalable]
        for name in kinds:
            self.check_kind(name)
        self._claim(kind or "*", "rollout")
        try:
            for name in kinds:
                await self._rollout_one(name)
            return [r for name in kinds for r in self.of_kind(name)]
        finally:
            self._busy.pop(kind or "*", None)

    async def _rollout_one(self, kind: str) -> None:
        spec = self.kinds[kind]
        self.generations[kind] += 1
        self._event_kind(
            kind, "rollout_started", f"{kind}: rolling out generation {self.generations[kind]}"
        )
        old = [r for r in self.of_kind(kind) if r.state != State.STOPPED]
        for replica in old:
            try:
                await self._add(kind, timeout=spec.start_timeout)
            except Unavailable:
                self._event_kind(
                    kind, "rollout_failed", f"{kind}: a new replica never became SERVING"
                )
                raise
            await self._retire(replica)
        self._event_kind(
            kind, "rollout_done", f"{kind}: generation {self.generations[kind]} rolled out"
        )

    async def stop_replica(self, name: str) -> Replica:
        replica = self.replica(name)
        self._claim(replica.kind, "stop")
        try:
            await self._retire(replica, keep=True)
            return replica
        finally:
            self._busy.pop(replica.kind, None)

    async def start_replica(self, name: str, env: Mapping[str, str]) -> Replica:
        replica = self.replica(name)
        self._claim(replica.kind, "start")
        try:
            if replica.record is not None:
                await self._retire(replica, keep=True)
            self.replicas[name] = replica
            replica.env = dict(env)
            replica.exits = []
            replica.generation = self.generations[replica.kind]
            self._spawn(replica)
            await self.wait_serving([name], timeout=self.kinds[replica.kind].start_timeout)
            self._dirty = False
            self._save()
            await self._on_change()
            return replica
        finally:
            self._busy.pop(replica.kind, None)

    # -- state file and events --------------------------------------------------------------

    def _save(self) -> None:
        data = {
            "generations": self.generations,
            "replicas": [r.to_json() for r in self.replicas.values()],
        }
        text = json.dumps(data, indent=2)
        try:
            self._writer.submit(_write_state, self._state_path, text)
        except RuntimeError:  # shut down: what changes afterwards is written at once
            _write_state(self._state_path, text)

    def _load(self) -> dict[str, object]:
        try:
            return json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _event(self, replica: Replica, kind: str, message: str) -> None:
        logger.info(message, extra={"replica": replica.name, "event": kind})
        self._events.emit(kind, message, replica=replica.name, service=replica.kind)

    def _event_kind(self, kind: str, event: str, message: str) -> None:
        logger.info(message, extra={"service": kind, "event": event})
        self._events.emit(event, message, service=kind)


def _replica_from_json(raw: Mapping[str, object]) -> Replica | None:
    try:
        record_raw = raw.get("record")
        record = record_from_json(record_raw) if isinstance(record_raw, dict) else None
        return Replica(
            kind=str(raw["kind"]),
            slot=int(raw["slot"]),  # type: ignore[call-overload]
            name=str(raw["name"]),
            generation=int(raw["generation"]),  # type: ignore[call-overload]
            state=State(raw["state"]),
            record=record,
            restarts=int(raw.get("restarts", 0)),  # type: ignore[call-overload]
            env={str(k): str(v) for k, v in dict(raw.get("env") or {}).items()},  # type: ignore[call-overload]
        )
    except (KeyError, TypeError, ValueError):
        logger.warning("ignoring an unreadable replica record: %r", raw)
        return None


def _write_state(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as error:  # the next change writes it again
        logger.warning("supervisor state not saved: %s", error)
