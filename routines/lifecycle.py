"""Routine lifecycle transitions as pure functions: (routine, ..., now) -> the routine to write, or
``None`` for "nothing to change". The API, the tick and the dispatcher all change a routine's state
through these, so a rule (what enable resets, when a timer completes) lives in one place; ``apply``
performs one against the store (read, change, write on the etag).

Every transition that moves the schedule bumps ``schedule_version``: a fire queued at an older
version is stale and does not run (docs/guarantees.md #4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import pydantic

from routines import telemetry
from routines.errors import Conflict, NotFound, PreconditionFailed
from routines.models import ResponseAction, Routine, RoutineState, RunStatus, ScheduleTrigger, TimerTrigger
from routines.schedule import next_fire_after, parse_cron

if TYPE_CHECKING:
    from routines.store import Store

log = logging.getLogger(__name__)


def _bumped(routine: Routine, now: datetime, *, schedule: bool, **changes: object) -> Routine:
    version = routine.version + 1
    update: dict[str, object] = {"version": version, "updated_at": now, **changes}
    if schedule:
        update["schedule_version"] = version
    return routine.model_copy(update=update)


def disable(
    routine: Routine, now: datetime, reason: Literal["manual", "failures"] = "manual"
) -> Routine | None:
    """Stop the routine; its fires queued ahead will be dropped as stale (and leave ``fire_count``).
    A completed routine may still have its last fires queued: disabling it drops them too."""
    if routine.state is RoutineState.disabled:
        return None
    return _bumped(
        routine,
        now,
        schedule=True,
        state=RoutineState.disabled,
        next_fire_at=None,
        due_at=None,
        disabled_reason=reason,
        fire_count=routine.fire_count - queued_ahead(routine, now),
    )


def queued_ahead(routine: Routine, now: datetime) -> int:
    """How many of the fires counted in ``fire_count`` are queued but not yet due at ``now`` (planned
    up to ``planned_until``): a change of schedule (a reschedule, a disable) drops them as stale, so
    they do not count."""
    last, trigger = routine.planned_until, routine.trigger
    if routine.state is RoutineState.disabled or last is None or last <= now:
        return 0
    if isinstance(trigger, TimerTrigger):
        return 1
    if not isinstance(trigger, ScheduleTrigger):
        return 0
    cron = parse_cron(trigger.cron_expression, trigger.time_zone)
    return min(cron.count_fires(now, last, cap=1000), routine.fire_count)


def enable(routine: Routine, now: datetime) -> Routine | None:
    """The routine enabled from ``now`` (fires missed while disabled are not run); the caller plans
    its near fires (``scheduler.plan_immediately``). Raises ``Conflict`` for a completed timer or a
    timer whose time has passed."""
    if routine.state is RoutineState.enabled:
        return None
    if routine.state is RoutineState.completed and isinstance(routine.trigger, TimerTrigger):
        raise Conflict(
            "this timer routine has fired and is completed; PATCH trigger.at to a future time to "
            "schedule it again"
        )
    if routine.state is RoutineState.completed:
        raise Conflict(
            "this routine is completed: it reached its end_at or its max_fires; PATCH end_at or "
            "max_fires to schedule it again"
        )
    if isinstance(routine.trigger, TimerTrigger) and next_fire_after(routine.trigger, now) is None:
        raise Conflict("the timer's time has passed; PATCH trigger.at to a future time")
    return _bumped(
        routine,
        now,
        schedule=True,
        state=RoutineState.enabled,
        disabled_reason=None,
        failures=[],
        failures_since=now,
    )


def reschedule(routine: Routine, now: datetime, previous: Routine) -> Routine:
    """After an edit of the schedule (its trigger or its flow-control bounds): a new schedule version;
    a completed routine is enabled again (planning it completes it again if its bounds leave no fire),
    a disabled routine stays disabled. The fires ``previous`` had queued ahead are dropped as stale,
    so they leave ``fire_count``."""
    state = RoutineState.disabled if routine.state is RoutineState.disabled else RoutineState.enabled
    count = routine.fire_count - queued_ahead(previous, now)
    update = {"schedule_version": routine.version, "state": state, "fire_count": count}
    return routine.model_copy(update=update)


def complete_timer(routine: Routine, fired: datetime, now: datetime) -> Routine | None:
    """A timer routine after its fire ``fired`` ran. Conditional on the ``at`` it completed: a PATCH
    of ``at`` that landed since keeps the routine enabled for its new time."""
    trigger = routine.trigger
    if routine.state is not RoutineState.enabled or not isinstance(trigger, TimerTrigger):
        return None
    if trigger.at.replace(microsecond=0) != fired:
        return None
    return _bumped(routine, now, schedule=False, state=RoutineState.completed, next_fire_at=None, due_at=None)


def count_outcome(
    routine: Routine, run_id: str, status: RunStatus, ended_at: datetime, now: datetime
) -> Routine | None:
    """``pause_after_failures``: a run of ``routine`` ended ``status`` at ``ended_at``. A failure joins
    the streak (by run id: counting it again changes nothing) and the routine is disabled with
    ``disabled_reason: "failures"`` when the streak reaches the limit; a success restarts the streak.
    Runs that ended before the streak last restarted (an enable, a later success) do not count."""
    limit = routine.pause_after_failures
    since = routine.failures_since
    if limit == 0 or (since is not None and ended_at < since):
        return None
    if status is RunStatus.succeeded:
        if not routine.failures:
            return None
        return _bumped(routine, now, schedule=False, failures=[], failures_since=ended_at)
    if status is not RunStatus.failed or run_id in routine.failures:
        return None
    failures = [*routine.failures, run_id][-limit:]
    if len(failures) >= limit and routine.state is RoutineState.enabled:
        paused = disable(routine, now, "failures")
        assert paused is not None
        return paused.model_copy(update={"failures": failures})
    return _bumped(routine, now, schedule=False, failures=failures)


def record_thread(routine: Routine, index: int, old: str | None, new: str, now: datetime) -> Routine | None:
    """Continue a response action on thread ``new`` (a rotation, or the agent's first thread). The
    user's own edit since (another thread, another action) wins. The result is validated like any
    write, so an agent-supplied id can never make the routine unreadable."""
    action = routine.actions[index] if index < len(routine.actions) else None
    if not isinstance(action, ResponseAction) or action.thread_id != old or old == new:
        return None
    try:
        changed = ResponseAction.model_validate({**action.model_dump(), "thread_id": new})
    except pydantic.ValidationError:
        return None
    actions = list(routine.actions)
    actions[index] = changed
    return _bumped(routine, now, schedule=False, actions=actions)


# --- applying a transition ----------------------------------------------------------------------


def apply(
    store: Store,
    routine_id: str,
    change: Callable[[Routine, datetime], Routine | None],
    clock: Callable[[], datetime],
) -> tuple[Routine, Routine] | None:
    """Read the routine, ``change`` it, write it on its etag (read again on a lost race); returns
    (before, after) when a change was written. A deleted routine is left alone."""
    for _ in range(5):
        try:
            routine, etag = store.get_routine(routine_id)
        except NotFound:
            return None
        updated = change(routine, clock())
        if updated is None:
            return None
        try:
            store.replace_routine(updated, etag, routine)
            return routine, updated
        except PreconditionFailed:
            continue
        except NotFound:
            return None
    log.warning("routine %s kept changing; a change was not applied", routine_id)
    return None


def record_outcome(
    store: Store,
    routine_id: str,
    run_id: str,
    status: RunStatus,
    ended_at: datetime,
    clock: Callable[[], datetime],
) -> None:
    """``count_outcome`` applied to the stored routine; a pause is logged and counted."""
    done = apply(store, routine_id, lambda r, now: count_outcome(r, run_id, status, ended_at, now), clock)
    if done is None:
        return
    before, after = done
    if before.state is RoutineState.enabled and after.disabled_reason == "failures":
        log.warning(
            "routine %s disabled after %d failed runs in a row (pause_after_failures); enable it to resume",
            routine_id,
            len(after.failures),
        )
        telemetry.record_paused(routine_id, len(after.failures))
