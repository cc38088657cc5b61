"""The run state machine: what one dispatch message does to its run, as a pure function.

``next_step(facts)`` looks at what is known (the message, ``now``, and whatever the interpreter has
loaded so far: the routine, the run, the overlap slot, the slot holder, the agent's answer) and says
what to do next: load something it needs (``Load``), wait out an early arrival (``Wait``), write the
run (``Write``, then its effects), or stop (``Done``, with effects). ``routines.dispatcher`` is the
thin interpreter that performs these against the store, the queue and the agent backend.

A run executes a graph of steps (README "Steps"; a version-1 list of actions is a chain). The run is
claimed once (the overlap slot, the snapshot); then each step attempt is claimed on its own. Whenever
a step ends, the steps whose dependencies are all done are decided together (``_advance``): skipped
(a ``when`` that does not hold, a failed dependency nobody handles), ``waiting`` (an approval), or
started: the worker starts one of them itself and sends one message per other one, so parallel
steps start together and no worker waits on another step.

Invariants (docs/guarantees.md):
- One fire = one run: the run id is derived from (routine id, scheduled time) and inserted if absent.
- At most one agent start per step attempt: an attempt is claimed by an etag-conditional run write
  that sets an expiring lease on the step (``LEASE``) before the agent is called; a synchronous
  agent call is capped (``SYNC_CALL_LIMIT``) well inside the lease. A message that finds the attempt
  leased comes back when the lease ends; a crashed worker's attempt is taken over after it.
- A run executes the snapshot of its routine taken when it was first claimed (``RunPlan``).
- A step that succeeded is never started again; a failed one is retried alone.
- Waiting costs no compute: a pending agent run is checked by delayed ``poll`` messages, a retry is a
  delayed ``retry`` message, an approval is a ``poll`` delayed to its timeout (or sent by the API
  when a person decides).
- Every write that loses a race is decided again on fresh facts, an agent's answer included (two
  steps finishing at once never lose each other's result); nothing is decided on stale reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from routines import graph, limits, retry, schedule
from routines.agents.base import AgentError, AgentOutcome
from routines.errors import Conflict, NotFound
from routines.messages import MAX_DELAY_SECONDS, DispatchMessage, delay_until
from routines.models import (
    Action,
    ActionResult,
    ApprovalStep,
    Concurrency,
    OverlapPolicy,
    ResponseAction,
    Routine,
    RoutineState,
    Run,
    RunPlan,
    RunProgress,
    RunStatus,
    RunTrigger,
    StepProgress,
    StepStatus,
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
    permits: limits.Permits | _Unknown | None = UNKNOWN  # the run's concurrency key's permits
    starts: limits.Starts | _Unknown | None = UNKNOWN  # the run's rate-limit key's recent starts
    contended: bool = False  # a slot write lost: decide from the slot as read, not optimistically
    called: str | None = None  # the step just called
    called_attempt: int = 0  # the attempt of that step the call was for
    outcome: AgentOutcome | AgentError | None = None  # its answer
    give_up: str | None = None  # the message failed for good: end its run failed with this reason


# --- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    message: DispatchMessage
    delay: float = 0.0


@dataclass(frozen=True)
class StartAgent:
    step: str


@dataclass(frozen=True)
class PollAgent:
    step: str


@dataclass(frozen=True)
class CancelAgent:
    """Best effort: the routine was deleted or disabled, or the attempt timed out. ``run`` as it was
    while the step's agent ran (its poll handle)."""

    run: Run
    step: str


@dataclass(frozen=True)
class CompleteTimer:
    routine_id: str
    fired: datetime


@dataclass(frozen=True)
class CountOutcome:
    """``pause_after_failures``: count the end of run ``run_id`` (failed or succeeded) in its
    routine's streak of failures. Before the watch is dropped: a worker that dies in between leaves
    the watch, and the repair pass counts it (counting a run twice changes nothing)."""

    routine_id: str
    run_id: str
    status: RunStatus
    ended_at: datetime


@dataclass(frozen=True)
class ReleasePermit:
    """Give back run ``run_id``'s permit of concurrency ``key`` (or its place in line), handing it to
    the oldest waiter. Before the watch is dropped, like ``CountOutcome``; idempotent."""

    key: str
    run_id: str


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
    """Telemetry: a failed attempt of ``step``, retried or not."""

    error: str
    retriable: bool
    retry: bool
    step: str = ""


@dataclass(frozen=True)
class Decided:
    """Telemetry: an approval step was decided (``approved``) by its timeout."""

    step: str
    approved: bool


Effect = (
    Send
    | StartAgent
    | PollAgent
    | CancelAgent
    | CompleteTimer
    | CountOutcome
    | ReleasePermit
    | RecordThread
    | Unwatch
    | Finished
    | Retrying
    | Decided
)


@dataclass(frozen=True)
class Load:
    what: Literal["routine", "run", "slot", "holder", "permits", "starts"]
    key: str | None = None  # ``permits``, ``starts``: of this key


@dataclass(frozen=True)
class Gate:
    """Write a flow-control row (a concurrency key's permits, a rate limit's starts) conditional on
    its etag; then decide again on it. A lost race is decided again on a fresh read."""

    row: limits.Permits | limits.Starts


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


Step = Load | Wait | Write | Done | Gate


# --- the machine --------------------------------------------------------------------------------


def next_step(f: Facts) -> Step:
    """The next thing to do for message ``f.message``. Pure: same facts, same step."""
    if f.give_up is not None:
        return _give_up(f)
    if f.outcome is not None:
        step = _after_call(f)
    elif f.message.kind == "poll":
        step = _poll(f)
    else:
        step = _start(f)
    return _rate_limited(f, step)


