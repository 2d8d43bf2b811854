"""Switchboard's unary gRPC methods found by name in the generated code."""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
import re
from dataclasses import dataclass

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

logger = logging.getLogger(__name__)

_GRPC_METHOD = re.compile(r"^(switchboard(?:\.\w+)*)\.(\w+)/(\w+)$")


@dataclass(frozen=True)
class GrpcMethod:
    """A unary method's path and message classes."""

    path: str
    request: type[Message]
    response: type[Message]


@functools.cache
def grpc_method(name: str) -> GrpcMethod:
    """The path and message classes of a unary Switchboard method, from the descriptors.

    Raises:
        ValueError: `name` is malformed, unknown or streaming.
    """
    match = _GRPC_METHOD.match(name)
    if not match:
        raise ValueError(f"method {name!r} is not switchboard.<package>.<Service>/<Method>")
    package, service, method = match.groups()
    _import_generated(package)
    try:
        found = descriptor_pool.Default().FindServiceByName(f"{package}.{service}")
    except KeyError:
        raise ValueError(f"unknown service {package}.{service}") from None
    descriptor = found.methods_by_name.get(method)
    if descriptor is None:
        raise ValueError(f"{package}.{service} has no method {method}")
    if descriptor.client_streaming or descriptor.server_streaming:
        raise ValueError(f"{name} streams; tools must be unary")
    return GrpcMethod(
        path=f"/{name}",
        request=message_factory.GetMessageClass(descriptor.input_type),
        response=message_factory.GetMessageClass(descriptor.output_type),
    )


def _import_generated(package: str) -> None:
    """Imports a generated package's `*_pb2` modules, adding its services to the pool."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"no generated code for package {package}") from None
    for info in pkgutil.iter_modules(getattr(module, "__path__", ())):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")
