"""Test helpers shared by several test modules."""

from __future__ import annotations

from datetime import datetime, timedelta


class Clock:
    """A fake clock: call it for ``now``; ``sleep`` moves it on (pass both to the code under test)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