def _waited(f: Facts, step: Write) -> Write:
    """``step`` starts a step of a run held by the rate limit: say for what it waited, and how long."""
    run = step.run.model_copy(deep=True)
    _note_wait(run, f.now)
    return dataclasses.replace(step, run=run)


def _note_wait(run: Run, now: datetime) -> None:
    """``run`` (a copy) stops waiting (for a permit, for the rate limit) at ``now``."""
    since = run.progress.waiting_since or now
    run.waited_seconds += max(0.0, (now - since).total_seconds())
    run.wait_reason = "waited for " + (run.wait_reason or "").removeprefix("waiting for ").split(":")[0]
    run.progress.waiting_on = run.progress.waiting_since = None


def _rate_limited(f: Facts, step: Step) -> Step:
    """Every agent start goes through here: a write that leases a step and then starts its agent
    (``StartAgent`` last), of a run whose plan has a ``rate_limit``, first takes a start in the
    key's window (``Gate``). When the window is full the step is not started: it waits ``pending``
    until a start is allowed, and a retry message of the same attempt comes then."""
    if not isinstance(step, Write) or not step.effects or not isinstance(step.effects[-1], StartAgent):
        return step
    run, started = step.run, step.effects[-1].step
    plan = run.progress.plan
    rate = plan.rate_limit if plan else None
    if rate is None:
        return step
    attempt = result(run, started).attempt
    if isinstance(f.starts, _Unknown):
        return Load("starts", rate.key)
    window, allowed_at = limits.take(
        f.starts, rate.key, rate.limit, rate.period_seconds, f.now, f"{run.id}/{started}/{attempt}"
    )
    if window is not f.starts:
        return Gate(window)
    if allowed_at is None:
        return _waited(f, step) if run.progress.waiting_since else step
    held = run.model_copy(deep=True)
    r, sp = result(held, started), progress_of(held, started)
    r.status, r.attempt, r.next_attempt_at = StepStatus.pending, attempt - 1, allowed_at
    if r.attempt == 0:
        r.started_at = None
    sp.lease_owner = sp.lease_until = sp.attempt_started_at = None
    sp.sent_at = f.now  # decided: its start message is the one below
    held.wait_reason = (
        f"waiting for the rate limit of key {rate.key}: {rate.limit} starts in {rate.period_seconds}s"
    )
    held.progress.waiting_since = held.progress.waiting_since or f.now
    _set_status(held)
    again = Send(step_message(held, started, "retry", attempt), delay_until(allowed_at, f.now))
    return dataclasses.replace(step, run=held, effects=(*step.effects[:-1], again), why="rate limited")


def _start(f: Facts) -> Step:
    m = f.message
    manual = is_manual_run(m.run_id)
    early = ((m.dispatch_at or m.scheduled_for) - f.now).total_seconds()
    if m.kind == "fire" and not manual and early > 0 and isinstance(f.run, _Unknown):
        if early > 2 * MAX_EARLY_WAIT:  # far too early (a copy, a clock step): back to the queue
            return Done((Send(m, delay_until(m.dispatch_at or m.scheduled_for, f.now)),), "early")
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
        dispatch_at=m.dispatch_at,
        status=RunStatus.queued,
        max_attempts=routine.retry_policy.max_attempts,
        idempotency_key=idempotency_key(routine.id, m.scheduled_for),
        progress=RunProgress(routine_version=m.routine_version),
    )
    timer = (CompleteTimer(routine.id, m.scheduled_for),) if run.trigger is RunTrigger.timer else ()
    return _claim(f, routine, run, timer, fresh=True)


def _existing(f: Facts, routine: Routine, run: Run) -> Step:
    """A redelivery, a duplicate, a retry, a step's start, or a run recorded before its message
    (manual, buffered, coalesced). A redelivery may follow a crash between a run write and what came
    after it (the next message, the timer's completion, the hand-over of the slot): that is done
    again."""
    m = f.message
    effects: list[Effect] = []
    if m.kind == "fire" and run.trigger is RunTrigger.timer:
        effects.append(CompleteTimer(routine.id, run.scheduled_for))
    if run.status.terminal:
        return _handed_over(f, run, effects)
    if run.status is RunStatus.queued:
        if m.step is not None:
            return Done(tuple(effects), "a step message of a run not started")
        # A queued run may be held until then (a webhook debounce window); one waiting for a permit
        # is not: a release wakes it early, and its permit check decides.
        held = None if run.progress.waiting_on else run.next_attempt_at
        if held is not None and held > f.now + timedelta(seconds=MAX_EARLY_WAIT):
            effects.append(Send(m, delay_until(held, f.now)))
            return Done(tuple(effects), "queued until its next_attempt_at")
        if held is not None and held > f.now:
            return Wait(delay_until(held, f.now))
        return _claim(f, routine, run, tuple(effects), fresh=False)
    return _step_message(f, routine, run, tuple(effects))


