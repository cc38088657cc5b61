"""The minute tick and the look-ahead: which fires to enqueue now, and when.

``plan_fires`` is pure (trigger, next fire, catch-up window, ``now``, horizon -> what to do). ``tick``
and ``schedule_immediately`` do the I/O: enqueue first, then advance the due entry with an
etag-conditional write, so a crash between the two re-enqueues (the dispatcher dedups by run id)
and never skips a fire.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import TypeAdapter

from routines import schedule, telemetry
from routines.errors import Conflict
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    Routine,
    Run,
    RunStatus,
    RunTrigger,
    ScheduleTrigger,
    TimerTrigger,
    Trigger,
    idempotency_key,
    scheduled_run_id,
    utc_text,
)
from routines.store import Advance, DueEntry, Store

log = logging.getLogger(__name__)

LOOKAHEAD_MARGIN = timedelta(seconds=10)
EARLY_SURFACE_SECONDS = 1.0
TICK_LEASE = timedelta(seconds=50)
MAX_FIRES_PER_PLAN = 200
SEND_THREADS = 16
_ONE_SECOND = timedelta(seconds=1)
_TRIGGER = TypeAdapter(Trigger)
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def fire_delay(fire: datetime, now: datetime) -> float:
    """The queue visibility delay of a fire: it surfaces a little ahead of its time, so a worker
    polling at ``maxPollingInterval`` has it in hand when the time comes; the dispatcher waits out
    the rest before calling the agent (``dispatcher.MAX_EARLY_WAIT``)."""
    return max(0.0, (fire - now).total_seconds() - EARLY_SURFACE_SECONDS)


def horizon(now: datetime) -> datetime:
    """Fires before this instant are enqueued now: up to the next minute tick, plus a margin so a
    tick that starts a little late still finds every fire enqueued ahead of time."""
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1) + LOOKAHEAD_MARGIN


@dataclass(frozen=True)
class FirePlan:
    fires: list[datetime]  # to enqueue now, each delayed until its time
    next_fire_at: datetime | None  # where the due entry moves to
    completed: bool = False  # a timer routine whose fire was missed: done without running
    missed: tuple[int, datetime, datetime] | None = None  # (count, first missed fire, window start)


def plan_fires(
    trigger: ScheduleTrigger | TimerTrigger,
    fire_at: datetime,
    catchup_window_seconds: int,
    now: datetime,
    until: datetime,
) -> FirePlan:
    """Plan the fires from ``fire_at`` (the routine's next fire) up to ``until``.

    Fires older than the catch-up window become one ``missed`` record; past fires inside the window
    are coalesced into one run of the latest; future fires before ``until`` are all enqueued.
    """
    window_start = now - timedelta(seconds=catchup_window_seconds)
    if isinstance(trigger, TimerTrigger):
        if fire_at < window_start:
            return FirePlan([], None, completed=True, missed=(1, fire_at, window_start))
        return FirePlan([fire_at] if fire_at < until else [], None if fire_at < until else fire_at)

    cron = schedule.parse_cron(trigger.cron_expression, trigger.time_zone)
    missed = None
    cursor = fire_at
    if cursor < window_start:
        count = cron.count_fires(
            cursor - _ONE_SECOND, window_start - timedelta(microseconds=1), cap=1_000_000
        )
        missed = (count, cursor, window_start)
        cursor = cron.next_after(window_start - timedelta(microseconds=1))
    fires: list[datetime] = []
    if cursor <= now:
        fires.append(_latest_fire_at_or_before(cron, cursor, now))
        cursor = cron.next_after(fires[-1])
    while cursor < until and len(fires) < MAX_FIRES_PER_PLAN:
        fires.append(cursor)
        cursor = cron.next_after(cursor)
    return FirePlan(fires, cursor, missed=missed)


def _latest_fire_at_or_before(cron: schedule.CronSchedule, first: datetime, now: datetime) -> datetime:
    """The last fire in ``[first, now]`` (``first`` is one), found by widening a window back from
    ``now`` so long outages cost a few steps, not one per fire."""
    span = _ONE_SECOND
    while True:
        start = max(first - _ONE_SECOND, now - span)
        candidate = cron.next_after(start)
        if candidate <= now:
            while (following := cron.next_after(candidate)) <= now:
                candidate = following
            return candidate
        if start < first:
            return first
        span *= 2


def fire_message(
    routine_id: str, scheduled_for: datetime, version: int, trigger_type: str, routine_name: str | None = None
) -> DispatchMessage:
    run_id = scheduled_run_id(routine_id, scheduled_for)
    # A span per fire: the message carries its traceparent, so the run's spans hang under this fire.
    with telemetry.fire_span(routine_id, run_id, scheduled_for, routine_name):
        return DispatchMessage(
            kind="fire",
            routine_id=routine_id,
            scheduled_for=scheduled_for,
            routine_version=version,
            attempt=1,
            run_id=run_id,
            traceparent=telemetry.current_traceparent(),
        )


def send_all(queue: DispatchQueue, items: Sequence[tuple[DispatchMessage, float]]) -> None:
    """Enqueue many messages concurrently (a queue send is one round trip each)."""
    if len(items) <= 1:
        for message, delay in items:
            queue.send(message, delay)
        return
    with ThreadPoolExecutor(max_workers=min(SEND_THREADS, len(items))) as pool:
        # In the caller's trace context, so spans of the sends (Azure SDK) join the tick's trace.
        list(pool.map(telemetry.in_current_context(lambda item: queue.send(*item)), items))


def _missed_run(routine_id: str, missed: tuple[int, datetime, datetime], kind: str) -> Run:
    count, first, window_start = missed
    noun = "fire" if count == 1 else "fires"
    return Run(
        id=scheduled_run_id(routine_id, first),
        routine_id=routine_id,
        trigger=RunTrigger(kind),
        scheduled_for=first,
        status=RunStatus.missed,
        idempotency_key=idempotency_key(routine_id, first),
        error_message=(
            f"missed {count}{'+' if count >= 1_000_000 else ''} {noun} between {utc_text(first)} and "
            f"{utc_text(window_start)}: older than the catch-up window"
        ),
    )


@dataclass
class TickReport:
    due: int = 0
    enqueued: int = 0
    missed_records: int = 0
    advanced: int = 0
    lost_races: int = 0
    skipped: bool = False
    fires: list[DispatchMessage] = field(default_factory=list)


def tick(store: Store, queue: DispatchQueue, now: datetime, owner: str = OWNER) -> TickReport:
    """Schedule every fire due before the horizon. Safe to run concurrently: a lease lets one tick
    work at a time, and every advance is conditional anyway."""
    report = TickReport()
    with telemetry.tick_span() as span:
        if not store.try_lease("tick", owner, now, now + TICK_LEASE):
            report.skipped = True
            span.set_attribute("tick.skipped", True)
            return report
        entries = store.due_entries(horizon(now))
        report.due = len(entries)
        advances = _schedule_entries(store, queue, entries, now, report)
        results = store.advance(advances)
        report.advanced = sum(results)
        report.lost_races = len(results) - report.advanced
        span.set_attribute("tick.due", report.due)
        span.set_attribute("tick.enqueued", report.enqueued)
    telemetry.record_tick(report.enqueued)
    log.info(
        "tick: %d due, %d fires enqueued, %d missed records, %d lost races",
        report.due,
        report.enqueued,
        report.missed_records,
        report.lost_races,
    )
    return report


def _schedule_entries(
    store: Store, queue: DispatchQueue, entries: Iterable[DueEntry], now: datetime, report: TickReport
) -> list[Advance]:
    until = horizon(now)
    sends: list[tuple[DispatchMessage, float]] = []
    advances: list[Advance] = []
    for entry in entries:
        try:
            trigger = _TRIGGER.validate_python(entry.trigger)
            plan = plan_fires(trigger, entry.fire_at, entry.catchup_window_seconds, now, until)
        except ValueError:  # ScheduleError, or pydantic's ValidationError: one bad row must not stop the tick
            log.exception("routine %s: its schedule no longer parses; leaving it", entry.routine_id)
            continue
        if plan.missed:
            try:
                store.insert_run(_missed_run(entry.routine_id, plan.missed, trigger.type))
                report.missed_records += 1
                telemetry.record_run_finished("missed", trigger.type)
            except Conflict:
                pass  # recorded by an earlier tick that did not get to advance
        for fire in plan.fires:
            message = fire_message(entry.routine_id, fire, entry.schedule_version, trigger.type, entry.name)
            sends.append((message, fire_delay(fire, now)))
            report.fires.append(message)
        advances.append(Advance(entry, plan.next_fire_at, plan.completed))
    send_all(queue, sends)
    report.enqueued = len(sends)
    return advances


def schedule_immediately(routine: Routine, queue: DispatchQueue, now: datetime) -> Routine:
    """For a routine just created, rescheduled or enabled: compute its next fire from ``now`` and, if
    that is nearer than the next tick's horizon, enqueue it (and any others before the horizon) at
    once. In the last ``LOOKAHEAD_MARGIN`` of a minute the horizon is the following tick's. Returns
    the routine with ``next_fire_at`` set to what the due entry should hold."""
    first = schedule.next_fire_after(routine.trigger, now - timedelta(microseconds=1))
    if first is None:
        return routine.model_copy(update={"next_fire_at": None, "due_at": None})
    # The due entry is written after this returns, so a tick starting meanwhile does not see it. Near
    # a minute's end, cover the next minute's tick too: else its fires are found late by the tick after
    # and coalesced away.
    until = horizon(now + LOOKAHEAD_MARGIN)
    if first >= until:
        return routine.model_copy(update={"next_fire_at": first, "due_at": first})
    plan = plan_fires(routine.trigger, first, routine.catchup_window_seconds, now, until)
    send_all(
        queue,
        [
            (
                fire_message(routine.id, fire, routine.schedule_version, routine.trigger.type, routine.name),
                fire_delay(fire, now),
            )
            for fire in plan.fires
        ],
    )
    telemetry.record_fires(len(plan.fires), "api")
    shown = plan.next_fire_at
    if shown is None and isinstance(routine.trigger, TimerTrigger) and not plan.completed:
        shown = routine.trigger.at  # enqueued but not yet fired: still shown as the next fire
    return routine.model_copy(update={"next_fire_at": shown, "due_at": plan.next_fire_at})
