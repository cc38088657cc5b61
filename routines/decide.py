"""The run state machine: what one dispatch message does to its run, as a pure function.

``next_step(facts)`` looks at what is known (the message, ``now``, and whatever the interpreter has
loaded so far: the routine, the run, the overlap slot, the slot holder, the agent's answer) and says
what to do next: load something it needs (``Load``), wait out an early arrival (``Wait``), write the
run (``Write``, then its effects), or stop (``Done``, with effects). ``routines.dispatcher`` is the
thin interpreter that performs these against the store, the queue and the agent backend.

Invariants (docs/guarantees.md):
- One fire = one run: the run id is derived from (routine id, scheduled time) and inserted if absent.
- At most one agent start per attempt: an attempt is claimed by an etag-conditional run write that
  sets an expiring lease (``LEASE``) before the agent is called; a synchronous agent call is capped
  (``SYNC_CALL_LIMIT``) well inside the lease. A message that finds the attempt leased comes back
  when the lease ends; a crashed worker's attempt is taken over after it.
- A run executes the snapshot of its routine taken when it was first claimed (``RunPlan``).
- Waiting costs no compute: a pending agent run is checked by delayed ``poll`` messages, a retry is a
  delayed ``retry`` message.
- Every write that loses a race is decided again on fresh facts; nothing is decided on stale reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from routines import retry, schedule
from routines.agents.base import AgentError, AgentOutcome
from routines.messages import MAX_DELAY_SECONDS, DispatchMessage, delay_until
from routines.models import (
    ActionResult,
    OverlapPolicy,
    ResponseAction,
    Routine,
    RoutineState,
    Run,
    RunPlan,
    RunProgress,
    RunStatus,
    RunTrigger,
    TimerTrigger,
    idempotency_key,
    run_time,
)
from routines.store import Slot, SlotWrite

LEASE: Final = timedelta(seconds=45)  # an attempt's claim; takeover after it (within 90 s of a crash)
SYNC_CALL_LIMIT: Final = timedelta(seconds=30)  # a synchronous agent call never outlives its lease
MAX_EARLY_WAIT: Final = 2.5  # fires surface 1-2 s early (whole-second visibility delays)
MIN_POLL_SECONDS: Final = 1.0  # visibility delays are whole seconds: shorter would poll in a loop
MAX_POLL_SECONDS: Final = 30.0
POLL_BACKOFF: Final = 0.25  # poll again after a quarter of the time the run has taken so far
HEARTBEAT: Final = timedelta(seconds=30)  # a poll chain writes the run this often (repair reads it)
FIRST_CHECK: Final = LEASE + timedelta(seconds=5)  # a watch is first checked this long after its fire
STALE: Final = "stale fire: the routine was disabled or rescheduled"
GONE: Final = "the routine was deleted"


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()  # not loaded yet (``None`` means loaded and absent)


@dataclass(frozen=True)
class Facts:
    message: DispatchMessage
    now: datetime
    owner: str
    routine: Routine | _Unknown | None = UNKNOWN
    run: Run | _Unknown | None = UNKNOWN
    etag: str | None = None  # the run's, when ``run`` is a Run
    slot: Slot | _Unknown | None = UNKNOWN
    holder: Run | _Unknown | None = UNKNOWN  # the slot holder's run
    contended: bool = False  # a slot write lost: decide from the slot as read, not optimistically
    called: int | None = None  # the action index just called
    outcome: AgentOutcome | AgentError | None = None  # its answer
    give_up: str | None = None  # the message failed for good: end its run failed with this reason


# --- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    message: DispatchMessage
    delay: float = 0.0


@dataclass(frozen=True)
class StartAgent:
    index: int


@dataclass(frozen=True)
class PollAgent:
    index: int


@dataclass(frozen=True)
class CancelAgent:
    """Best effort: the routine was deleted or disabled, or the attempt timed out. ``run`` as it was
    while its agent ran (its poll handle)."""

    run: Run


@dataclass(frozen=True)
class CompleteTimer:
    routine_id: str
    fired: datetime


@dataclass(frozen=True)
class RecordThread:
    routine_id: str
    index: int
    old: str | None
    new: str


@dataclass(frozen=True)
class Unwatch:
    """Drop the watch of a run. ``up_to_version``: only if it was written for that schedule version
    or an older one (a fire dropped as stale shares its run id, and so its watch, with a fire of the
    same second under a newer schedule)."""

    routine_id: str
    run_id: str
    up_to_version: int | None = None


@dataclass(frozen=True)
class Finished:
    """Telemetry: the run reached ``status``."""

    status: RunStatus


@dataclass(frozen=True)
class Retrying:
    """Telemetry: a failed attempt, retried or not."""

    error: str
    retriable: bool
    retry: bool


Effect = (
    Send | StartAgent | PollAgent | CancelAgent | CompleteTimer | RecordThread | Unwatch | Finished | Retrying
)


@dataclass(frozen=True)
class Load:
    what: Literal["routine", "run", "slot", "holder"]


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Write:
    """Write ``run`` (insert when ``etag`` is None, else replace on that etag) with ``slot``; then
    perform ``effects`` in order. A lost race is decided again on reloaded facts."""

    run: Run
    etag: str | None
    slot: SlotWrite | None = None
    effects: tuple[Effect, ...] = ()
    why: str = ""


@dataclass(frozen=True)
class Done:
    effects: tuple[Effect, ...] = ()
    why: str = ""


Step = Load | Wait | Write | Done


# --- the machine --------------------------------------------------------------------------------


def next_step(f: Facts) -> Step:
    """The next thing to do for message ``f.message``. Pure: same facts, same step."""
    if f.give_up is not None:
        return _give_up(f)
    if f.outcome is not None:
        return _after_call(f)
    if f.message.kind == "poll":
        return _poll(f)
    return _start(f)


def _start(f: Facts) -> Step:
    m = f.message
    manual = is_manual_run(m.run_id)
    early = (m.scheduled_for - f.now).total_seconds()
    if m.kind == "fire" and not manual and early > 0 and isinstance(f.run, _Unknown):
        return Wait(min(early, MAX_EARLY_WAIT))
    if isinstance(f.routine, _Unknown):
        return Load("routine")
    routine = f.routine
    if routine is None:
        return _routine_gone(f)
    if m.kind == "fire" and not manual and stale(routine, m):
        return _stale_fire(f, routine)
    if isinstance(f.run, _Unknown) and m.kind == "fire" and not manual:
        return _create(f, routine)  # the hot path: insert first, read only on conflict
    if isinstance(f.run, _Unknown):
        return Load("run")
    if f.run is None:
        return _absent(f, routine)
    return _existing(f, routine, f.run)


def stale(routine: Routine, message: DispatchMessage) -> bool:
    """A scheduled fire of a routine disabled or rescheduled since it was queued (docs/guarantees.md #4). A
    message newer than the routine read is never stale: routine writes land before their fires."""
    if routine.state is RoutineState.disabled or message.routine_version < routine.schedule_version:
        return True
    try:
        expected = schedule.next_fire_after(routine.trigger, message.scheduled_for - timedelta(seconds=1))
    except schedule.ScheduleError:
        return True
    return expected != message.scheduled_for


def _routine_gone(f: Facts) -> Step:
    """A deleted routine's fires are dropped; a run already recorded ends cancelled."""
    if isinstance(f.run, _Unknown):
        return Load("run")
    if f.run is None or f.run.status.terminal:
        return Done((_unwatch(f.message),), GONE)
    return _end_cancelled(f, f.run, GONE)


def _stale_fire(f: Facts, routine: Routine) -> Step:
    """A stale fire does not start, but a run it already has must still end: one waiting for the
    overlap slot is cancelled (releasing the slot); one already started goes on like any other."""
    if isinstance(f.run, _Unknown):
        return Load("run")
    run = f.run
    if run is None or run.status.terminal:
        return Done((_unwatch(f.message, stale=True),), STALE)
    if run.status is RunStatus.queued:
        return _finish(
            f,
            run,
            RunStatus.cancelled,
            "cancelled: the routine was disabled or rescheduled before this fire could start",
        )
    return _existing(f, routine, run)


def _absent(f: Facts, routine: Routine) -> Step:
    """A message whose run does not exist: a manual or retry message of a run never written (the
    API's write failed after its watch), or purged. Nothing to do."""
    if f.message.kind == "fire" and not is_manual_run(f.message.run_id):
        return _create(f, routine)
    return Done((_unwatch(f.message),), "no such run")


def _create(f: Facts, routine: Routine) -> Step:
    m = f.message
    run = Run(
        id=m.run_id,
        routine_id=routine.id,
        trigger=RunTrigger(routine.trigger.type),
        scheduled_for=m.scheduled_for,
        status=RunStatus.queued,
        max_attempts=routine.retry_policy.max_attempts,
        idempotency_key=idempotency_key(routine.id, m.scheduled_for),
        progress=RunProgress(routine_version=m.routine_version),
    )
    timer = (CompleteTimer(routine.id, m.scheduled_for),) if run.trigger is RunTrigger.timer else ()
    return _claim(f, routine, run, timer, fresh=True)


def _existing(f: Facts, routine: Routine, run: Run) -> Step:
    """A redelivery, a duplicate, a retry, or a run recorded before its message (manual, buffered,
    coalesced). A redelivery may follow a crash between a run write and what came after it (the next
    message, the timer's completion, the hand-over of the slot): that step is done again."""
    m, now = f.message, f.now
    effects: list[Effect] = []
    if m.kind == "fire" and run.trigger is RunTrigger.timer:
        effects.append(CompleteTimer(routine.id, run.scheduled_for))
    if run.status.terminal:
        return _handed_over(f, run, effects)
    if m.attempt < max(run.attempt, 1):
        return Done(tuple(effects), "a message of an earlier attempt")
    progress = run.progress
    if run.status is RunStatus.running and run.attempt == m.attempt:
        if progress.poll is not None:
            if m.kind != "poll":  # the start's own message again: its first poll may be lost
                effects.append(Send(message_for(run, "poll"), MIN_POLL_SECONDS))
            return Done(tuple(effects), "started; its polls drive it")
        if progress.lease_until and progress.lease_until > now:
            # Someone holds this attempt. Come back when the lease ends: if they crashed, it is taken
            # over then; if not, the run is finished by then and this is a no-op.
            effects.append(Send(m, delay_until(progress.lease_until, now) + 1))
            return Done(tuple(effects), "leased by another worker")
        return _claim(f, routine, run, tuple(effects), fresh=False)  # the lease lapsed: take the attempt over
    if run.status is RunStatus.retrying:
        due = run.next_attempt_at or now
        if m.attempt == run.attempt:  # the failed attempt's message again: its retry may be lost
            effects.append(Send(retry_message(run), delay_until(due, now)))
            return Done(tuple(effects), "resent the retry")
        if m.attempt != run.attempt + 1:
            return Done(tuple(effects), "not this run's next attempt")
        if due > now + timedelta(seconds=MAX_EARLY_WAIT):
            effects.append(Send(m, delay_until(due, now)))
            return Done(tuple(effects), "too early for the retry")
        if due > now:
            return Wait(delay_until(due, now))
        return _claim(f, routine, run, tuple(effects), fresh=False)
    if run.status is RunStatus.queued:
        held = run.next_attempt_at  # a queued run may be held until then (a webhook debounce window)
        if held is not None and held > now + timedelta(seconds=MAX_EARLY_WAIT):
            effects.append(Send(m, delay_until(held, now)))
            return Done(tuple(effects), "queued until its next_attempt_at")
        if held is not None and held > now:
            return Wait(delay_until(held, now))
        return _claim(f, routine, run, tuple(effects), fresh=False)
    return Done(tuple(effects), "nothing to do")


def _handed_over(f: Facts, run: Run, effects: list[Effect]) -> Step:
    """A message of a finished run came again. If it handed the slot to a buffered run, that run's
    release may have been lost to a crash right after: send it again (a duplicate is harmless)."""
    effects.append(_unwatch(f.message))
    handed = run.progress.handed_to
    if handed is None:
        return Done(tuple(effects), "finished")
    if isinstance(f.holder, _Unknown):
        return Load("holder")
    waiting = f.holder
    if waiting is not None and waiting.id == handed and waiting.status is RunStatus.queued:
        effects.append(Send(release_message(waiting)))
    return Done(tuple(effects), "finished; hand-over re-sent")


def holder_id(f: Facts) -> str | None:
    """Whose run ``Load("holder")`` means: the slot's holder, or the run a finished run handed to."""
    if isinstance(f.run, Run) and f.run.status.terminal and f.run.progress.handed_to:
        return f.run.progress.handed_to
    return f.slot.holder if isinstance(f.slot, Slot) else None


def _cancelled_by_routine(routine: Routine, run: Run) -> str | None:
    """A run of a routine disabled after the run was queued ends cancelled (a manual run queued while
    the routine was disabled is not affected); so does a scheduled fire still waiting to start when
    the routine was rescheduled (docs/guarantees.md #4). Runs already started finish their attempts."""
    version = run.progress.routine_version or 0
    if routine.schedule_version <= version:
        return None
    if routine.state is RoutineState.disabled:
        return "the routine was disabled"
    if run.status is RunStatus.queued and run.trigger not in (RunTrigger.manual, RunTrigger.webhook):
        return "the routine was disabled or rescheduled before this fire could start"
    return None


def _claim(f: Facts, routine: Routine, run: Run, before: tuple[Effect, ...], *, fresh: bool) -> Step:
    """Start attempt ``f.message.attempt`` of ``run`` (inserted when ``fresh``), after ``before``.
    Takes the overlap slot first when the routine uses one."""
    now = f.now
    reason = _cancelled_by_routine(routine, run)
    if reason:
        return _finish(f, run, RunStatus.cancelled, f"cancelled: {reason}", before)
    plan = run.progress.plan or RunPlan.of(routine)
    slot_write: SlotWrite | None = None
    if run.status is RunStatus.queued and plan.overlap_policy is not OverlapPolicy.allow_all:
        if not f.contended and not run.progress.holds_slot:
            slot_write = SlotWrite(holder=run.id)  # optimistic: create the slot
        else:
            if isinstance(f.slot, _Unknown):
                return Load("slot")
            slot = f.slot
            if slot is None:
                slot_write = SlotWrite(holder=run.id)
            elif slot.holder == run.id:  # handed over: rewrite it to learn its etag
                slot_write = SlotWrite(holder=run.id, buffered=slot.buffered, etag=slot.etag)
            else:
                return _overlap(f, routine, run, slot, before, fresh=fresh)
    max_age = plan.retry_policy.max_age_seconds
    if max_age is not None and now > run.scheduled_for + timedelta(seconds=max_age):
        failed = run if not fresh else run.model_copy(update={"attempt": f.message.attempt})
        return _finish(
            f,
            failed,
            RunStatus.failed,
            f"attempt {f.message.attempt} not started: more than max_age_seconds ({max_age}s) after "
            "the scheduled time",
            before,
        )
    claimed = run.model_copy(deep=True)
    claimed.status = RunStatus.running
    claimed.attempt = f.message.attempt
    claimed.max_attempts = plan.retry_policy.max_attempts
    claimed.next_attempt_at = None
    claimed.started_at = claimed.started_at or now
    if len(claimed.actions) != len(plan.actions):
        claimed.actions = [ActionResult(index=i) for i in range(len(plan.actions))]
    p = claimed.progress
    p.plan = plan
    p.lease_owner, p.lease_until = f.owner, now + LEASE
    p.attempt_started_at = now
    p.poll = p.poll_deadline = None
    p.holds_slot = p.holds_slot or slot_write is not None
    index = p.action_index
    return Write(claimed, None if fresh else f.etag, slot_write, (*before, StartAgent(index)), "claim")


def _overlap(
    f: Facts, routine: Routine, run: Run, slot: Slot, before: tuple[Effect, ...], *, fresh: bool
) -> Step:
    """The slot is held by another run. Take it over if its holder is finished or abandoned;
    otherwise buffer this fire (``buffer_one``, one waiting fire at most) or skip it."""
    if isinstance(f.holder, _Unknown):
        return Load("holder")
    holder = f.holder
    etag = None if fresh else f.etag
    active = holder is not None and not holder.status.terminal and not abandoned(holder, f.now)
    if not active:
        buffered = None if slot.buffered == run.id else slot.buffered
        taken = dataclasses.replace(f, slot=Slot(run.id, buffered, slot.etag), contended=True)
        return _claim(taken, routine, run, before, fresh=fresh)
    policy = (run.progress.plan or RunPlan.of(routine)).overlap_policy
    if policy is OverlapPolicy.buffer_one and slot.buffered in (None, run.id):
        if slot.buffered == run.id and run.status is RunStatus.queued and run.progress.holds_slot:
            return Done(before, "already buffered")
        waiting = run.model_copy(deep=True)
        waiting.status, waiting.attempt, waiting.started_at = RunStatus.queued, 0, None
        waiting.progress = RunProgress(
            routine_version=run.progress.routine_version,
            input_override=run.progress.input_override,
            holds_slot=True,
        )
        buffer = SlotWrite(holder=slot.holder, buffered=run.id, etag=slot.etag)
        return Write(waiting, etag, buffer, before, "buffered behind the running fire")
    skipped = run.model_copy(deep=True)
    skipped.status, skipped.attempt, skipped.ended_at, skipped.started_at = RunStatus.skipped, 0, f.now, None
    skipped.progress = RunProgress()
    skipped.error_message = (
        f"skipped: run {slot.holder} of this routine was still running (overlap_policy {policy.value})"
    )
    effects = (*before, _unwatch(f.message), Finished(RunStatus.skipped))
    return Write(skipped, etag, None, effects, "skipped")


def abandoned(run: Run, now: datetime, after: timedelta = timedelta(minutes=10)) -> bool:
    """A non-terminal run untouched long past every deadline it set no longer blocks others."""
    p = run.progress
    marks = [m for m in (p.lease_until, p.poll_deadline, run.next_attempt_at, p.polled_at) if m]
    return bool(marks) and max(marks) + after < now


# --- polls --------------------------------------------------------------------------------------


def _poll(f: Facts) -> Step:
    m = f.message
    if isinstance(f.run, _Unknown):
        return Load("run")
    run = f.run
    if run is None:
        return Done((_unwatch(m),), "no such run")
    if run.status.terminal:
        return _handed_over(f, run, []) if run.attempt == m.attempt else Done((), "finished")
    if run.status is not RunStatus.running or run.attempt != m.attempt or run.progress.poll is None:
        return Done((), "a stale poll")
    if isinstance(f.routine, _Unknown):
        return Load("routine")
    index = run.progress.action_index
    reason = (
        "the routine was deleted while its agent ran"
        if f.routine is None
        else _cancelled_by_routine(f.routine, run)
    )
    if reason:
        return _end_cancelled(f, run, reason)
    deadline = run.progress.poll_deadline
    if deadline and f.now >= deadline:
        timeout = plan_of(run).timeout_seconds
        error = AgentError(f"timed out after {timeout}s (timeout_seconds); cancelled", retriable=True)
        step = _failed_attempt(dataclasses.replace(f, called=index), run, index, error)
        if isinstance(step, Write):
            return dataclasses.replace(step, effects=(CancelAgent(run), *step.effects))
        return step
    return Done((PollAgent(index),), "poll the agent")


def _end_cancelled(f: Facts, run: Run, reason: str) -> Step:
    effects: tuple[Effect, ...] = ()
    if run.status is RunStatus.running and run.progress.poll is not None:
        effects = (CancelAgent(run),)
    return _finish(f, run, RunStatus.cancelled, reason, effects)


# --- after an agent call ------------------------------------------------------------------------


def _after_call(f: Facts) -> Step:
    assert isinstance(f.run, Run) and f.called is not None
    run, index, outcome = f.run, f.called, f.outcome
    if isinstance(outcome, AgentError):
        return _failed_attempt(f, run, index, outcome)
    assert isinstance(outcome, AgentOutcome)
    if not outcome.done:
        return _pending(f, run, index, outcome)
    done = run.model_copy(deep=True)
    result = done.actions[index]
    result.status = RunStatus.succeeded
    result.output = outcome.output
    result.thread_id = outcome.thread_id or result.thread_id
    result.agent_run_id = outcome.agent_run_id or result.agent_run_id
    result.error_message = None
    p = done.progress
    p.action_index = index + 1
    p.poll = p.poll_deadline = p.polled_at = None
    effects: list[Effect] = []
    action = plan_of(run).actions[index]
    if isinstance(action, ResponseAction) and outcome.thread_id and outcome.thread_id != action.thread_id:
        effects.append(RecordThread(run.routine_id, index, action.thread_id, outcome.thread_id))
    if p.action_index >= len(plan_of(run).actions):
        return _finish(f, done, RunStatus.succeeded, None, tuple(effects))
    # More actions: save this one and claim the next start, so neither a crash nor a duplicated
    # poll can start an action twice, and the next call gets a fresh lease.
    p.lease_owner, p.lease_until = f.owner, f.now + LEASE
    p.attempt_started_at = p.attempt_started_at or f.now
    return Write(done, f.etag, None, (*effects, StartAgent(index + 1)), "next action")


def _pending(f: Facts, run: Run, index: int, outcome: AgentOutcome) -> Step:
    delay = poll_delay(run, outcome, f.now)
    again = f.message.kind == "poll"  # a poll chain re-sends its own message, trace context and all
    poll = Send(f.message if again else message_for(run, "poll"), delay)
    p = run.progress
    if p.poll is not None and p.polled_at and f.now - p.polled_at < HEARTBEAT:
        return Done((poll,), "still pending")
    pending = run.model_copy(deep=True)
    pending.actions[index].status = RunStatus.running
    pending.actions[index].thread_id = outcome.thread_id or pending.actions[index].thread_id
    pending.actions[index].agent_run_id = outcome.agent_run_id or pending.actions[index].agent_run_id
    q = pending.progress
    if q.poll is None:
        q.poll = outcome.handle or {}
        q.poll_deadline = attempt_deadline(run)
    q.polled_at = f.now
    q.lease_owner, q.lease_until = None, None
    return Write(pending, f.etag, None, (poll,), "pending" if p.poll is None else "poll heartbeat")


def _failed_attempt(f: Facts, run: Run, index: int, exc: AgentError) -> Step:
    plan = plan_of(run)
    failed = run.model_copy(deep=True)
    failed.actions[index].status = RunStatus.failed
    failed.actions[index].error_message = str(exc)[:1000]
    error = f"attempt {run.attempt}: {str(exc)[:1000]}"
    decision = retry.decide(
        plan.retry_policy, run.attempt, exc.retriable, exc.retry_after, run.scheduled_for, f.now
    )
    note = Retrying(str(exc), exc.retriable, decision.retry)
    if not decision.retry:
        if exc.retriable:
            error += f" (no retry: {decision.reason})"
        return _finish(f, failed, RunStatus.failed, error, (note,))
    failed.status = RunStatus.retrying
    failed.error_message = error
    failed.next_attempt_at = f.now + timedelta(seconds=decision.delay_seconds)
    p = failed.progress
    p.poll = p.poll_deadline = p.polled_at = None
    p.lease_owner, p.lease_until = None, None
    return Write(failed, f.etag, None, (note, Send(retry_message(failed), decision.delay_seconds)), "retry")


# --- endings ------------------------------------------------------------------------------------


def _finish(
    f: Facts, run: Run, status: RunStatus, error: str | None, before: tuple[Effect, ...] = ()
) -> Step:
    """End ``run`` with ``status``, releasing its overlap slot (handing it to a buffered run)."""
    final = run.model_copy(deep=True)
    final.status, final.ended_at, final.next_attempt_at, final.error_message = status, f.now, None, error
    p = run.progress
    final.progress = RunProgress(action_index=p.action_index, routine_version=p.routine_version)
    effects: list[Effect] = [*before, _unwatch(f.message), Finished(status)]
    slot_write = None
    if p.holds_slot:
        if not f.contended and p.slot_etag and isinstance(f.slot, _Unknown):
            slot_write = SlotWrite(holder=None, etag=p.slot_etag)  # release without reading it first
        elif isinstance(f.slot, _Unknown):
            return Load("slot")
        elif f.slot is not None and f.slot.holder == run.id:
            slot_write = SlotWrite(holder=f.slot.buffered, buffered=None, etag=f.slot.etag)
            if f.slot.buffered:
                final.progress.handed_to = f.slot.buffered
                effects.append(Send(release_message_for(run.routine_id, f.slot.buffered, run)))
    etag = f.etag if isinstance(f.run, Run) and f.run.id == run.id else None
    return Write(final, etag, slot_write, tuple(effects), status.value)


def _give_up(f: Facts) -> Step:
    """The message failed on every delivery: its run ends ``failed`` with the reason (a fire that
    never got a run gets one), so nothing is left non-terminal."""
    m = f.message
    if isinstance(f.run, _Unknown):
        return Load("run")
    run = f.run
    reason = f"its dispatch message failed on every delivery: {f.give_up}"
    if run is not None and run.status.terminal:
        return Done((_unwatch(m),), "already finished")
    if run is None:
        if is_manual_run(m.run_id) or m.kind != "fire":
            return Done((_unwatch(m),), "no such run")
        trigger = RunTrigger.timer if m.kind == "fire" and _looks_like_timer(f) else RunTrigger.schedule
        run = Run(
            id=m.run_id,
            routine_id=m.routine_id,
            trigger=trigger,
            scheduled_for=m.scheduled_for,
            status=RunStatus.queued,
            idempotency_key=idempotency_key(m.routine_id, m.scheduled_for),
        )
        f = dataclasses.replace(f, etag=None)
    return _finish(f, run, RunStatus.failed, reason)


def _looks_like_timer(f: Facts) -> bool:
    return isinstance(f.routine, Routine) and isinstance(f.routine.trigger, TimerTrigger)


# --- helpers ------------------------------------------------------------------------------------


def plan_of(run: Run) -> RunPlan:
    if run.progress.plan is None:  # pragma: no cover - every claimed run carries its plan
        raise ValueError(f"run {run.id} has no plan")
    return run.progress.plan


def attempt_deadline(run: Run) -> datetime:
    started = run.progress.attempt_started_at or run.started_at or run.scheduled_for
    return started + timedelta(seconds=plan_of(run).timeout_seconds)


def call_deadline(run: Run, now: datetime) -> datetime:
    """A synchronous agent call ends by the attempt's timeout or ``SYNC_CALL_LIMIT``, whichever is
    first, so it never outlives the lease that protects the attempt."""
    return min(attempt_deadline(run), now + SYNC_CALL_LIMIT)


def poll_delay(run: Run, outcome: AgentOutcome, now: datetime) -> float:
    """Back off as the run goes on, so the number of polls grows with the log of its duration, not
    linearly; never less than the agent's own hint, never much past the deadline."""
    p = run.progress
    elapsed = (now - (p.attempt_started_at or now)).total_seconds()
    hint = min(outcome.poll_after, MAX_DELAY_SECONDS) if outcome.poll_after == outcome.poll_after else 0
    delay = max(MIN_POLL_SECONDS, hint, min(MAX_POLL_SECONDS, elapsed * POLL_BACKOFF))
    deadline = p.poll_deadline or (attempt_deadline(run) if p.plan else None)
    if deadline:
        delay = min(delay, max(MIN_POLL_SECONDS, (deadline - now).total_seconds() + 1))
    return delay


def is_manual_run(run_id: str) -> bool:
    """A run written before its first message (manual ``m...``, webhook ``w...``): its messages
    find it rather than create it, and are never stale (scheduled runs' ids end in hex digits)."""
    return run_id.rsplit("_", 1)[-1][:1] in ("m", "w")


def message_for(
    run: Run, kind: Literal["fire", "retry", "poll"], attempt: int | None = None
) -> DispatchMessage:
    return DispatchMessage(
        kind=kind,
        routine_id=run.routine_id,
        scheduled_for=run.scheduled_for,
        routine_version=run.progress.routine_version or 1,
        attempt=max(1, run.attempt if attempt is None else attempt),
        run_id=run.id,
    )


def retry_message(run: Run) -> DispatchMessage:
    return message_for(run, "retry", run.attempt + 1)


def release_message(waiting: Run) -> DispatchMessage:
    """The message that starts a queued run (buffered, manual, coalesced): a ``retry`` of attempt 1,
    so the handler judges the run by its own state and version, not by the message's."""
    return message_for(waiting, "retry", 1)


def release_message_for(routine_id: str, run_id: str, finished: Run) -> DispatchMessage:
    """``release_message`` of a buffered run, built without reading it (its scheduled time is in its
    id; the message's version is not used for a queued run)."""
    return DispatchMessage(
        kind="retry",
        routine_id=routine_id,
        scheduled_for=scheduled_for_of(run_id, finished.scheduled_for),
        routine_version=finished.progress.routine_version or 1,
        attempt=1,
        run_id=run_id,
    )


def scheduled_for_of(run_id: str, default: datetime) -> datetime:
    """The scheduled time encoded in a run id (inverted milliseconds, ``models.run_id_for``)."""
    return run_time(run_id) or default


def _unwatch(m: DispatchMessage, *, stale: bool = False) -> Unwatch:
    return Unwatch(m.routine_id, m.run_id, m.routine_version if stale else None)


@dataclass(frozen=True)
class Repair:
    """What the repair pass does about one watch: send ``send`` (the message the run waits for),
    then look again at ``check_at`` (``None``: the run is terminal, drop the watch)."""

    send: DispatchMessage | None
    check_at: datetime | None
    why: str = field(default="")


def repair(run: Run | None, watch_fire: DispatchMessage, now: datetime, repair_after: timedelta) -> Repair:
    """Decide one overdue watch. ``watch_fire`` is the fire message the watch stands for. A run with
    something in flight (a lease, a due retry, a live poll chain) is left alone until that is due;
    one with nothing in flight for ``repair_after`` gets the message it waits for again (every
    handler is idempotent, so a message that was only late costs a no-op)."""
    later = now + repair_after
    if run is None:
        if is_manual_run(watch_fire.run_id):
            return Repair(None, None, "the manual run was never written")
        if now < watch_fire.scheduled_for + FIRST_CHECK:
            return Repair(None, watch_fire.scheduled_for + FIRST_CHECK, "not due yet")
        return Repair(watch_fire, now + FIRST_CHECK, "fire without a run: sent again")
    if run.status.terminal:
        return Repair(None, None, "finished")
    p = run.progress
    if run.status is RunStatus.running and p.poll is None:
        if p.lease_until and p.lease_until > now:
            return Repair(None, p.lease_until + timedelta(seconds=2), "leased")
        kind: Literal["fire", "retry"] = "fire" if run.attempt <= 1 else "retry"
        return Repair(message_for(run, kind), now + FIRST_CHECK, "lease lapsed: taken over")
    if run.status is RunStatus.running:
        quiet_until = (p.polled_at or now) + timedelta(seconds=MAX_POLL_SECONDS) + repair_after
        if quiet_until > now:
            return Repair(None, quiet_until, "polling")
        return Repair(message_for(run, "poll"), later, "poll chain silent: polled again")
    if run.status is RunStatus.retrying:
        due = (run.next_attempt_at or now) + repair_after
        if due > now:
            return Repair(None, due, "retry due later")
        return Repair(retry_message(run), later, "retry message lost: sent again")
    # queued: manual, webhook, coalesced, or buffered behind a running fire
    if run.next_attempt_at is not None and run.next_attempt_at + repair_after > now:
        return Repair(None, run.next_attempt_at + repair_after, "queued until its next_attempt_at")
    return Repair(release_message(run), later, "queued: fire sent again")
