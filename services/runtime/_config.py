"""Typed configuration read from the environment, failing fast with a clear message."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(ValueError):
    """A configuration value is missing or cannot be parsed."""


def parse_duration(text: str) -> timedelta:
    """Parses `250ms`, `2s`, `1.5m`, `1h` or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 2s, 1m)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _parse(kind: Any, raw: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _parse(inner[0], raw)
    if origin is tuple:
        (item, *_rest) = typing.get_args(kind)
        return tuple(_parse(item, part.strip()) for part in raw.split(",") if part.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind is timedelta:
        return parse_duration(raw)
    if kind is Path:
        return Path(raw).expanduser()
    if kind in (int, float, str):
        return kind(raw)
    raise TypeError(f"unsupported config type {kind!r}")


def load_config(cls: type[T], *, prefix: str, env: Mapping[str, str] | None = None) -> T:
    """Builds the frozen dataclass `cls` from `<PREFIX><FIELD>` environment variables.

    Fields without a default must be set. Every problem is reported at once, so a
    misconfigured process fails at start with one clear message.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}{field.name.upper()}"
        if name in env:
            try:
                values[field.name] = _parse(hints[field.name], env[name])
            except (ValueError, TypeError) as exc:
                problems.append(f"{name}={env[name]!r}: {exc}")
        elif (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ):
            problems.append(f"{name} is required but not set")
    if problems:
        raise ConfigError(f"invalid configuration for {cls.__name__}: " + "; ".join(problems))
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid configuration for {cls.__name__}: {exc}") from exc