def _step_message(f: Facts, routine: Routine, run: Run, before: tuple[Effect, ...]) -> Step:
    """A message that starts (or takes over) an attempt of one step of a claimed run. A message
    without a step (the fire again, a nudge of the repair pass) stands for the first step."""
    m, now = f.message, f.now
    advanced = _advance_write(f, run, before, take=True)
    if advanced is not None:  # something the run owed first (a nudge, an approval decided)
        return advanced
    step = m.step or first_step(run)
    if step not in step_ids(run):
        return Done(before, "no such step")
    r, sp = result(run, step), progress_of(run, step)
    if r.status.terminal or isinstance(action_of(run, step), ApprovalStep):
        return Done(before, "nothing to do for this step")
    if m.attempt < max(r.attempt, 1):
        return Done(before, "a message of an earlier attempt")
    if r.status is StepStatus.running and r.attempt == m.attempt:
        if sp.poll is not None:
            # The fire again: the first poll may have been lost right after the start. Another message
            # (a permit's look-again, a release again) resends one only when the chain went quiet, so a
            # live chain is not doubled.
            alive = sp.polled_at or sp.attempt_started_at or now
            quiet = now - alive > timedelta(seconds=MAX_POLL_SECONDS) + HEARTBEAT
            if m.kind == "fire" or (m.kind != "poll" and quiet):
                return Done(
                    (*before, Send(step_message(run, step, "poll"), MIN_POLL_SECONDS)),
                    "started; its polls drive it",
                )
            return Done(before, "started; its polls drive it")
        if sp.lease_until and sp.lease_until > now:
            # Someone holds this attempt. Come back when the lease ends: if they crashed, it is taken
            # over then; if not, the step is finished by then and this is a no-op.
            return Done((*before, Send(m, delay_until(sp.lease_until, now) + 1)), "leased by another worker")
        return _claim_step(f, routine, run, step, m.attempt, before)  # the lease lapsed: take it over
    if r.status is not StepStatus.pending:
        return Done(before, "nothing to do")
    if r.next_attempt_at is not None:
        due = r.next_attempt_at
        if m.attempt == r.attempt:  # the failed attempt's message again: its retry may be lost
            return Done(
                (*before, Send(step_message(run, step, "retry", r.attempt + 1), delay_until(due, now))),
                "resent the retry",
            )
        if m.attempt != r.attempt + 1:
            return Done(before, "not this step's next attempt")
        if due > now + timedelta(seconds=MAX_EARLY_WAIT):
            return Done((*before, Send(m, delay_until(due, now))), "too early for the retry")
        if due > now:
            return Wait(delay_until(due, now))
        return _claim_step(f, routine, run, step, m.attempt, before)
    if sp.sent_at is None or m.attempt != r.attempt + 1:
        return Done(before, "not this step's next attempt")
    return _claim_step(f, routine, run, step, m.attempt, before)


def _claim(f: Facts, routine: Routine, run: Run, before: tuple[Effect, ...], *, fresh: bool) -> Step:
    """Start ``run`` (inserted when ``fresh``), after ``before``: take the overlap slot first when
    the routine uses one, snapshot the routine, and start the steps that start with the run."""
    now = f.now
    reason = _cancelled_by_routine(routine, run)
    if reason:
        return _finish(f, run, RunStatus.cancelled, f"cancelled: {reason}", before)
    plan = run.progress.plan or RunPlan.of(routine)
    slot_write: SlotWrite | None = None
    if run.status is RunStatus.queued and plan.overlap_policy is not OverlapPolicy.allow_all:
        if not f.contended and not run.progress.holds_slot and isinstance(f.slot, _Unknown):
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
    if max_age is not None and now > run.due + timedelta(seconds=max_age):
        failed = run if not fresh else run.model_copy(update={"attempt": f.message.attempt})
        return _finish(
            f,
            failed,
            RunStatus.failed,
            f"attempt {f.message.attempt} not started: more than max_age_seconds ({max_age}s) after "
            "the scheduled time",
            before,
        )
    conc = plan.concurrency
    if conc is not None and run.progress.permit != conc.key:
        if isinstance(f.permits, _Unknown):
            return Load("permits", conc.key)
        try:
            permits, admitted = limits.admit(f.permits, conc.key, conc.limit, _waiter(run))
        except limits.QueueFull as exc:
            failed = run if not fresh else run.model_copy(update={"attempt": f.message.attempt})
            return _finish(f, failed, RunStatus.failed, f"not started: {exc}", before)
        if permits is not f.permits:
            return Gate(permits)
        if not admitted:
            if slot_write is not None and isinstance(f.slot, _Unknown):
                # The overlap slot was only assumed free: look before waiting, or a fire that the
                # overlap policy skips (or buffers) would wait in the key's line instead.
                return Load("slot")
            return _wait_for_permit(f, run, plan, conc, permits, before, fresh=fresh)
    claimed = run.model_copy(deep=True)
    claimed.status = RunStatus.running
    claimed.attempt = 1
    claimed.max_attempts = plan.retry_policy.max_attempts
    claimed.next_attempt_at = None
    claimed.started_at = claimed.started_at or now
    stale_line: tuple[Effect, ...] = ()
    waited_on = claimed.progress.waiting_on
    if waited_on is not None and (conc is None or conc.key != waited_on):  # its key changed meanwhile
        stale_line = (ReleasePermit(waited_on, run.id),)
    if claimed.progress.waiting_since is not None:  # it waited for a permit
        _note_wait(claimed, now)
    claimed.progress.permit = conc.key if conc is not None else None
    ids = graph.step_ids(plan.actions)
    claimed.actions = [ActionResult(index=i, id=step) for i, step in enumerate(ids)]
    p = claimed.progress
    p.plan = plan
    p.steps = {}
    p.holds_slot = p.holds_slot or slot_write is not None
    effects = _advance(claimed, now, f.owner, take=True)
    _set_status(claimed)
    return Write(claimed, None if fresh else f.etag, slot_write, (*before, *stale_line, *effects), "claim")


PERMIT_RECHECK: Final = timedelta(minutes=5)  # a waiting run looks again this often (a lost wake-up)


def _waiter(run: Run) -> limits.Waiter:
    return limits.Waiter(run.scheduled_for, run.id, run.routine_id)


