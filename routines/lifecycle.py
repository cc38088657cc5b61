"""Routine lifecycle transitions as pure functions: (routine, ..., now) -> the routine to write, or
``None`` for "nothing to change". The API, the tick and the dispatcher all change a routine's state
through these, so a rule (what enable resets, when a timer completes) lives in one place.

Every transition that moves the schedule bumps ``schedule_version``: a fire queued at an older
version is stale and does not run (docs/guarantees.md #4).
"""

from __future__ import annotations

from datetime import datetime

import pydantic

from routines.errors import Conflict
from routines.models import ResponseAction, Routine, RoutineState, TimerTrigger
from routines.schedule import next_fire_after


def _bumped(routine: Routine, now: datetime, *, schedule: bool, **changes: object) -> Routine:
    version = routine.version + 1
    update: dict[str, object] = {"version": version, "updated_at": now, **changes}
    if schedule:
        update["schedule_version"] = version
    return routine.model_copy(update=update)


def disable(routine: Routine, now: datetime) -> Routine | None:
    if routine.state is not RoutineState.enabled:
        return None
    return _bumped(routine, now, schedule=True, state=RoutineState.disabled, next_fire_at=None, due_at=None)


def enable(routine: Routine, now: datetime) -> Routine | None:
    """The routine enabled from ``now`` (fires missed while disabled are not run); the caller plans
    its near fires (``scheduler.plan_immediately``). Raises ``Conflict`` for a completed timer or a
    timer whose time has passed."""
    if routine.state is RoutineState.enabled:
        return None
    if routine.state is RoutineState.completed:
        raise Conflict(
            "this timer routine has fired and is completed; PATCH trigger.at to a future time to "
            "schedule it again"
        )
    if isinstance(routine.trigger, TimerTrigger) and next_fire_after(routine.trigger, now) is None:
        raise Conflict("the timer's time has passed; PATCH trigger.at to a future time")
    return _bumped(routine, now, schedule=True, state=RoutineState.enabled)


def reschedule(routine: Routine, now: datetime) -> Routine:
    """After a trigger edit: a new schedule version; a completed timer given a new time is enabled
    again, a disabled routine stays disabled."""
    state = RoutineState.disabled if routine.state is RoutineState.disabled else RoutineState.enabled
    return routine.model_copy(update={"schedule_version": routine.version, "state": state})


def complete_timer(routine: Routine, fired: datetime, now: datetime) -> Routine | None:
    """A timer routine after its fire ``fired`` ran. Conditional on the ``at`` it completed: a PATCH
    of ``at`` that landed since keeps the routine enabled for its new time."""
    trigger = routine.trigger
    if routine.state is not RoutineState.enabled or not isinstance(trigger, TimerTrigger):
        return None
    if trigger.at.replace(microsecond=0) != fired:
        return None
    return _bumped(routine, now, schedule=False, state=RoutineState.completed, next_fire_at=None, due_at=None)


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
