"""The minute tick and the look-ahead: which fires to enqueue now, and when.

``plan_fires`` and ``plan_immediately`` are pure (trigger, next fire, catch-up window, ``now``,
horizon -> what to do). ``tick`` does the I/O in the order that loses nothing: one etag-conditional
transaction advances the due entry and writes a watch for each fire (the outbox), and only then are
the fires enqueued. A crash after the write leaves watches whose fires the repair pass sends again;
a fire is never queued before the write that makes it valid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from pydantic import TypeAdapter

from routines import schedule, telemetry
from routines.decide import FIRST_CHECK
from routines.errors import Conflict, RoutinesError
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    Routine,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    ScheduleTrigger,
    TimerTrigger,
    Trigger,
    WebhookTrigger,
    idempotency_key,
    scheduled_run_id,
    utc_text,
)
from routines.store import Advance, DueEntry, Store, Watch

log = logging.getLogger(__name__)

LOOKAHEAD_MARGIN = timedelta(seconds=10)
EARLY_SURFACE_SECONDS = 1.0
TICK_LEASE = timedelta(seconds=50)
MAX_FIRES_PER_PLAN = 90  # with its 3 due-index rows, one plan's watches fit one 100-row transaction
SEND_THREADS = 16
_ONE_SECOND = timedelta(seconds=1)
_TICK = timedelta(microseconds=1)
_TRIGGER = TypeAdapter(Trigger)
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def fire_delay(fire: datetime, now: datetime) -> float:
    """The queue visibility delay of a fire: it surfaces a little ahead of its time, so a worker
    polling at ``maxPollingInterval`` has it in hand when the time comes; the dispatcher waits out
    the rest before calling the agent (``decide.MAX_EARLY_WAIT``)."""
    return max(0.0, (fire - now).total_seconds() - EARLY_SURFACE_SECONDS)


def horizon(now: datetime) -> datetime:
    """Fires before this instant are enqueued now: up to the next minute tick, plus a margin so a
    tick that starts a little late still finds every fire enqueued ahead of time."""
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1) + LOOKAHEAD_MARGIN


@dataclass(frozen=True)
class FirePlan:
    fires: list[datetime]  # to enqueue now, each delayed until its time
    next_fire_at: datetime | None  # where the due entry moves to
    completed: bool = False  # nothing left to fire (a missed timer, past end_at, max_fires reached)
    missed: tuple[int, datetime, datetime] | None = None  # (count, first missed fire, window start)
    coalesced: int = 0  # past fires folded into the run of ``fires[0]`` (catch-up, a late tick)

    @property
    def counted(self) -> int:
        """The fires this plan adds to the routine's ``fire_count``: one per run it makes (a missed
        record and a coalesced run count once, like the run that stands for them)."""
        return len(self.fires) + (1 if self.missed else 0)


@dataclass(frozen=True)
class Bounds:
    """Where a schedule stops (README "Flow control"): after ``end_at``, or once ``remaining`` more
    fires were planned (``None``: no limit)."""

    end_at: datetime | None = None
    remaining: int | None = None

    @classmethod
    def of(cls, end_at: datetime | None, max_fires: int | None, fire_count: int) -> Bounds:
        return cls(end_at, None if max_fires is None else max(0, max_fires - fire_count))


NO_BOUNDS: Final = Bounds()


def plan_fires(
    trigger: ScheduleTrigger | TimerTrigger | WebhookTrigger,
    fire_at: datetime,
    catchup_window_seconds: int,
    now: datetime,
    until: datetime,
    bounds: Bounds = NO_BOUNDS,
) -> FirePlan:
    """Plan the fires from ``fire_at`` (the routine's next fire) up to ``until``, within ``bounds``.

    Fires older than the catch-up window become one ``missed`` record; past fires inside the window
    are coalesced into one run of the latest; future fires before ``until`` are all enqueued. A
    webhook trigger has no fires in time. The plan is ``completed`` when ``bounds`` leave no fire
    after it.
    """
    if isinstance(trigger, WebhookTrigger):
        return FirePlan([], None)
    window_start = now - timedelta(seconds=catchup_window_seconds)
    if isinstance(trigger, TimerTrigger):
        if fire_at < window_start:
            return FirePlan([], None, completed=True, missed=(1, fire_at, window_start))
        return FirePlan([fire_at] if fire_at < until else [], None if fire_at < until else fire_at)

    if bounds.remaining == 0:
        return FirePlan([], None, completed=True)
    cron = schedule.parse_cron(trigger.cron_expression, trigger.time_zone)
    end = bounds.end_at
    last = now if end is None else min(now, end)  # the latest past fire that may still run
    missed = None
    cursor = fire_at
    if cursor < window_start:
        counted_until = window_start if end is None else min(window_start, end + _TICK)
        count = cron.count_fires(cursor - _ONE_SECOND, counted_until - _TICK, cap=1_000_000)
        missed = (count, cursor, window_start)
        cursor = cron.next_after(window_start - _TICK)
    fires: list[datetime] = []
    coalesced = 0
    if cursor <= last:
        latest = _latest_fire_at_or_before(cron, cursor, last)
        if latest > cursor:
            coalesced = cron.count_fires(cursor - _ONE_SECOND, latest - _TICK, cap=1_000_000)
        fires.append(latest)
        cursor = cron.next_after(latest)
    if end is not None:
        until = min(until, end + _TICK)
    while cursor < until and len(fires) < MAX_FIRES_PER_PLAN:
        fires.append(cursor)
        cursor = cron.next_after(cursor)
    remaining = bounds.remaining
    if remaining is not None:
        room = max(0, remaining - (1 if missed else 0))
        if room < len(fires):  # max_fires reached within this plan
            return FirePlan(fires[:room], None, True, missed, coalesced if room else 0)
        if room == len(fires):
            return FirePlan(fires, None, True, missed, coalesced)
    if end is not None and cursor > end:
        return FirePlan(fires, None, True, missed, coalesced)
    return FirePlan(fires, cursor, missed=missed, coalesced=coalesced)


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
    routine_id: str,
    scheduled_for: datetime,
    version: int,
    trigger_type: str,
    routine_name: str | None = None,
    jitter_seconds: int = 0,
) -> DispatchMessage:
    run_id = scheduled_run_id(routine_id, scheduled_for)
    offset = schedule.jitter_offset(routine_id, scheduled_for, jitter_seconds)
    # A span per fire: the message carries its traceparent, so the run's spans hang under this fire.
    with telemetry.fire_span(routine_id, run_id, scheduled_for, routine_name):
        return DispatchMessage(
            kind="fire",
            routine_id=routine_id,
            scheduled_for=scheduled_for,
            dispatch_at=scheduled_for + offset if offset else None,
            routine_version=version,
            attempt=1,
            run_id=run_id,
            traceparent=telemetry.current_traceparent(),
        )


def fire_send(
    routine_id: str, fire: datetime, version: int, kind: str, name: str, jitter_seconds: int, now: datetime
) -> tuple[DispatchMessage, float]:
    """A fire's message and its queue delay: it surfaces just before it is to start."""
    message = fire_message(routine_id, fire, version, kind, name, jitter_seconds)
    return message, fire_delay(message.dispatch_at or fire, now)


def watch_for(message: DispatchMessage, trigger: str) -> Watch:
    """The repair pass's watch of a fire about to be enqueued (``message``)."""
    return Watch(
        routine_id=message.routine_id,
        run_id=message.run_id,
        scheduled_for=message.scheduled_for,
        trigger=trigger,
        version=message.routine_version,
        check_at=(message.dispatch_at or message.scheduled_for) + FIRST_CHECK,
        dispatch_at=message.dispatch_at,
    )


def coalesced_run(routine_id: str, fire: datetime, coalesced: int, kind: str, version: int) -> Run:
    """The run of a fire that stands for ``coalesced`` more (catch-up, or a tick that came late),
    recorded before its message so the count is on the run that runs (docs/guarantees.md #1)."""
    return Run(
        id=scheduled_run_id(routine_id, fire),
        routine_id=routine_id,
        trigger=RunTrigger(kind),
        scheduled_for=fire,
        status=RunStatus.queued,
        idempotency_key=idempotency_key(routine_id, fire),
        coalesced_fires=coalesced,
        progress=RunProgress(routine_version=version),
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
        planned = _schedule_entries(store, entries, now, report)
        results = store.advance([advance for advance, _ in planned])
        # Only what was written is sent: an advance that lost its race was moved by someone else,
        # who enqueues those fires.
        sends = [
            send
            for (_, messages), applied in zip(planned, results, strict=True)
            if applied
            for send in messages
        ]
        send_all(queue, sends)
        report.fires = [message for message, _ in sends]
        report.enqueued = len(sends)
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
    store: Store, entries: Iterable[DueEntry], now: datetime, report: TickReport
) -> list[tuple[Advance, list[tuple[DispatchMessage, float]]]]:
    """Each entry's advance (with the watches of its fires) and the messages to send once it is
    written. Missed and coalesced runs are recorded first: a replayed tick finds them."""
    until = horizon(now)
    planned: list[tuple[Advance, list[tuple[DispatchMessage, float]]]] = []
    for entry in entries:
        bounds = Bounds.of(entry.end_at, entry.max_fires, entry.fire_count)
        try:
            trigger = _TRIGGER.validate_python(entry.trigger)
            plan = plan_fires(trigger, entry.fire_at, entry.catchup_window_seconds, now, until, bounds)
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
        if plan.coalesced:
            fire = plan.fires[0]
            log.info(
                "routine %s: %d past fires coalesced into the run of %s",
                entry.routine_id,
                plan.coalesced,
                fire,
            )
            with contextlib.suppress(Conflict):  # recorded by an earlier tick that did not advance
                store.insert_run(
                    coalesced_run(
                        entry.routine_id, fire, plan.coalesced, trigger.type, entry.schedule_version
                    )
                )
        messages = [
            fire_send(
                entry.routine_id,
                fire,
                entry.schedule_version,
                trigger.type,
                entry.name,
                entry.jitter_seconds,
                now,
            )
            for fire in plan.fires
        ]
        watches = tuple(watch_for(message, trigger.type) for message, _ in messages)
        last = plan.fires[-1] if plan.fires else None
        advance = Advance(entry, plan.next_fire_at, plan.completed, watches, plan.counted, last)
        planned.append((advance, messages))
    return planned


@dataclass(frozen=True)
class Immediate:
    """``plan_immediately``'s answer: the routine to write, the watches to write with it, and the
    messages to send once that write has landed."""

    routine: Routine
    watches: tuple[Watch, ...] = ()
    sends: tuple[tuple[DispatchMessage, float], ...] = ()


def plan_immediately(routine: Routine, now: datetime) -> Immediate:
    """For a routine just created, rescheduled or enabled: its next fire from ``now`` (or from
    ``start_at``) and, if that is nearer than the next tick's horizon, it (and any others before the
    horizon) to enqueue at once, right after the routine write. In the last ``LOOKAHEAD_MARGIN`` of a
    minute the horizon is the following tick's. The routine comes back with ``next_fire_at`` and
    ``due_at`` past those fires, its ``fire_count`` counting them, and ``completed`` when its bounds
    (``end_at``, ``max_fires``) leave nothing more to fire."""
    after = now if routine.start_at is None else max(now, routine.start_at)
    first = schedule.next_fire_after(routine.trigger, after - _TICK)
    bounds = Bounds.of(routine.end_at, routine.max_fires, routine.fire_count)
    if first is None:
        return Immediate(routine.model_copy(update={"next_fire_at": None, "due_at": None}))
    # The due entry is written after this returns, so a tick starting meanwhile does not see it. Near
    # a minute's end, cover the next minute's tick too: else its fires are found late by the tick after
    # and coalesced away.
    until = horizon(now + LOOKAHEAD_MARGIN)
    plan = plan_fires(routine.trigger, first, routine.catchup_window_seconds, now, until, bounds)
    kind = routine.trigger.type
    sends = tuple(
        fire_send(routine.id, fire, routine.schedule_version, kind, routine.name, routine.jitter_seconds, now)
        for fire in plan.fires
    )
    shown = plan.next_fire_at
    if shown is None and isinstance(routine.trigger, TimerTrigger) and not plan.completed:
        shown = routine.trigger.at  # enqueued but not yet fired: still shown as the next fire
    update: dict[str, object] = {
        "next_fire_at": shown,
        "due_at": plan.next_fire_at,
        "fire_count": routine.fire_count + plan.counted,
        "planned_until": plan.fires[-1] if plan.fires else routine.planned_until,
    }
    if plan.completed and not isinstance(routine.trigger, TimerTrigger):
        update["state"] = RoutineState.completed  # its last fires are queued (or it has none left)
    planned = routine.model_copy(update=update)
    return Immediate(planned, tuple(watch_for(m, kind) for m, _ in sends), sends)


def send_immediate(queue: DispatchQueue, immediate: Immediate) -> None:
    """Enqueue what ``plan_immediately`` planned, after its routine write landed. A failed send is
    not an error of the write: the watches make the repair pass send those fires (late, not lost)."""
    try:
        send_all(queue, immediate.sends)
    except RoutinesError as exc:
        log.warning(
            "routine %s: near fires not enqueued (%s); the repair pass sends them", immediate.routine.id, exc
        )
        return
    telemetry.record_fires(len(immediate.sends), "api")