def _wait_for_permit(
    f: Facts,
    run: Run,
    plan: RunPlan,
    conc: Concurrency,
    permits: limits.Permits,
    before: tuple[Effect, ...],
    *,
    fresh: bool,
) -> Step:
    """No permit of ``conc.key`` is free (or older runs wait): ``run`` waits ``queued`` in line, with
    a look again at ``next_attempt_at`` (a release wakes it sooner), up to its ``max_age_seconds``."""
    now = f.now
    if (
        not fresh
        and run.progress.waiting_on == conc.key
        and run.next_attempt_at is not None
        and run.next_attempt_at > now + timedelta(seconds=MAX_EARLY_WAIT)
    ):
        return Done(before, "still waiting for a permit")  # its look again is queued
    recheck = now + PERMIT_RECHECK
    max_age = plan.retry_policy.max_age_seconds
    if max_age is not None:
        recheck = min(recheck, run.due + timedelta(seconds=max_age + 1))
    waiting = run.model_copy(deep=True)
    waiting.status, waiting.next_attempt_at = RunStatus.queued, recheck
    place = (permits.position(run.id) or 0) + 1
    waiting.wait_reason = (
        f"waiting for a permit of concurrency key {conc.key}: {len(permits.holders)} of {conc.limit} "
        f"taken, {place} in line"
    )
    left = run.progress.waiting_on
    if left is not None and left != conc.key:  # the routine's key changed: leave the old key's line
        before = (*before, ReleasePermit(left, run.id))
    waiting.progress.waiting_on = conc.key
    waiting.progress.waiting_since = waiting.progress.waiting_since or now
    look_again = Send(release_message(waiting), delay_until(recheck, now))
    return Write(waiting, None if fresh else f.etag, None, (*before, look_again), "waiting for a permit")


def _claim_step(
    f: Facts, routine: Routine, run: Run, step: str, attempt: int, before: tuple[Effect, ...]
) -> Step:
    """Start attempt ``attempt`` of ``step``: lease it, then call the agent."""
    now = f.now
    reason = _cancelled_by_routine(routine, run)
    if reason:
        return _end_cancelled(f, run, f"cancelled: {reason}", before)
    plan = plan_of(run)
    max_age = plan.retry_policy.max_age_seconds
    if max_age is not None and now > run.due + timedelta(seconds=max_age):
        error = (
            f"attempt {attempt} not started: more than max_age_seconds ({max_age}s) after the scheduled time"
        )
        failed = run.model_copy(deep=True)
        _end_step(failed, step, StepStatus.failed, now, error)
        result(failed, step).attempt = attempt
        return _moved_on(f, failed, before, "too late for the step")
    claimed = run.model_copy(deep=True)
    _lease(claimed, step, attempt, now, f.owner)
    _set_status(claimed)
    return Write(claimed, f.etag, None, (*before, StartAgent(step)), "claim step")


def _lease(run: Run, step: str, attempt: int, now: datetime, owner: str) -> None:
    r = result(run, step)
    r.status, r.attempt, r.next_attempt_at = StepStatus.running, attempt, None
    r.started_at = r.started_at or now
    sp = progress_of(run, step)
    sp.lease_owner, sp.lease_until = owner, now + LEASE
    sp.attempt_started_at = now
    sp.poll = sp.poll_deadline = sp.polled_at = sp.sent_at = None
    sp.ready_at = sp.ready_at or now


def _advance(run: Run, now: datetime, owner: str, *, take: bool) -> list[Effect]:
    """Decide every step whose dependencies are all done and that has not been decided yet (in
    ``run``, a copy the caller owns): skip it, hold it ``waiting`` (an approval, with a ``poll`` at
    its timeout), or start it. With ``take`` the caller starts the first agent step itself (a
    ``StartAgent`` last in the effects); every other one gets a message. Returns the effects."""
    plan = plan_of(run)
    deps = graph.dependencies(plan.actions)
    status = {r.id: r.status for r in run.actions}
    outputs = {r.id: r.output for r in run.actions}
    sends: list[Effect] = []
    taken: str | None = None
    for step in graph.order(deps):
        r, sp = result(run, step), progress_of(run, step)
        if r.status is not StepStatus.pending or r.attempt or sp.sent_at is not None:
            continue
        if not all(status[d].terminal for d in deps[step]):
            continue
        action = action_of(run, step)
        if not graph.runs(action, deps[step], status, outputs):
            _end_step(run, step, StepStatus.skipped, now, None)
            status[step] = StepStatus.skipped
            continue
        sp.ready_at = now
        if isinstance(action, ApprovalStep):
            r.status, r.attempt, r.started_at = StepStatus.waiting, 1, now
            status[step] = StepStatus.waiting
            sp.decide_by = now + timedelta(seconds=action.timeout_seconds)
            sends.append(
                Send(step_message(run, step, "poll"), min(action.timeout_seconds, MAX_DELAY_SECONDS))
            )
        elif take and taken is None:
            taken = step
            _lease(run, step, 1, now, owner)
            status[step] = StepStatus.running
        else:
            sp.sent_at = now
            status[step] = StepStatus.running  # for this pass: not terminal
            sends.append(Send(step_message(run, step, "retry", 1)))
    return [*sends, StartAgent(taken)] if taken else sends


def _owed(run: Run) -> bool:
    """Whether ``run`` has a step ready but not decided yet, or every step done but the run not
    ended (after an approval decided through the API, or a crash right after a step's write)."""
    plan = run.progress.plan
    if plan is None or run.status.terminal or run.status is RunStatus.queued:
        return False
    deps = graph.dependencies(plan.actions)
    if all(r.status.terminal for r in run.actions):
        return True
    return any(
        r.status is StepStatus.pending
        and not r.attempt
        and peek(run, r.id).sent_at is None
        and all(result(run, d).status.terminal for d in deps[r.id])
        for r in run.actions
    )


