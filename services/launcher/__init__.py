"""The launcher: starts, watches and stops the whole local mesh (`switchboard up|down`).

`Mesh` runs what a `LauncherConfig` describes (`load_launcher_config` reads it from
`SWITCHBOARD_*` variables; `isolated_config` gives tests and benchmarks their own run
directory on free ports). The processes it starts are recorded by PID in the run
directory's `StateFile`; `spawn`, `stop` and `port_owner` are the process handling it is
built on. `chat` is the terminal client of `switchboard chat`.
"""

from __future__ import annotations

import logging

from services.launcher._config import LauncherConfig, isolated_config, load_launcher_config
from services.launcher._mesh import LaunchError, Mesh
from services.launcher._procs import (
    ProcessRecord,
    StateFile,
    free_port_base,
    port_owner,
    spawn,
    stop,
)
from services.launcher._services import ServiceSpec, service_processes

logger = logging.getLogger(__name__)

__all__ = [
    "LaunchError",
    "LauncherConfig",
    "Mesh",
    "ProcessRecord",
    "ServiceSpec",
    "StateFile",
    "free_port_base",
    "isolated_config",
    "load_launcher_config",
    "port_owner",
    "service_processes",
    "spawn",
    "stop",
]
