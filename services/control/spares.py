"""Warm spares: one idle, pre-imported process per service kind (`services.runtime.spare`),
which the supervisor turns into a replica instead of starting a cold interpreter.

A Python service's cold start is mostly imports (0.5 to 3 s of CPU, far more on a busy
machine); a spare has done them, so a replica restarted after a crash is SERVING after
its own start-up only. A spare is used once: the next tick starts another. A spare
belongs to its kind's generation: a rollout (new code on disk) discards the spare that
imported the old code, and its new replicas start cold.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from services.control.kinds import Command, Kind
from services.launcher._config import REPO_ROOT
from services.launcher._procs import ProcessRecord, exited, send, spawn, stop

logger = logging.getLogger(__name__)

SPARE_MODULE = "services.runtime.spare"


@dataclass(frozen=True)
class Spare:
    kind: str
    generation: int
    record: ProcessRecord


class Spares:
    """At most one spare per kind that has a `spare_module`."""

    def __init__(self, kinds: Mapping[str, Kind], *, log_dir: Path) -> None:
        self._kinds = dict(kinds)
        self._modules = {name: k.spare_module for name, k in kinds.items() if k.spare_module}
        self._log_dir = log_dir
        self._spares: dict[str, Spare] = {}

    def fill(self, generations: Mapping[str, int]) -> list[str]:
        """Starts a spare for each kind that lacks a live one of its current generation
        (a stale or dead one is stopped first); returns the kinds given one."""
        started = []
        for kind, module in self._modules.items():
            spare = self._spares.get(kind)
            if spare is not None and (
                spare.generation != generations[kind] or exited(spare.record)
            ):
                self._discard(kind)
                spare = None
            if spare is None:
                record = spawn(
                    f"{kind}-spare",
                    [sys.executable, "-m", SPARE_MODULE, module],
                    log=self._log_dir / f"{kind}-spare.log",
                    # its kind's environment (that of its first slot) from the start, as
                    # /proc shows it; the replica it becomes gets its own slot's on top
                    env=self._kinds[kind].command(0, {}).env,
                    cwd=REPO_ROOT,
                    stdin_pipe=True,
                )
                self._spares[kind] = Spare(kind, generations[kind], record)
                started.append(kind)
        return started

    def take(
        self, kind: str, generation: int, *, name: str, command: Command, log: Path
    ) -> ProcessRecord | None:
        """The kind's spare turned into replica `name` (running `command`'s module with
        its environment, output to `log`), or None when there is no usable spare."""
        spare = self._spares.pop(kind, None)
        if spare is None:
            return None
        if spare.generation != generation or command.argv[-1] != self._modules[kind]:
            self._stop(spare)
            return None
        order = json.dumps({"env": command.env, "log": str(log)}).encode() + b"\n"
        if not send(spare.record, order):
            self._stop(spare)
            return None
        return replace(spare.record, name=name, log=str(log))

    async def stop_all(self) -> None:
        spares = list(self._spares.values())
        self._spares.clear()
        await asyncio.gather(*(self._stop(s) for s in spares))

    def _discard(self, kind: str) -> None:
        spare = self._spares.pop(kind, None)
        if spare is not None:
            self._stop(spare)

    @staticmethod
    def _stop(spare: Spare) -> asyncio.Future[bool]:
        """Stops it in a thread (the caller's loop goes on); an idle spare is blocked
        reading stdin, and SIGTERM ends it at once."""
        return asyncio.get_running_loop().run_in_executor(
            None, functools.partial(stop, spare.record, timeout=2.0)
        )