def _advance_write(f: Facts, run: Run, before: tuple[Effect, ...], *, take: bool) -> Step | None:
    """The write that moves ``run`` on, if it owes one (``_owed``)."""
    if not _owed(run):
        return None
    moved = run.model_copy(deep=True)
    return _moved_on(f, moved, before, "moved on", take=take)


def _moved_on(f: Facts, run: Run, before: tuple[Effect, ...], why: str, *, take: bool = True) -> Step:
    """``run`` (a copy) after a step ended: decide the steps that became ready, and end the run
    when every step is done."""
    effects = _advance(run, f.now, f.owner, take=take)
    if all(r.status.terminal for r in run.actions):
        status, error = outcome_of(run)
        return _finish(f, run, status, error, before)
    _set_status(run)
    return Write(run, f.etag, None, (*before, *effects), why)


def outcome_of(run: Run) -> tuple[RunStatus, str | None]:
    """A run whose steps are all done ``failed`` when a step failed and no step conditioned on that
    failure ran; otherwise it ``succeeded``."""
    handlers = graph.handlers_of(plan_of(run).actions)
    ran = {r.id for r in run.actions if r.status in (StepStatus.succeeded, StepStatus.failed)}
    for r in run.actions:
        if r.status is StepStatus.failed and not handlers.get(r.id, set()) & ran:
            return RunStatus.failed, _step_error(run, r.id, r.error_message or "failed")
    return RunStatus.succeeded, None


def _step_error(run: Run, step: str, error: str) -> str:
    return error if len(run.actions) == 1 else f"step {step}: {error}"


def _set_status(run: Run) -> None:
    """The status of a run that is going (``running``, ``waiting``, ``retrying``) from its steps,
    with ``attempt`` (the highest of its steps') and ``next_attempt_at`` (the next retry)."""
    steps = run.actions
    run.attempt = max([1, *(r.attempt for r in steps)])
    retries = [r.next_attempt_at for r in steps if r.status is StepStatus.pending and r.next_attempt_at]
    busy = any(
        r.status is StepStatus.running
        or (r.status is StepStatus.pending and peek(run, r.id).sent_at is not None)
        for r in steps
    )
    if busy or (not retries and not any(r.status is StepStatus.waiting for r in steps)):
        run.status, run.next_attempt_at = RunStatus.running, None
    elif any(r.status is StepStatus.waiting for r in steps):
        run.status, run.next_attempt_at = RunStatus.waiting, min(retries) if retries else None
    else:
        run.status, run.next_attempt_at = RunStatus.retrying, min(retries)


def _end_step(run: Run, step: str, status: StepStatus, now: datetime, error: str | None) -> None:
    r = result(run, step)
    r.status, r.ended_at, r.next_attempt_at = status, now, None
    if error is not None:
        r.error_message = error[:1000]
    run.progress.steps.pop(step, None)


def _handed_over(f: Facts, run: Run, effects: list[Effect]) -> Step:
    """A message of a finished run came again. What followed its final write may have been lost to a
    crash or a storage blip: its permit is given back and its outcome counted again (both
    idempotent; this also gives back a permit a late duplicate delivery took for it), and if it
    handed the slot to a buffered run, that run's release is sent again (a duplicate is harmless)."""
    if run.progress.permit:
        effects.append(ReleasePermit(run.progress.permit, run.id))
    effects.extend(_counted(f, run, run.status))
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
    plan = run.progress.plan or RunPlan.of(routine)
    policy = plan.overlap_policy
    if plan.concurrency is not None:  # it may have taken a permit (or a place) before it lost the slot
        before = (*before, ReleasePermit(plan.concurrency.key, run.id))
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
    marks = [run.next_attempt_at, *(r.next_attempt_at for r in run.actions)]
    for sp in run.progress.steps.values():
        marks += [sp.lease_until, sp.poll_deadline, sp.polled_at, sp.sent_at, sp.decide_by]
    marks += [r.ended_at for r in run.actions]
    present = [m for m in marks if m]
    return bool(present) and max(present) + after < now


# --- polls --------------------------------------------------------------------------------------


def _poll(f: Facts) -> Step:
    """A status check of one step: of its agent run, or of an approval (its timeout, or the API's
    word that a person decided)."""
    m = f.message
    if isinstance(f.run, _Unknown):
        return Load("run")
    run = f.run
    if run is None:
        return Done((_unwatch(m),), "no such run")
    if run.status.terminal:
        return _handed_over(f, run, []) if run.attempt == m.attempt else Done((), "finished")
    if run.status is RunStatus.queued or run.progress.plan is None:
        return Done((), "a stale poll")
    step = m.step or polling_step(run)
    if step is None or step not in step_ids(run):
        return Done((), "a stale poll")
    if isinstance(action_of(run, step), ApprovalStep):
        return _approval_check(f, run, step)
    advanced = _advance_write(f, run, (), take=False)
    if advanced is not None:
        return advanced
    r, sp = result(run, step), progress_of(run, step)
    if r.status is not StepStatus.running or r.attempt != m.attempt or sp.poll is None:
        return Done((), "a stale poll")
    if isinstance(f.routine, _Unknown):
        return Load("routine")
    reason = (
        "the routine was deleted while its agent ran"
        if f.routine is None
        else _cancelled_by_routine(f.routine, run)
    )
    if reason:
        return _end_cancelled(f, run, reason)
    deadline = sp.poll_deadline
    if deadline and f.now >= deadline:
        timeout = plan_of(run).timeout_seconds
        error = AgentError(f"timed out after {timeout}s (timeout_seconds); cancelled", retriable=True)
        called = dataclasses.replace(f, called=step, called_attempt=r.attempt)
        outcome = _failed_step(called, run, step, error)
        if isinstance(outcome, Write):
            return dataclasses.replace(outcome, effects=(CancelAgent(run, step), *outcome.effects))
        return outcome
    return Done((PollAgent(step),), "poll the agent")


