"""HTTP semantics every agent backend shares: which answers are worth another attempt, how long the
server asks us to wait, and how much of an agent's output is kept."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["cap_utf8", "is_retriable_status", "parse_retry_after", "retry_after_seconds"]


def is_retriable_status(status: int | None) -> bool:
    """408, 429 and 5xx are worth another attempt; so is no status at all (connection error, timeout)."""
    return status is None or status in (408, 429) or status >= 500


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay seconds or an HTTP date), at least 0.

    ``None`` when the header is absent or unreadable. ``now`` defaults to the current time. A huge
    value is returned as it is: the retry policy caps what it waits (``decide``)."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def retry_after_seconds(headers: Mapping[str, str], now: datetime) -> float | None:
    """The server's back-off hint in seconds: ``retry-after-ms`` (Azure's, OpenAI's), else
    ``Retry-After``. ``headers`` must look names up in any case (requests' and httpx's do)."""
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = headers.get(name)
        if raw:
            try:
                milliseconds = float(raw)
            except ValueError:
                continue
            if math.isfinite(milliseconds):
                return max(0.0, milliseconds / 1000.0)
    return parse_retry_after(headers.get("retry-after"), now=now)


def cap_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")
