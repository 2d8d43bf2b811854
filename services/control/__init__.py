"""The control plane: serves Envoy its configuration over ADS (xDS v3).

`resources_from_static` turns the config the launcher renders into Envoy's dynamic
resources, `bootstrap` is the little Envoy still needs on disk, and `XdsServer` publishes
consistent, versioned snapshots of those resources to every connected Envoy.
"""

from __future__ import annotations

import logging

from services.control.resources import Endpoint, Resources, bootstrap, resources_from_static
from services.control.xds import InconsistentSnapshot, Nack, NodeStatus, TypeStatus, XdsServer

logger = logging.getLogger(__name__)

__all__ = [
    "Endpoint",
    "InconsistentSnapshot",
    "Nack",
    "NodeStatus",
    "Resources",
    "TypeStatus",
    "XdsServer",
    "bootstrap",
    "resources_from_static",
]