def _approval_check(f: Facts, run: Run, step: str) -> Step:
    """An approval's poll: a person decided (the API wrote it; move the run on) or its timeout came."""
    advanced = _advance_write(f, run, (), take=False)
    if advanced is not None:
        return advanced
    r, sp = result(run, step), progress_of(run, step)
    if r.status is not StepStatus.waiting:
        return Done((), "the approval was decided")
    due = sp.decide_by or f.now
    if due > f.now + timedelta(seconds=MAX_EARLY_WAIT):  # a timeout past the queue's longest delay
        return Done((Send(f.message, delay_until(due, f.now)),), "not due yet")
    if due > f.now:
        return Wait(delay_until(due, f.now))
    action = action_of(run, step)
    assert isinstance(action, ApprovalStep)
    approved = action.on_timeout == "approve"
    decided = run.model_copy(deep=True)
    error = None if approved else f"not approved within {action.timeout_seconds}s (timeout_seconds); rejected"
    _end_step(decided, step, StepStatus.succeeded if approved else StepStatus.failed, f.now, error)
    result(decided, step).decided_at = f.now
    return _moved_on(f, decided, (Decided(step, approved),), "approval timed out", take=False)


def decide_approval(run: Run, step: str, approved: bool, comment: str | None, now: datetime) -> Run:
    """``run`` with approval ``step`` decided by a person (the API's approve / reject). The run moves
    on when the dispatcher next looks at it (the API sends it that step's ``poll``). Raises
    ``NotFound`` (no such step), ``Conflict`` (the step is not waiting)."""
    if run.progress.plan is None or step not in step_ids(run):
        raise NotFound(f"run {run.id} has no step {step!r}")
    r = result(run, step)
    if not isinstance(action_of(run, step), ApprovalStep):
        raise Conflict(f"step {step!r} of run {run.id} is not an approval step")
    if r.status is not StepStatus.waiting or run.status.terminal:
        raise Conflict(f"step {step!r} of run {run.id} is {r.status.value}, not waiting")
    decided = run.model_copy(deep=True)
    error = None if approved else "rejected" + (f": {comment}" if comment else "")
    _end_step(decided, step, StepStatus.succeeded if approved else StepStatus.failed, now, error)
    d = result(decided, step)
    d.decided_at, d.comment = now, comment
    _set_status(decided)
    return decided


def _end_cancelled(f: Facts, run: Run, reason: str, before: tuple[Effect, ...] = ()) -> Step:
    """End ``run`` cancelled, cancelling (best effort) every agent run still going."""
    cancels = tuple(
        CancelAgent(run, step)
        for step, sp in run.progress.steps.items()
        if sp.poll is not None and result(run, step).status is StepStatus.running
    )
    return _finish(f, run, RunStatus.cancelled, reason, (*before, *cancels))


# --- after an agent call ------------------------------------------------------------------------


def _after_call(f: Facts) -> Step:
    assert isinstance(f.run, Run) and f.called is not None
    run, step, outcome = f.run, f.called, f.outcome
    r = result(run, step)
    if run.status.terminal or r.status is not StepStatus.running or r.attempt != f.called_attempt:
        # Decided elsewhere since the call (a takeover that finished first, a cancel): ours is moot.
        return Done((), "the step was decided elsewhere")
    if isinstance(outcome, AgentError):
        return _failed_step(f, run, step, outcome)
    assert isinstance(outcome, AgentOutcome)
    if not outcome.done:
        return _pending(f, run, step, outcome)
    done = run.model_copy(deep=True)
    d = result(done, step)
    d.output = outcome.output
    d.thread_id = outcome.thread_id or d.thread_id
    d.agent_run_id = outcome.agent_run_id or d.agent_run_id
    d.error_message = None
    _end_step(done, step, StepStatus.succeeded, f.now, None)
    effects: list[Effect] = []
    action = action_of(run, step)
    if isinstance(action, ResponseAction) and outcome.thread_id and outcome.thread_id != action.thread_id:
        effects.append(RecordThread(run.routine_id, d.index, action.thread_id, outcome.thread_id))
    # Save this step and claim the next start in one write, so neither a crash nor a duplicated
    # poll can start a step twice, and the next call gets a fresh lease.
    return _moved_on(f, done, tuple(effects), "step succeeded")


def _pending(f: Facts, run: Run, step: str, outcome: AgentOutcome) -> Step:
    sp = progress_of(run, step)
    delay = poll_delay(run, step, outcome, f.now)
    # A poll chain re-sends its own message, trace context and all.
    again = f.message.kind == "poll" and f.message.step in (step, None)
    poll = Send(f.message if again else step_message(run, step, "poll"), delay)
    if sp.poll is not None and sp.polled_at and f.now - sp.polled_at < HEARTBEAT:
        return Done((poll,), "still pending")
    pending = run.model_copy(deep=True)
    r = result(pending, step)
    r.thread_id = outcome.thread_id or r.thread_id
    r.agent_run_id = outcome.agent_run_id or r.agent_run_id
    q = progress_of(pending, step)
    if q.poll is None:
        q.poll = outcome.handle or {}
        q.poll_deadline = attempt_deadline(run, step)
    q.polled_at = f.now
    q.lease_owner, q.lease_until = None, None
    return Write(pending, f.etag, None, (poll,), "pending" if sp.poll is None else "poll heartbeat")


