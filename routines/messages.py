"""The dispatch queue message (docs/architecture.md, "The dispatch queue message") and its queue."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import Field

from routines.models import STEP_ID_PATTERN, Model, UtcDatetime

MAX_MESSAGE_BYTES = 8 * 1024
MAX_DELAY_SECONDS = 7 * 86400 - 1  # Azure Queues refuse a visibility delay of 7 days or more


class DispatchMessage(Model):
    """One fire (``fire``), one start of a step's attempt (``retry`` with ``step``; without ``step``
    the start of a queued run: buffered, manual, coalesced) or one status check of a step (``poll``:
    an agent run, or an approval's decision or timeout). Inputs stay in Table Storage; the message
    only names the fire and the step."""

    v: Literal[1] = 1
    kind: Literal["fire", "retry", "poll"]
    routine_id: str = Field(max_length=64)
    scheduled_for: UtcDatetime
    dispatch_at: UtcDatetime | None = None  # a fire with jitter starts then, not at scheduled_for
    routine_version: int = Field(ge=1)
    attempt: int = Field(default=1, ge=1)
    run_id: str = Field(max_length=64)
    step: str | None = Field(default=None, pattern=STEP_ID_PATTERN)  # absent: the run as a whole
    traceparent: str | None = Field(default=None, max_length=128)

    def encode(self) -> str:
        text = self.model_dump_json()
        if len(text.encode()) > MAX_MESSAGE_BYTES:  # pragma: no cover - fields are bounded above
            raise ValueError("dispatch message over 8 KiB")
        return text

    @classmethod
    def decode(cls, body: bytes | str) -> DispatchMessage:
        """Raises ``ValueError`` (pydantic's ``ValidationError`` is one) for anything unreadable."""
        return cls.model_validate_json(body)


class DispatchQueue(Protocol):
    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        """Enqueue ``message``, invisible for ``delay_seconds`` (rounded down to whole seconds: the
        dispatcher waits out a sub-second early arrival). Raises ``StorageUnavailable``."""
        ...


class MemoryQueue:
    """An in-process queue for unit tests.

    Built with a ``clock``, it keeps each message invisible for its delay rounded down to whole
    seconds, as ``AzureQueue`` does: ``due(now)`` hands out the messages visible at ``now`` and
    ``next_visible_at()`` says when the next one surfaces. Without a clock, delays are only recorded.
    ``sent`` keeps every ``(delay, message)`` ever sent; ``take_all`` empties the queue.
    """

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._lock = threading.Lock()
        self.sent: list[tuple[float, DispatchMessage]] = []
        self._pending: list[tuple[datetime | None, int, float, DispatchMessage]] = []
        self._clock = clock

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        visible_at = None
        if self._clock is not None:
            visible_at = self._clock() + timedelta(seconds=whole_seconds(delay_seconds))
        with self._lock:
            self.sent.append((delay_seconds, message))
            self._pending.append((visible_at, len(self.sent), delay_seconds, message))

    def take_all(self) -> list[tuple[float, DispatchMessage]]:
        """Every pending message with its delay, in send order; empties the queue."""
        with self._lock:
            taken = [(d, m) for _, _, d, m in sorted(self._pending, key=lambda p: p[1])]
            self._pending.clear()
            return taken

    def due(self, now: datetime) -> list[DispatchMessage]:
        """Remove and return the messages visible at ``now``, earliest visible first."""
        with self._lock:
            ready = [p for p in self._pending if p[0] is None or p[0] <= now]
            self._pending = [p for p in self._pending if not (p[0] is None or p[0] <= now)]
        ready.sort(key=lambda p: (p[0] or now, p[1]))
        return [m for _, _, _, m in ready]

    def next_visible_at(self) -> datetime | None:
        """When the earliest pending message becomes visible (``None``: empty, or no clock)."""
        with self._lock:
            return min((p[0] for p in self._pending if p[0] is not None), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def whole_seconds(delay: float) -> int:
    """A visibility delay as the queue takes it: whole seconds, within 0 and ``MAX_DELAY_SECONDS``."""
    if not math.isfinite(delay):
        return 0 if delay < 0 else MAX_DELAY_SECONDS
    return int(min(MAX_DELAY_SECONDS, max(0, math.floor(delay))))


def delay_until(when: datetime, now: datetime) -> float:
    return max(0.0, (when - now).total_seconds())


def message_json(message: DispatchMessage) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(message.encode())
    return loaded
