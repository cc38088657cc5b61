"""The devhost's settings: ``local.settings.json`` ``Values``, ``%NAME%`` binding expressions and
``host.json`` (the route prefix and ``extensions.queues``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routines.errors import RoutinesError

MIN_POLLING_INTERVAL = 0.1


class DevHostError(RoutinesError, RuntimeError):
    """The app cannot be hosted as declared (the message names the function and setting)."""


def apply_local_settings(app_dir: Path, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Copy ``local.settings.json`` ``Values`` into ``environ`` where not already set.

    The environment wins over the file. Returns the names taken from the file.
    Raises ``DevHostError`` when the file exists but is not a JSON object with an object ``Values``.
    """
    path = app_dir / "local.settings.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise DevHostError(f"{path}: cannot read it as JSON: {exc}") from exc
    values = data.get("Values", {}) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise DevHostError(f"{path}: 'Values' must be a JSON object")
    applied = []
    for name, value in values.items():
        if name not in environ and value is not None:
            environ[name] = value if isinstance(value, str) else json.dumps(value)
            applied.append(name)
    return applied


_SETTING_EXPRESSION = re.compile(r"%([^%]+)%")


def resolve_setting_expressions(text: str, env: Mapping[str, str], where: str) -> str:
    """Replace each ``%NAME%`` in ``text`` by the value of app setting ``NAME``.

    Raises ``DevHostError`` (naming ``where``) when a referenced setting is not set.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise DevHostError(f"{where}: binding expression %{name}% refers to app setting {name}, not set")
        return env[name]

    return _SETTING_EXPRESSION.sub(replace, text)


_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d+):(\d+)(?::(\d+)(?:\.(\d+))?)?$")


def parse_timespan(value: object, where: str) -> float:
    """Seconds in a .NET TimeSpan string (``[d.]hh:mm[:ss[.fff]]``); a bare number is milliseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000.0
    match = _TIMESPAN.match(str(value).strip())
    if not match:
        raise DevHostError(f"{where}: {value!r} is not a TimeSpan like '00:00:30' or '00:00:00.500'")
    days, hours, minutes, seconds, fraction = match.groups()
    return (
        int(days or 0) * 86400
        + int(hours) * 3600
        + int(minutes) * 60
        + int(seconds or 0)
        + (float(f"0.{fraction}") if fraction else 0.0)
    )


@dataclass(frozen=True)
class QueueOptions:
    """``host.json`` ``extensions.queues``, with the Functions host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @classmethod
    def from_host_json(cls, section: Mapping[str, Any]) -> QueueOptions:
        """Raises ``DevHostError`` on a value the Functions host would reject."""
        where = "host.json extensions.queues"
        batch_size = int(section.get("batchSize", 16))
        if not 1 <= batch_size <= 32:
            raise DevHostError(f"{where}.batchSize must be 1..32, not {batch_size}")
        threshold = int(section.get("newBatchThreshold", batch_size // 2))
        if threshold < 0:
            raise DevHostError(f"{where}.newBatchThreshold must be >= 0, not {threshold}")
        max_dequeue = int(section.get("maxDequeueCount", 5))
        if max_dequeue < 1:
            raise DevHostError(f"{where}.maxDequeueCount must be >= 1, not {max_dequeue}")
        encoding = str(section.get("messageEncoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise DevHostError(f"{where}.messageEncoding must be 'base64' or 'none', not {encoding!r}")
        polling = parse_timespan(section.get("maxPollingInterval", "00:01:00"), f"{where}.maxPollingInterval")
        return cls(
            batch_size=batch_size,
            new_batch_threshold=threshold,
            max_polling_interval=max(polling, MIN_POLLING_INTERVAL),
            visibility_timeout=parse_timespan(
                section.get("visibilityTimeout", "00:00:00"), f"{where}.visibilityTimeout"
            ),
            max_dequeue_count=max_dequeue,
            message_encoding=encoding,
        )


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)

    @classmethod
    def load(cls, app_dir: Path) -> HostConfig:
        """Read ``host.json`` of the app (defaults when absent). Raises ``DevHostError``."""
        path = app_dir / "host.json"
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise DevHostError(f"{path}: cannot read it as JSON: {exc}") from exc
        extensions = data.get("extensions", {}) if isinstance(data, dict) else {}
        http_section = extensions.get("http", {})
        prefix = http_section.get("routePrefix", "api")
        return cls(
            route_prefix=str(prefix).strip("/"),
            queues=QueueOptions.from_host_json(extensions.get("queues", {})),
        )