def _failed_step(f: Facts, run: Run, step: str, exc: AgentError) -> Step:
    plan = plan_of(run)
    attempt = result(run, step).attempt
    failed = run.model_copy(deep=True)
    error = f"attempt {attempt}: {str(exc)[:1000]}"
    decision = retry.decide(plan.retry_policy, attempt, exc.retriable, exc.retry_after, run.due, f.now)
    note = Retrying(str(exc), exc.retriable, decision.retry, step)
    r = result(failed, step)
    if not decision.retry:
        if exc.retriable:
            error += f" (no retry: {decision.reason})"
        _end_step(failed, step, StepStatus.failed, f.now, error)
        return _moved_on(f, failed, (note,), "step failed")
    r.status, r.error_message = StepStatus.pending, str(exc)[:1000]
    r.next_attempt_at = f.now + timedelta(seconds=decision.delay_seconds)
    failed.progress.steps[step] = StepProgress(ready_at=progress_of(run, step).ready_at)
    _set_status(failed)
    failed.error_message = _step_error(failed, step, error)
    retry_msg = step_message(failed, step, "retry", attempt + 1)
    return Write(failed, f.etag, None, (note, Send(retry_msg, decision.delay_seconds)), "retry")


# --- endings ------------------------------------------------------------------------------------


def _finish(
    f: Facts, run: Run, status: RunStatus, error: str | None, before: tuple[Effect, ...] = ()
) -> Step:
    """End ``run`` with ``status``, releasing its overlap slot (handing it to a buffered run)."""
    final = run.model_copy(deep=True)
    final.status, final.ended_at, final.next_attempt_at, final.error_message = status, f.now, None, error
    for r in final.actions:
        if not r.status.terminal:
            r.status, r.ended_at, r.next_attempt_at = StepStatus.cancelled, f.now, None
    p = run.progress
    # The key it holds or waits for; else its routine's: a permit may have been taken (or a place in
    # line) by a delivery that died before it recorded that on the run. Giving back is idempotent.
    key = p.permit or p.waiting_on or _key_of(f, run)
    final.progress = RunProgress(routine_version=p.routine_version, permit=key)
    released = (ReleasePermit(key, run.id),) if key else ()
    effects: list[Effect] = [
        *before,
        *_counted(f, run, status),
        *released,
        _unwatch(f.message),
        Finished(status),
    ]
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


def _counted(f: Facts, run: Run, status: RunStatus) -> tuple[Effect, ...]:
    """The ``CountOutcome`` of a run ending ``status``, when its routine pauses after failures (as
    the run's snapshot says, else the routine read). A success is counted too, whatever the routine
    read said of the streak: another run's failure may have been counted since."""
    routine = f.routine if isinstance(f.routine, Routine) else None
    plan = run.progress.plan
    limit = plan.pause_after_failures if plan else (routine.pause_after_failures if routine else 0)
    if not limit or status not in (RunStatus.failed, RunStatus.succeeded):
        return ()
    return (CountOutcome(run.routine_id, run.id, status, run.ended_at or f.now),)


def _key_of(f: Facts, run: Run) -> str | None:
    plan = run.progress.plan
    conc = plan.concurrency if plan else (f.routine.concurrency if isinstance(f.routine, Routine) else None)
    return conc.key if conc else None


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
    if isinstance(f.routine, _Unknown):
        return Load("routine")  # its concurrency key: a permit it may hold goes back
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


def step_ids(run: Run) -> list[str]:
    return [r.id for r in run.actions]


def result(run: Run, step: str) -> ActionResult:
    for r in run.actions:
        if r.id == step:
            return r
    raise KeyError(step)


def action_of(run: Run, step: str) -> Action:
    return plan_of(run).actions[result(run, step).index]


def progress_of(run: Run, step: str) -> StepProgress:
    """The step's bookkeeping (created empty in ``run``, which must be the caller's copy, when absent)."""
    return run.progress.steps.setdefault(step, StepProgress())


def peek(run: Run, step: str) -> StepProgress:
    """The step's bookkeeping, without changing ``run``."""
    return run.progress.steps.get(step) or StepProgress()


def first_step(run: Run) -> str:
    """The step a message without a step stands for: the first of the run (the one its claim started)."""
    return run.actions[0].id if run.actions else "step1"


def polling_step(run: Run) -> str | None:
    """The step a poll without a step is for (a message of a version-1 run): the one being polled."""
    polling = [s for s, sp in run.progress.steps.items() if sp.poll is not None]
    return polling[0] if len(polling) == 1 else None


def attempt_deadline(run: Run, step: str) -> datetime:
    sp = peek(run, step)
    started = sp.attempt_started_at or result(run, step).started_at or run.started_at or run.scheduled_for
    return started + timedelta(seconds=plan_of(run).timeout_seconds)


def call_deadline(run: Run, step: str, now: datetime) -> datetime:
    """A synchronous agent call ends by the attempt's timeout or ``SYNC_CALL_LIMIT``, whichever is
    first, so it never outlives the lease that protects the attempt."""
    return min(attempt_deadline(run, step), now + SYNC_CALL_LIMIT)


def poll_delay(run: Run, step: str, outcome: AgentOutcome, now: datetime) -> float:
    """Back off as the step's agent run goes on, so the number of polls grows with the log of its
    duration, not linearly; never less than the agent's own hint, never much past the deadline."""
    sp = peek(run, step)
    elapsed = (now - (sp.attempt_started_at or now)).total_seconds()
    hint = min(outcome.poll_after, MAX_DELAY_SECONDS) if outcome.poll_after == outcome.poll_after else 0
    delay = max(MIN_POLL_SECONDS, hint, min(MAX_POLL_SECONDS, elapsed * POLL_BACKOFF))
    deadline = sp.poll_deadline or (attempt_deadline(run, step) if run.progress.plan else None)
    if deadline:
        delay = min(delay, max(MIN_POLL_SECONDS, (deadline - now).total_seconds() + 1))
    return delay


