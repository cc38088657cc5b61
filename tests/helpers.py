"""Test helpers shared by several test modules: a fake clock, a storage request counter, a routine
builder, polling for a condition and one HTTP call with a JSON answer."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from routines.models import Routine, RoutineState, new_routine_id

T = TypeVar("T")

T0 = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)  # make_routine's creation time unless told otherwise


class Clock:
    """A fake clock: call it for ``now``; ``sleep`` and ``advance`` move it on (pass ``clock`` and
    ``clock.sleep`` to the code under test). Safe to read and move from several threads."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)

    def advance(self, **delta: float) -> None:
        """Move on by ``timedelta(**delta)``: ``advance(minutes=5)``."""
        with self._lock:
            self.now += timedelta(**delta)


class RequestCounter:
    """``raw_request_hook``: counts the storage HTTP requests of the clients it is given to, and keeps
    ``"METHOD url-without-query"`` lines of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.lines: list[str] = []

    def __call__(self, request: Any) -> None:
        with self._lock:
            self.count += 1
            self.lines.append(f"{request.http_request.method} {request.http_request.url.split('?')[0]}")

    def reset(self) -> int:
        """Start again from zero; returns the count so far."""
        with self._lock:
            count, self.count, self.lines = self.count, 0, []
            return count


def make_routine(
    name: str = "daily-scan", *, fire: datetime | None = None, now: datetime = T0, **fields: Any
) -> Routine:
    """A valid enabled routine: a fresh id, schedule ``0 6 * * *`` in UTC, one invocation, version 1,
    created and updated at ``now``; ``fire`` sets both ``next_fire_at`` and ``due_at``. ``fields``
    replace any of these (models or their JSON form)."""
    data: dict[str, Any] = {
        "id": new_routine_id(),
        "name": name,
        "trigger": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "UTC"},
        "actions": [{"type": "invocation", "agent_id": "asst_abc123", "input": "scan the logs"}],
        "state": RoutineState.enabled,
        "next_fire_at": fire,
        "due_at": fire,
        "created_at": now,
        "updated_at": now,
        "version": 1,
    }
    return Routine.model_validate({**data, **fields})


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 60.0,
    what: str = "the condition",
    details: Callable[[], str] = str,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail naming ``what``
    (and ``details()``) after ``timeout`` s, a generous deadline rather than a timing claim."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{details()}")
        time.sleep(0.05)


def request_json(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    *,
    data: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: ``body`` sent as JSON (or ``data`` as it is) with exactly ``headers``.
    Returns the status, the response headers and the JSON answer (None when empty), for error
    statuses too."""
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, dict(exc.headers), json.loads(raw) if raw else None
