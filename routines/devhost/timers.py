"""Timer triggers: NCRONTAB (read by ``routines.schedule``) or TimeSpan schedules, in UTC, one thread per
function."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from azure.functions.timer import TimerRequest

from routines.devhost.functions import FunctionSpec
from routines.devhost.settings import DevHostError, parse_timespan
from routines.schedule import CronSchedule, ScheduleError, parse_cron

log = logging.getLogger("routines.devhost")

PAST_DUE_AFTER = timedelta(seconds=1)


class Schedule:
    """A timer trigger schedule: NCRONTAB (6 fields, seconds first; or 5 fields) or a TimeSpan, in UTC.

    NCRONTAB is read by ``routines.schedule``, the cron engine of the routines themselves (fields,
    ranges, steps, lists, month and weekday names). One difference from the Functions host: when both
    day fields are restricted, a day matching either fires (cron's rule); NCRONTAB needs both.
    """

    def __init__(self, expression: str, where: str) -> None:
        self.expression = expression.strip()
        fields = self.expression.split()
        self.interval: timedelta | None = None
        self.seconds_first = len(fields) == 6
        self._cron: CronSchedule | None = None
        if len(fields) == 1 and ":" in self.expression:
            self.interval = timedelta(seconds=parse_timespan(self.expression, where))
            if self.interval <= timedelta(0):
                raise DevHostError(f"{where}: interval {expression!r} must be positive")
            return
        invalid = f"{where}: {expression!r} is not a valid NCRONTAB expression"
        if len(fields) not in (5, 6):  # macros such as @daily too: the Functions host has none
            raise DevHostError(invalid)
        try:
            self._cron = parse_cron(self.expression)
        except ScheduleError as exc:
            raise DevHostError(invalid) from exc

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (an aware datetime), in UTC."""
        if self._cron is None:
            assert self.interval is not None
            return moment + self.interval
        return self._cron.next_after(moment)


class TimerRunner:
    """Runs one timer function on its schedule in its own thread; one invocation at a time."""

    def __init__(
        self, spec: FunctionSpec, schedule: Schedule, run_on_startup: bool, stop: threading.Event
    ) -> None:
        self.spec = spec
        self.schedule = schedule
        self.run_on_startup = run_on_startup
        self._stop = stop
        self.thread = threading.Thread(target=self._run, name=f"timer-{spec.name}", daemon=True)
        self._last: datetime | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        if self.run_on_startup:
            self._invoke(past_due=False, next_due=self.schedule.next_after(_utcnow()))
        due = self.schedule.next_after(_utcnow())
        while not self._stop.is_set():
            remaining = (due - _utcnow()).total_seconds()
            if remaining > 0:
                # Wake at least once a minute: the wall clock may jump (suspend, NTP).
                self._stop.wait(min(remaining, 60.0))
                continue
            now = _utcnow()
            next_due = self.schedule.next_after(max(now, due))
            self._invoke(past_due=now - due > PAST_DUE_AFTER, next_due=next_due)
            # Occurrences that passed while the function ran are skipped, as the Functions host does.
            due = self.schedule.next_after(max(_utcnow(), due))

    def _invoke(self, past_due: bool, next_due: datetime) -> None:
        now = _utcnow()
        status = {"Last": _iso(self._last), "Next": _iso(next_due), "LastUpdated": _iso(now)}
        try:
            self.spec.invoke(TimerRequest(past_due=past_due, schedule_status=status))
        except Exception:
            log.exception("timer function %s failed; its schedule continues", self.spec.name)
        self._last = now


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