def is_manual_run(run_id: str) -> bool:
    """A run written before its first message (manual ``m...``, webhook ``w...``): its messages
    find it rather than create it, and are never stale (scheduled runs' ids end in hex digits)."""
    return run_id.rsplit("_", 1)[-1][:1] in ("m", "w")


def message_for(
    run: Run, kind: Literal["fire", "retry", "poll"], attempt: int | None = None, step: str | None = None
) -> DispatchMessage:
    return DispatchMessage(
        kind=kind,
        routine_id=run.routine_id,
        scheduled_for=run.scheduled_for,
        routine_version=run.progress.routine_version or 1,
        attempt=max(1, run.attempt if attempt is None else attempt),
        run_id=run.id,
        step=step,
    )


def step_message(
    run: Run, step: str, kind: Literal["retry", "poll"], attempt: int | None = None
) -> DispatchMessage:
    """A message for ``step``: start its attempt ``attempt`` (``retry``), or check it (``poll``, of
    its current attempt)."""
    return message_for(run, kind, result(run, step).attempt if attempt is None else attempt, step)


def nudge_message(run: Run) -> DispatchMessage:
    """A message that makes the dispatcher look at a claimed run as a whole (move it on)."""
    return message_for(run, "retry", 1)


def release_message(waiting: Run) -> DispatchMessage:
    """The message that starts a queued run (buffered, manual, coalesced): a ``retry`` of attempt 1,
    so the handler judges the run by its own state and version, not by the message's."""
    return message_for(waiting, "retry", 1)


def release_message_for(routine_id: str, run_id: str, finished: Run) -> DispatchMessage:
    """``release_message`` of a buffered run, built without reading it (its scheduled time is in its
    id; the message's version is not used for a queued run)."""
    scheduled_for = scheduled_for_of(run_id, finished.scheduled_for)
    return release_message_of(routine_id, run_id, scheduled_for, finished.progress.routine_version or 1)


def release_message_of(
    routine_id: str, run_id: str, scheduled_for: datetime, version: int = 1
) -> DispatchMessage:
    """``release_message`` of a queued run known by its ids only (a waiter handed a permit)."""
    return DispatchMessage(
        kind="retry",
        routine_id=routine_id,
        scheduled_for=scheduled_for,
        routine_version=version,
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
    """What the repair pass does about one watch: send ``sends`` (the messages the run waits for),
    then look again at ``check_at`` (``None``: the run is terminal, drop the watch)."""

    sends: tuple[DispatchMessage, ...]
    check_at: datetime | None
    why: str = field(default="")


def repair(run: Run | None, watch_fire: DispatchMessage, now: datetime, repair_after: timedelta) -> Repair:
    """Decide one overdue watch. ``watch_fire`` is the fire message the watch stands for. Each step
    with something in flight (a lease, a due retry, a live poll chain, a start message just sent, an
    approval before its timeout) is left alone until that is due; one with nothing in flight for
    ``repair_after`` gets the message it waits for again (every handler is idempotent, so a message
    that was only late costs a no-op)."""
    later = now + repair_after
    if run is None:
        if is_manual_run(watch_fire.run_id):
            return Repair((), None, "the manual run was never written")
        due = (watch_fire.dispatch_at or watch_fire.scheduled_for) + FIRST_CHECK
        if now < due:
            return Repair((), due, "not due yet")
        return Repair((watch_fire,), now + FIRST_CHECK, "fire without a run: sent again")
    if run.status.terminal:
        return Repair((), None, "finished")
    if run.status is RunStatus.queued or run.progress.plan is None:
        # queued: manual, webhook, coalesced, or buffered behind a running fire; a webhook's
        # debounce window holds it until its next_attempt_at
        if run.next_attempt_at is not None and run.next_attempt_at + repair_after > now:
            return Repair((), run.next_attempt_at + repair_after, "queued until its next_attempt_at")
        return Repair((release_message(run),), later, "queued: fire sent again")
    sends: list[DispatchMessage] = []
    checks: list[datetime] = []
    why: list[str] = []

    def overdue(due: datetime, message: DispatchMessage, reason: str) -> None:
        """Check again at ``due``; once it has passed, send ``message`` again (and check later)."""
        if due > now:
            checks.append(due)
        else:
            sends.append(message)
            checks.append(later)
            why.append(reason)

    if _owed(run):
        ended = max((r.ended_at for r in run.actions if r.ended_at), default=run.started_at or now)
        overdue(ended + repair_after, nudge_message(run), "run not moved on: nudged")
    for r in run.actions:
        sp = peek(run, r.id)
        if r.status is StepStatus.running and sp.poll is None:
            if sp.lease_until and sp.lease_until > now:
                checks.append(sp.lease_until + timedelta(seconds=2))
                continue
            sends.append(step_message(run, r.id, "retry"))
            checks.append(now + FIRST_CHECK)
            why.append(f"{r.id}: lease lapsed: taken over")
        elif r.status is StepStatus.running:
            quiet_until = (sp.polled_at or now) + timedelta(seconds=MAX_POLL_SECONDS) + repair_after
            overdue(quiet_until, step_message(run, r.id, "poll"), f"{r.id}: poll chain silent: polled again")
        elif r.status is StepStatus.waiting:
            due = (sp.decide_by or now) + repair_after
            overdue(due, step_message(run, r.id, "poll"), f"{r.id}: approval timeout lost: sent again")
        elif r.status is StepStatus.pending and (r.next_attempt_at or sp.sent_at):
            due = (r.next_attempt_at or sp.sent_at or now) + repair_after
            retry = step_message(run, r.id, "retry", r.attempt + 1)
            overdue(due, retry, f"{r.id}: start message lost: sent again")
    check_at = min(checks) if checks else later
    return Repair(tuple(sends), check_at, "; ".join(why) or "in flight")
