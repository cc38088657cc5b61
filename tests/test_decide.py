"""The run state machine (``routines.decide``) as tables: facts in, the next step out. Pure: no store,
no queue, no clock but the ``now`` in the facts."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from routines import decide, graph
from routines.agents.base import AgentError, AgentOutcome
from routines.decide import (
    LEASE,
    CancelAgent,
    CompleteTimer,
    Done,
    Facts,
    Load,
    PollAgent,
    Send,
    StartAgent,
    Unwatch,
    Wait,
    Write,
)
from routines.errors import Conflict, NotFound
from routines.messages import DispatchMessage
from routines.models import (
    ActionResult,
    ApprovalStep,
    Concurrency,
    InvocationAction,
    OverlapPolicy,
    RetryPolicy,
    Routine,
    RoutineState,
    Run,
    RunPlan,
    RunProgress,
    RunStatus,
    RunTrigger,
    ScheduleTrigger,
    StepProgress,
    StepStatus,
    TimerTrigger,
    idempotency_key,
    manual_run_id,
    scheduled_run_id,
)
from routines.store import Slot, SlotWrite
from tests.helpers import make_routine

FIRE = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
RID = "rt_00000000000000aa"
RUN_ID = scheduled_run_id(RID, FIRE)
OTHER = scheduled_run_id(RID, FIRE - timedelta(days=1))
OWNER = "me"


def routine(**changes: Any) -> Routine:
    """The routine, with ``changes`` set as they are (not validated: states a request cannot make)."""
    base = make_routine(
        "daily",
        id=RID,
        actions=[InvocationAction(type="invocation", agent_id="a", input="x")],
        now=FIRE - timedelta(days=2),
    )
    return base.model_copy(update=changes)


def message(
    kind: str = "fire",
    attempt: int = 1,
    run_id: str = RUN_ID,
    version: int = 1,
    dispatch_at: datetime | None = None,
) -> DispatchMessage:
    return DispatchMessage.model_validate(
        {
            "kind": kind,
            "routine_id": RID,
            "scheduled_for": FIRE,
            "dispatch_at": dispatch_at,
            "routine_version": version,
            "attempt": attempt,
            "run_id": run_id,
        }
    )


STEP_FIELDS = set(StepProgress.model_fields)


def run(status: RunStatus = RunStatus.running, attempt: int = 1, **progress: Any) -> Run:
    """A run of ``status`` whose first step is where the run is: its step-level bookkeeping (lease,
    poll handle, deadlines) given as keywords like the run-level ones."""
    plan = progress.pop("plan", RunPlan.of(routine()))
    step_fields = {k: progress.pop(k) for k in list(progress) if k in STEP_FIELDS}
    next_attempt_at = progress.pop("next_attempt_at", None)
    ids = graph.step_ids(plan.actions) if plan else []
    actions = [ActionResult(index=i, id=step) for i, step in enumerate(ids)]
    if actions and status is not RunStatus.queued:
        first = actions[0]
        first.attempt, first.started_at = attempt, FIRE
        first.status = {
            RunStatus.running: StepStatus.running,
            RunStatus.retrying: StepStatus.pending,
        }.get(status, StepStatus.succeeded)
        first.next_attempt_at = next_attempt_at if status is RunStatus.retrying else None
    return Run(
        id=progress.pop("id", RUN_ID),
        routine_id=RID,
        trigger=progress.pop("trigger", RunTrigger.schedule),
        scheduled_for=FIRE,
        status=status,
        attempt=attempt,
        max_attempts=4,
        started_at=FIRE if status is not RunStatus.queued else None,
        next_attempt_at=next_attempt_at,
        idempotency_key=idempotency_key(RID, FIRE),
        actions=actions,
        progress=RunProgress(
            plan=plan,
            routine_version=1,
            steps={ids[0]: StepProgress(**step_fields)} if ids and step_fields else {},
            **progress,
        ),
    )


def facts(m: DispatchMessage | None = None, now: datetime = FIRE, **known: Any) -> Facts:
    return Facts(m or message(), now, OWNER, **known)


def after(seconds: float) -> datetime:
    return FIRE + timedelta(seconds=seconds)


# --- starting a fire ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(facts(now=after(-2)), Wait(2.0), id="early_fire_waits_for_its_time"),
        pytest.param(facts(now=after(-4)), Wait(decide.MAX_EARLY_WAIT), id="early_wait_is_bounded"),
        pytest.param(
            facts(now=after(-60)),
            Done((Send(message(), 60.0),), "early"),
            id="far_too_early_goes_back_to_the_queue",
        ),
        pytest.param(
            facts(message(dispatch_at=after(30)), now=after(1)),
            Done((Send(message(dispatch_at=after(30)), 29.0),), "early"),
            id="a_jittered_fire_waits_for_its_dispatch_time",
        ),
        pytest.param(
            facts(message(dispatch_at=after(3)), now=after(1)),
            Wait(2.0),
            id="a_jittered_fire_waits_out_the_rest",
        ),
        pytest.param(facts(), Load("routine"), id="fire_reads_its_routine"),
        pytest.param(facts(routine=None), Load("run"), id="deleted_routine_looks_for_the_run"),
        pytest.param(
            facts(routine=None, run=None),
            Done((Unwatch(RID, RUN_ID),), "the routine was deleted"),
            id="deleted_routine_without_run_is_dropped",
        ),
        pytest.param(
            facts(routine=routine(state=RoutineState.disabled, schedule_version=2, version=2), run=None),
            Done((Unwatch(RID, RUN_ID, 1),), "stale fire: the routine was disabled or rescheduled"),
            id="disabled_routine_fire_is_stale",
        ),
        pytest.param(
            facts(routine=routine(schedule_version=3, version=3), run=None),
            Done((Unwatch(RID, RUN_ID, 1),), "stale fire: the routine was disabled or rescheduled"),
            id="fire_of_an_older_schedule_is_stale",
        ),
        pytest.param(
            facts(
                routine=routine(trigger=ScheduleTrigger(type="schedule", cron_expression="0 7 * * *")),
                run=None,
            ),
            Done((Unwatch(RID, RUN_ID, 1),), "stale fire: the routine was disabled or rescheduled"),
            id="fire_the_schedule_no_longer_has_is_stale",
        ),
    ],
)
def test_start(given: Facts, expected: Any) -> None:
    assert decide.next_step(given) == expected


def test_a_fresh_fire_inserts_its_run_claimed_with_the_slot_and_starts_the_agent() -> None:
    step = decide.next_step(facts(routine=routine()))
    assert isinstance(step, Write)
    assert step.etag is None, "insert: the run is new"
    assert step.slot == SlotWrite(holder=RUN_ID)
    assert step.effects == (StartAgent("step1"),)
    r = step.run
    sp = r.progress.steps["step1"]
    assert (r.status, r.attempt, sp.lease_owner, sp.lease_until) == (
        RunStatus.running,
        1,
        OWNER,
        FIRE + LEASE,
    )
    assert r.progress.plan == RunPlan.of(routine()), "the run snapshots its routine"


def test_a_message_newer_than_the_routine_read_is_not_stale() -> None:
    """Routine writes land before their fires: a newer version means a later edit, never a drop."""
    step = decide.next_step(facts(message(version=5), routine=routine()))
    assert isinstance(step, Write) and step.run.status is RunStatus.running


def test_allow_all_takes_no_slot() -> None:
    step = decide.next_step(facts(routine=routine(overlap_policy=OverlapPolicy.allow_all)))
    assert isinstance(step, Write) and step.slot is None


def test_a_timer_fire_completes_its_timer_with_the_at_it_fired() -> None:
    timer = routine(trigger=TimerTrigger(type="timer", at=FIRE))
    step = decide.next_step(facts(routine=timer))
    assert isinstance(step, Write)
    assert step.effects == (CompleteTimer(RID, FIRE), StartAgent("step1"))


# --- an existing run ----------------------------------------------------------------------------


def existing(m: DispatchMessage, r: Run, now: datetime = FIRE, **more: Any) -> Any:
    return decide.next_step(facts(m, now, routine=routine(), run=r, etag="e1", **more))


def test_a_duplicate_of_a_leased_attempt_comes_back_when_the_lease_ends() -> None:
    r = run(lease_owner="other", lease_until=after(20))
    assert existing(message(), r, now=after(5)) == Done((Send(message(), 16.0),), "leased by another worker")


def test_a_lapsed_lease_is_taken_over_with_the_same_attempt() -> None:
    r = run(lease_owner="other", lease_until=after(20))
    step = existing(message(), r, now=after(21))
    assert isinstance(step, Write) and step.etag == "e1"
    assert (step.run.attempt, step.run.progress.steps["step1"].lease_owner) == (1, OWNER)
    assert step.effects == (StartAgent("step1"),)


def test_a_start_message_of_a_polled_run_resends_its_poll_when_the_chain_went_quiet() -> None:
    quiet = run(poll={"h": 1}, attempt_started_at=FIRE, polled_at=FIRE)
    step = existing(message("retry"), quiet, now=after(61))
    assert step == Done(
        (Send(decide.step_message(run(), "step1", "poll"), decide.MIN_POLL_SECONDS),),
        "started; its polls drive it",
    )


def test_an_extra_message_of_a_live_poll_chain_does_not_start_a_second_chain() -> None:
    """A leftover message (a permit's look-again, a duplicate) of a step whose polls are alive."""
    live = run(poll={"h": 1}, attempt_started_at=FIRE, polled_at=after(40))
    assert existing(message("retry"), live, now=after(61)) == Done((), "started; its polls drive it")


def test_the_fire_again_resends_the_first_poll_at_once() -> None:
    fresh = run(poll={"h": 1}, attempt_started_at=FIRE)
    step = existing(message(), fresh, now=after(2))
    assert step == Done(
        (Send(decide.step_message(run(), "step1", "poll"), decide.MIN_POLL_SECONDS),),
        "started; its polls drive it",
    )


def test_a_message_of_an_earlier_attempt_does_nothing() -> None:
    assert existing(message("retry", 1), run(attempt=2)) == Done((), "a message of an earlier attempt")


@pytest.mark.parametrize(
    ("m", "now", "expected_kind"),
    [
        pytest.param(message("retry", 1), after(5), "resend", id="failed_attempts_message_resends_the_retry"),
        pytest.param(message("retry", 2), after(5), "requeue", id="retry_too_early_comes_back"),
        pytest.param(message("retry", 2), after(59), "wait", id="retry_a_moment_early_waits"),
        pytest.param(message("retry", 2), after(61), "claim", id="retry_on_time_claims_attempt_2"),
        pytest.param(message("retry", 3), after(61), "ignore", id="retry_of_another_attempt_is_ignored"),
    ],
)
def test_retrying(m: DispatchMessage, now: datetime, expected_kind: str) -> None:
    r = run(RunStatus.retrying, 1, next_attempt_at=after(60))
    step = existing(m, r, now)
    if expected_kind == "resend":
        assert step == Done((Send(decide.step_message(r, "step1", "retry", 2), 55.0),), "resent the retry")
    elif expected_kind == "requeue":
        assert step == Done((Send(m, 55.0),), "too early for the retry")
    elif expected_kind == "wait":
        assert step == Wait(1.0)
    elif expected_kind == "claim":
        assert isinstance(step, Write) and (step.run.status, step.run.attempt) == (RunStatus.running, 2)
    else:
        assert step == Done((), "not this step's next attempt")


def test_a_retry_of_a_routine_disabled_since_ends_cancelled() -> None:
    disabled = routine(state=RoutineState.disabled, version=2, schedule_version=2)
    r = run(RunStatus.retrying, 1, next_attempt_at=after(60))
    step = decide.next_step(facts(message("retry", 2), after(61), routine=disabled, run=r, etag="e1"))
    assert isinstance(step, Write)
    assert (step.run.status, step.run.error_message) == (
        RunStatus.cancelled,
        "cancelled: the routine was disabled",
    )


def test_a_manual_run_queued_while_disabled_still_runs() -> None:
    manual = manual_run_id(FIRE)
    disabled = routine(state=RoutineState.disabled, version=2, schedule_version=2)
    r = run(RunStatus.queued, 0, id=manual, trigger=RunTrigger.manual, plan=None)
    r.progress.routine_version = 2
    step = decide.next_step(facts(message(run_id=manual), routine=disabled, run=r, etag="e1"))
    assert isinstance(step, Write) and step.run.status is RunStatus.running


def test_max_age_fails_an_attempt_that_would_start_too_late() -> None:
    late = routine(retry_policy=RetryPolicy(max_attempts=3, delays_seconds=[60], max_age_seconds=30))
    step = decide.next_step(facts(now=after(31), routine=late))
    assert isinstance(step, Write) and step.run.status is RunStatus.failed
    assert "max_age_seconds (30s)" in (step.run.error_message or "")


# --- overlap ------------------------------------------------------------------------------------


def overlap(policy: OverlapPolicy, holder: Run | None, buffered: str | None = None) -> Any:
    slot = Slot(OTHER, buffered, "s1")
    return decide.next_step(
        facts(routine=routine(overlap_policy=policy), run=None, contended=True, slot=slot, holder=holder)
    )


ACTIVE_HOLDER = run(id=OTHER, lease_owner="x", lease_until=after(30))


def test_contended_slot_is_read_before_deciding() -> None:
    assert decide.next_step(facts(routine=routine(), run=None, contended=True)) == Load("slot")
    slot = Slot(OTHER, None, "s1")
    assert decide.next_step(facts(routine=routine(), run=None, contended=True, slot=slot)) == Load("holder")


def test_skip_records_a_skipped_run() -> None:
    step = overlap(OverlapPolicy.skip, ACTIVE_HOLDER)
    assert isinstance(step, Write) and step.run.status is RunStatus.skipped and step.slot is None
    assert step.run.error_message == (
        f"skipped: run {OTHER} of this routine was still running (overlap_policy skip)"
    )


def test_buffer_one_waits_behind_the_holder() -> None:
    step = overlap(OverlapPolicy.buffer_one, ACTIVE_HOLDER)
    assert isinstance(step, Write) and step.run.status is RunStatus.queued
    assert step.slot == SlotWrite(holder=OTHER, buffered=RUN_ID, etag="s1")
    assert step.effects == ()


def test_a_duplicate_of_a_buffered_fire_does_not_start_it() -> None:
    waiting = run(RunStatus.queued, 0, holds_slot=True, plan=None)  # buffered: not claimed yet
    slot = Slot(OTHER, RUN_ID, "s1")
    step = decide.next_step(
        facts(
            routine=routine(overlap_policy=OverlapPolicy.buffer_one),
            run=waiting,
            etag="e",
            slot=slot,
            holder=ACTIVE_HOLDER,
        )
    )
    assert step == Done((), "already buffered")


def test_buffer_one_skips_a_second_waiting_fire() -> None:
    step = overlap(OverlapPolicy.buffer_one, ACTIVE_HOLDER, buffered="run_somebody_else")
    assert isinstance(step, Write) and step.run.status is RunStatus.skipped


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param(None, id="holder_run_gone"),
        pytest.param(run(RunStatus.succeeded, id=OTHER), id="holder_finished"),
        pytest.param(run(id=OTHER, lease_until=after(-3600)), id="holder_abandoned"),
    ],
)
def test_a_slot_whose_holder_is_not_active_is_taken_over(holder: Run | None) -> None:
    step = overlap(OverlapPolicy.skip, holder)
    assert isinstance(step, Write) and step.run.status is RunStatus.running
    assert step.slot == SlotWrite(holder=RUN_ID, buffered=None, etag="s1")
    assert step.effects == (StartAgent("step1"),)


# --- after the agent answered -------------------------------------------------------------------


def answered(
    outcome: AgentOutcome | AgentError,
    r: Run | None = None,
    now: datetime = FIRE + timedelta(seconds=1),
    **more: Any,
) -> Any:
    r = r or run(
        lease_owner=OWNER, lease_until=after(45), holds_slot=True, slot_etag="s1", attempt_started_at=FIRE
    )
    return decide.next_step(
        facts(
            routine=routine(),
            run=r,
            etag="e2",
            now=now,
            called="step1",
            called_attempt=1,
            outcome=outcome,
            **more,
        )
    )


def test_done_finishes_and_releases_the_slot_without_reading_it() -> None:
    step = answered(AgentOutcome(done=True, output="ok"))
    assert isinstance(step, Write) and step.run.status is RunStatus.succeeded
    assert step.slot == SlotWrite(holder=None, etag="s1")
    assert step.effects == (Unwatch(RID, RUN_ID), decide.Finished(RunStatus.succeeded))


def test_a_contended_release_hands_the_slot_to_the_buffered_run() -> None:
    buffered = scheduled_run_id(RID, FIRE + timedelta(days=1))
    step = answered(AgentOutcome(done=True), contended=True, slot=Slot(RUN_ID, buffered, "s2"))
    assert isinstance(step, Write)
    assert step.slot == SlotWrite(holder=buffered, buffered=None, etag="s2")
    assert step.run.progress.handed_to == buffered
    [release] = [e for e in step.effects if isinstance(e, Send)]
    assert (release.message.kind, release.message.run_id, release.message.attempt) == ("retry", buffered, 1)
    assert release.message.scheduled_for == FIRE + timedelta(days=1), "read from the run id"


def test_the_run_finishes_with_its_snapshot_even_after_an_edit() -> None:
    """An action added by PATCH during the run does not exist for the run."""
    edited = routine(actions=[InvocationAction(type="invocation", agent_id="a", input="x")] * 2, version=2)
    r = run(lease_owner=OWNER, lease_until=after(45), attempt_started_at=FIRE)
    step = decide.next_step(
        facts(
            routine=edited,
            run=r,
            etag="e2",
            now=after(1),
            called="step1",
            called_attempt=1,
            outcome=AgentOutcome(done=True),
        )
    )
    assert isinstance(step, Write) and step.run.status is RunStatus.succeeded


def test_done_with_more_actions_saves_progress_and_starts_the_next_with_a_fresh_lease() -> None:
    two = RunPlan.of(routine(actions=[InvocationAction(type="invocation", agent_id="a", input="x")] * 2))
    r = run(plan=two, lease_owner=OWNER, lease_until=after(45), attempt_started_at=FIRE)
    step = answered(AgentOutcome(done=True, output="one"), r, now=after(20))
    assert isinstance(step, Write) and step.run.status is RunStatus.running
    assert [a.status for a in step.run.actions] == [StepStatus.succeeded, StepStatus.running]
    assert step.run.progress.steps["step2"].lease_until == after(20) + LEASE
    assert step.effects == (StartAgent("step2"),)


def test_pending_after_start_records_the_handle_and_sends_a_poll() -> None:
    step = answered(AgentOutcome(done=False, handle={"id": "h"}, poll_after=5))
    assert isinstance(step, Write)
    p = step.run.progress.steps["step1"]
    assert (p.poll, p.lease_owner, p.polled_at) == ({"id": "h"}, None, after(1))
    assert p.poll_deadline == FIRE + timedelta(seconds=600)
    [send] = step.effects
    assert isinstance(send, Send) and send.message.kind == "poll" and send.delay == 5


def test_pending_again_between_heartbeats_only_resends_the_poll() -> None:
    r = run(poll={"id": "h"}, polled_at=after(1), poll_deadline=after(600), attempt_started_at=FIRE)
    poll = message("poll")
    step = decide.next_step(
        facts(
            poll,
            after(10),
            routine=routine(),
            run=r,
            etag="e",
            called="step1",
            called_attempt=1,
            outcome=AgentOutcome(done=False),
        )
    )
    assert step == Done((Send(poll, 2.5),), "still pending")


def test_pending_past_the_heartbeat_writes_the_run() -> None:
    r = run(poll={"id": "h"}, polled_at=after(1), poll_deadline=after(600), attempt_started_at=FIRE)
    step = decide.next_step(
        facts(
            message("poll"),
            after(40),
            routine=routine(),
            run=r,
            etag="e",
            called="step1",
            called_attempt=1,
            outcome=AgentOutcome(done=False),
        )
    )
    assert isinstance(step, Write) and step.run.progress.steps["step1"].polled_at == after(40)


def test_a_retriable_error_schedules_the_next_attempt() -> None:
    step = answered(AgentError("503", retriable=True))
    assert isinstance(step, Write) and step.run.status is RunStatus.retrying
    assert step.run.next_attempt_at == after(61)
    assert Send(decide.step_message(step.run, "step1", "retry", 2), 60.0) in step.effects


def test_a_client_error_fails_the_run() -> None:
    step = answered(AgentError("400", retriable=False))
    assert isinstance(step, Write) and step.run.status is RunStatus.failed
    assert step.slot == SlotWrite(holder=None, etag="s1")


@pytest.mark.parametrize("hint", [1e8, 1e12, float("inf")], ids=["1e8", "1e12", "infinite"])
def test_a_huge_retry_after_is_capped_at_the_queue_limit(hint: float) -> None:
    step = answered(AgentError("429", retriable=True, retry_after=hint))
    assert isinstance(step, Write) and step.run.status is RunStatus.retrying
    assert step.run.next_attempt_at is not None
    assert step.run.next_attempt_at <= after(1) + timedelta(days=7)


def test_retry_after_beyond_max_age_fails_instead_of_holding_the_slot() -> None:
    policy = RetryPolicy(max_attempts=4, delays_seconds=[60], max_age_seconds=3600)
    r = run(
        plan=RunPlan.of(routine(retry_policy=policy)),
        holds_slot=True,
        slot_etag="s1",
        attempt_started_at=FIRE,
    )
    step = answered(AgentError("429", retriable=True, retry_after=1e8), r)
    assert isinstance(step, Write) and step.run.status is RunStatus.failed
    assert "max_age_seconds" in (step.run.error_message or "")


# --- polls --------------------------------------------------------------------------------------


def polled(r: Run, now: datetime, current: Routine | None) -> Any:
    return decide.next_step(facts(message("poll"), now, run=r, etag="e", routine=current))


POLLED = run(poll={"id": "h"}, polled_at=FIRE, poll_deadline=after(600), attempt_started_at=FIRE)


def test_a_poll_polls_the_agent() -> None:
    assert polled(POLLED, after(5), routine()) == Done((PollAgent("step1"),), "poll the agent")


def test_a_poll_past_the_deadline_cancels_and_fails_the_attempt() -> None:
    step = polled(POLLED, after(600), routine())
    assert isinstance(step, Write) and step.run.status is RunStatus.retrying
    assert step.effects[0] == CancelAgent(POLLED, "step1")


@pytest.mark.parametrize(
    ("current", "reason"),
    [
        pytest.param(None, "the routine was deleted while its agent ran", id="deleted"),
        pytest.param(
            routine(state=RoutineState.disabled, version=2, schedule_version=2),
            "the routine was disabled",
            id="disabled",
        ),
    ],
)
def test_delete_and_disable_cancel_the_agent_run_in_flight(current: Routine | None, reason: str) -> None:
    step = polled(POLLED, after(5), current)
    assert isinstance(step, Write)
    assert (step.run.status, step.run.error_message) == (RunStatus.cancelled, reason)
    assert step.effects[0] == CancelAgent(POLLED, "step1")


def test_a_stale_poll_does_nothing() -> None:
    assert polled(run(RunStatus.retrying, next_attempt_at=after(60)), after(5), routine()) == Done(
        (), "a stale poll"
    )


# --- giving up ----------------------------------------------------------------------------------


def test_a_fire_that_never_got_a_run_is_recorded_failed_when_its_message_gives_up() -> None:
    assert decide.next_step(facts(run=None, give_up="boom")) == Load("routine"), "its concurrency key"
    step = decide.next_step(facts(run=None, routine=routine(), give_up="RuntimeError: boom"))
    assert isinstance(step, Write) and step.etag is None
    assert step.run.status is RunStatus.failed
    assert step.run.error_message == "its dispatch message failed on every delivery: RuntimeError: boom"


def test_a_running_run_fails_when_its_message_gives_up() -> None:
    r = run(holds_slot=True, slot_etag="s1")
    step = decide.next_step(facts(run=r, etag="e", routine=None, give_up="x"))
    assert isinstance(step, Write) and step.run.status is RunStatus.failed
    assert step.slot == SlotWrite(holder=None, etag="s1")


def test_a_give_up_gives_back_a_permit_the_run_never_recorded() -> None:
    """A delivery took a permit (or a place in line) and died before writing the run; the message
    then failed on every delivery: the permit must not stay with a run that is over."""
    keyed = routine(concurrency=Concurrency(key="openai", limit=2))
    step = decide.next_step(facts(run=None, routine=keyed, give_up="boom"))
    assert isinstance(step, Write) and step.run.status is RunStatus.failed
    assert decide.ReleasePermit("openai", RUN_ID) in step.effects
    assert step.run.progress.permit == "openai", "kept, so the repair pass can give it back too"


# --- the repair pass ----------------------------------------------------------------------------

FIRE_MSG = message()
AFTER = timedelta(seconds=90)


@pytest.mark.parametrize(
    ("r", "now", "send_kind", "check_at"),
    [
        pytest.param(None, after(10), None, FIRE + decide.FIRST_CHECK, id="absent_not_due_yet"),
        pytest.param(None, after(60), "fire", after(60) + decide.FIRST_CHECK, id="absent_fire_resent"),
        pytest.param(run(RunStatus.succeeded), after(60), None, None, id="terminal_unwatched"),
        pytest.param(run(lease_until=after(100)), after(60), None, after(102), id="leased_left_alone"),
        pytest.param(
            run(lease_until=after(45)),
            after(60),
            "retry",
            after(60) + decide.FIRST_CHECK,
            id="lapsed_lease_taken_over",
        ),
        pytest.param(
            run(2, lease_until=after(45)) if False else run(attempt=2, lease_until=after(45)),
            after(60),
            "retry",
            after(60) + decide.FIRST_CHECK,
            id="lapsed_lease_of_a_retry",
        ),
        pytest.param(
            run(poll={"h": 1}, polled_at=after(50)),
            after(60),
            None,
            after(50 + 30 + 90),
            id="live_poll_chain",
        ),
        pytest.param(
            run(poll={"h": 1}, polled_at=after(0)),
            after(200),
            "poll",
            after(200) + AFTER,
            id="silent_poll_chain",
        ),
        pytest.param(
            run(RunStatus.retrying, next_attempt_at=after(300)), after(60), None, after(390), id="retry_later"
        ),
        pytest.param(
            run(RunStatus.retrying, next_attempt_at=after(30)),
            after(200),
            "retry",
            after(200) + AFTER,
            id="lost_retry",
        ),
        pytest.param(
            run(RunStatus.queued, attempt=0),
            after(200),
            "retry",
            after(200) + AFTER,
            id="queued_released_again",
        ),
    ],
)
def test_repair(r: Run | None, now: datetime, send_kind: str | None, check_at: datetime | None) -> None:
    decision = decide.repair(r, FIRE_MSG, now, AFTER)
    assert [m.kind for m in decision.sends] == ([send_kind] if send_kind else []), decision.why
    assert decision.check_at == check_at


def test_repair_drops_the_watch_of_a_manual_run_never_written() -> None:
    decision = decide.repair(None, message(run_id=manual_run_id(FIRE)), after(60), AFTER)
    assert (decision.sends, decision.check_at) == ((), None)


def test_next_step_is_pure() -> None:
    given = facts(routine=routine())
    assert decide.next_step(given) == decide.next_step(dataclasses.replace(given))


# --- steps: readiness, conditions, approvals, run status ----------------------------------------


def _inv(step: str, **more: Any) -> InvocationAction:
    return InvocationAction.model_validate(
        {"type": "invocation", "agent_id": step, "input": "x", "id": step, **more}
    )


GRAPH = routine(
    actions=[
        _inv("a"),
        _inv("b", after=["a"]),
        _inv("c", after=["a"]),
        _inv("d", after=["b", "c"]),
        _inv("page", after=["a"], when={"step": "a", "path": "severity", "op": "eq", "value": "high"}),
        _inv("fix", after=["b"], when={"step": "b", "status": "failed"}),
    ]
)
GATE = routine(actions=[_inv("a"), ApprovalStep(type="approval", id="ok", timeout_seconds=600), _inv("send")])


def graph_run(current: Routine, done: dict[str, StepStatus], outputs: dict[str, str] | None = None) -> Run:
    """A claimed run of ``current`` whose steps in ``done`` have ended; the others are pending."""
    plan = RunPlan.of(current)
    r = run(plan=plan)
    r.actions = [ActionResult(index=i, id=s) for i, s in enumerate(graph.step_ids(plan.actions))]
    for result in r.actions:
        if result.id in done:
            result.status, result.attempt = done[result.id], 1
            result.output = (outputs or {}).get(result.id)
    r.progress.steps = {}
    return r


def test_a_claim_starts_the_first_step_and_nothing_that_waits_for_it() -> None:
    step = decide.next_step(facts(routine=GRAPH))
    assert isinstance(step, Write) and step.effects == (StartAgent("a"),)
    assert {a.id: a.status.value for a in step.run.actions} == {
        "a": "running",
        "b": "pending",
        "c": "pending",
        "d": "pending",
        "page": "pending",
        "fix": "pending",
    }


def test_steps_that_start_with_the_run_start_together() -> None:
    together = routine(actions=[_inv("x", after=[]), _inv("y", after=[]), _inv("z", after=[])])
    step = decide.next_step(facts(routine=together))
    assert isinstance(step, Write)
    sends = [e for e in step.effects if isinstance(e, Send)]
    assert [(s.message.kind, s.message.step, s.message.attempt, s.delay) for s in sends] == [
        ("retry", "y", 1, 0.0),
        ("retry", "z", 1, 0.0),
    ]
    assert step.effects[-1] == StartAgent("x"), "the worker takes one itself, after sending the others"


def _finished(current: Routine, r: Run, step_id: str, outcome: AgentOutcome | AgentError) -> Any:
    leased = r.model_copy(deep=True)
    res = decide.result(leased, step_id)
    res.status, res.attempt = StepStatus.running, 1
    leased.progress.steps[step_id] = StepProgress(
        lease_owner=OWNER, lease_until=after(45), attempt_started_at=FIRE
    )
    return decide.next_step(
        facts(
            routine=current,
            run=leased,
            etag="e",
            now=after(1),
            called=step_id,
            called_attempt=1,
            outcome=outcome,
        )
    )


@pytest.mark.parametrize(
    ("output", "started", "messages", "skipped"),
    [
        pytest.param('{"severity": "high"}', "b", ["c", "page"], [], id="high_pages"),
        pytest.param('{"severity": "low"}', "b", ["c"], ["page"], id="low_skips_the_page"),
        pytest.param("not json", "b", ["c"], ["page"], id="text_output_fails_a_path_condition"),
    ],
)
def test_when_a_step_succeeds_its_ready_dependents_are_decided_at_once(
    output: str, started: str, messages: list[str], skipped: list[str]
) -> None:
    step = _finished(GRAPH, graph_run(GRAPH, {}), "a", AgentOutcome(done=True, output=output))
    assert isinstance(step, Write)
    assert step.effects[-1] == StartAgent(started)
    assert [e.message.step for e in step.effects if isinstance(e, Send)] == messages
    assert [a.id for a in step.run.actions if a.status is StepStatus.skipped] == skipped
    assert step.run.status is RunStatus.running


def test_a_step_waits_for_all_its_dependencies() -> None:
    r = graph_run(GRAPH, {"a": StepStatus.succeeded}, {"a": "{}"})
    r.progress.steps["c"] = StepProgress(lease_owner="other", lease_until=after(40))
    decide.result(r, "c").status = StepStatus.running
    decide.result(r, "page").status = StepStatus.skipped
    step = _finished(GRAPH, r, "b", AgentOutcome(done=True, output="b"))
    assert isinstance(step, Write) and not any(isinstance(e, StartAgent | Send) for e in step.effects)
    assert decide.result(step.run, "d").status is StepStatus.pending, "c is still running"
    assert decide.result(step.run, "fix").status is StepStatus.skipped, "its when (b failed) is false"


def test_a_failed_step_skips_its_dependents_and_runs_its_handler() -> None:
    r = graph_run(GRAPH, {"a": StepStatus.succeeded, "c": StepStatus.succeeded, "page": StepStatus.skipped})
    step = _finished(GRAPH, r, "b", AgentError("400", retriable=False))
    assert isinstance(step, Write)
    assert decide.result(step.run, "b").status is StepStatus.failed
    assert decide.result(step.run, "d").status is StepStatus.skipped
    assert step.effects[-1] == StartAgent("fix")


@pytest.mark.parametrize(
    ("fix", "status"),
    [
        pytest.param(StepStatus.succeeded, RunStatus.succeeded, id="handled_failure_succeeds"),
        pytest.param(StepStatus.failed, RunStatus.failed, id="failed_handler_fails"),
    ],
)
def test_the_run_status_when_every_step_is_done(fix: StepStatus, status: RunStatus) -> None:
    done = {
        "a": StepStatus.succeeded,
        "b": StepStatus.failed,
        "c": StepStatus.succeeded,
        "d": StepStatus.skipped,
        "page": StepStatus.skipped,
    }
    r = graph_run(GRAPH, done)
    decide.result(r, "b").error_message = "attempt 1: 400"
    step = _finished(
        GRAPH,
        r,
        "fix",
        AgentOutcome(done=True) if fix is StepStatus.succeeded else AgentError("x", retriable=False),
    )
    assert isinstance(step, Write) and step.run.status is status
    if status is RunStatus.failed:
        assert step.run.error_message == "step fix: attempt 1: x"


def test_a_retry_of_one_step_leaves_the_others_running() -> None:
    r = graph_run(GRAPH, {"a": StepStatus.succeeded})
    decide.result(r, "c").status = StepStatus.running
    r.progress.steps["c"] = StepProgress(lease_owner="other", lease_until=after(40))
    step = _finished(GRAPH, r, "b", AgentError("503", retriable=True))
    assert isinstance(step, Write)
    b = decide.result(step.run, "b")
    assert (b.status, b.attempt, b.next_attempt_at) == (StepStatus.pending, 1, after(61))
    assert step.run.status is RunStatus.running, "c still runs"
    [send] = [e for e in step.effects if isinstance(e, Send)]
    assert (send.message.kind, send.message.step, send.message.attempt, send.delay) == ("retry", "b", 2, 60.0)


def test_an_answer_for_a_step_decided_elsewhere_is_dropped() -> None:
    r = graph_run(GRAPH, {"a": StepStatus.succeeded, "b": StepStatus.succeeded})
    step = decide.next_step(
        facts(routine=GRAPH, run=r, etag="e", called="b", called_attempt=1, outcome=AgentOutcome(done=True))
    )
    assert step == Done((), "the step was decided elsewhere")


def test_an_approval_holds_the_run_waiting_with_its_timeout_queued() -> None:
    step = _finished(GATE, graph_run(GATE, {}), "a", AgentOutcome(done=True, output="draft"))
    assert isinstance(step, Write) and step.run.status is RunStatus.waiting
    ok = decide.result(step.run, "ok")
    assert (ok.status, ok.started_at) == (StepStatus.waiting, after(1))
    assert step.run.progress.steps["ok"].decide_by == after(601)
    [send] = step.effects
    assert isinstance(send, Send) and (send.message.kind, send.message.step, send.delay) == (
        "poll",
        "ok",
        600,
    )


def _waiting_gate() -> Run:
    r = graph_run(GATE, {"a": StepStatus.succeeded})
    ok = decide.result(r, "ok")
    ok.status, ok.attempt = StepStatus.waiting, 1
    r.progress.steps["ok"] = StepProgress(decide_by=after(600))
    r.status = RunStatus.waiting
    return r


def test_an_approval_decided_through_the_api_is_moved_on_by_its_poll() -> None:
    decided = decide.decide_approval(_waiting_gate(), "ok", True, "fine", after(30))
    ok = decide.result(decided, "ok")
    assert (ok.status, ok.comment, ok.decided_at) == (StepStatus.succeeded, "fine", after(30))
    m = decide.step_message(decided, "ok", "poll")
    step = decide.next_step(facts(m, after(31), routine=GATE, run=decided, etag="e"))
    assert isinstance(step, Write)
    assert [e.message.step for e in step.effects if isinstance(e, Send)] == ["send"]


@pytest.mark.parametrize(
    ("verdict", "status", "error"),
    [
        pytest.param(False, StepStatus.failed, "rejected: no", id="reject"),
        pytest.param(True, StepStatus.succeeded, None, id="approve"),
    ],
)
def test_decide_approval(verdict: bool, status: StepStatus, error: str | None) -> None:
    decided = decide.decide_approval(_waiting_gate(), "ok", verdict, "no" if not verdict else None, after(5))
    ok = decide.result(decided, "ok")
    assert (ok.status, ok.error_message, ok.ended_at) == (status, error, after(5))


@pytest.mark.parametrize(
    ("step_id", "error"),
    [pytest.param("nope", NotFound, id="unknown_step"), pytest.param("a", Conflict, id="not_an_approval")],
)
def test_decide_approval_refuses(step_id: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        decide.decide_approval(_waiting_gate(), step_id, True, None, after(5))
    decided = decide.decide_approval(_waiting_gate(), "ok", True, None, after(5))
    with pytest.raises(Conflict):
        decide.decide_approval(decided, "ok", False, None, after(6))


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(after(300), "requeue", id="early_poll_comes_back"),
        pytest.param(after(599), "wait", id="a_moment_early_waits"),
        pytest.param(after(600), "timeout", id="timeout_rejects"),
    ],
)
def test_an_approvals_timeout(now: datetime, expected: str) -> None:
    r = _waiting_gate()
    m = decide.step_message(r, "ok", "poll")
    step = decide.next_step(facts(m, now, routine=GATE, run=r, etag="e"))
    if expected == "requeue":
        assert step == Done((Send(m, 300.0),), "not due yet")
    elif expected == "wait":
        assert step == Wait(1.0)
    else:
        assert isinstance(step, Write) and step.run.status is RunStatus.failed
        ok = decide.result(step.run, "ok")
        assert (ok.status, ok.decided_at) == (StepStatus.failed, now)
        assert decide.result(step.run, "send").status is StepStatus.skipped


@pytest.mark.parametrize(
    ("shape", "status"),
    [
        pytest.param({"a": "running", "b": "waiting"}, RunStatus.running, id="running_beats_waiting"),
        pytest.param({"a": "succeeded", "b": "waiting"}, RunStatus.waiting, id="only_an_approval_left"),
        pytest.param({"a": "retry", "b": "waiting"}, RunStatus.waiting, id="waiting_and_a_retry"),
        pytest.param({"a": "retry", "b": "succeeded"}, RunStatus.retrying, id="only_a_retry_left"),
        pytest.param({"a": "sent", "b": "succeeded"}, RunStatus.running, id="a_start_in_flight"),
    ],
)
def test_the_status_of_a_run_that_is_going(shape: dict[str, str], status: RunStatus) -> None:
    r = graph_run(routine(actions=[_inv("a", after=[]), _inv("b", after=[])]), {})
    for step_id, state in shape.items():
        res = decide.result(r, step_id)
        if state == "retry":
            res.status, res.attempt, res.next_attempt_at = StepStatus.pending, 1, after(60)
        elif state == "sent":
            r.progress.steps[step_id] = StepProgress(sent_at=FIRE)
        else:
            res.status = StepStatus(state)
    decide._set_status(r)
    assert r.status is status
    assert r.next_attempt_at == (after(60) if "retry" in shape.values() else None)


@pytest.mark.parametrize(
    ("state", "sends", "check_at"),
    [
        pytest.param("sent_lately", [], after(10) + AFTER, id="start_in_flight_left_alone"),
        pytest.param("sent_long_ago", [("retry", "b", 1)], after(200) + AFTER, id="lost_start_resent"),
        pytest.param("waiting", [], after(10) + AFTER, id="approval_waits_and_b_is_in_flight"),
        pytest.param("approved", [("retry", None, 1)], after(200) + AFTER, id="lost_decision_nudged"),
    ],
)
def test_repair_of_steps(state: str, sends: list[tuple[str, str | None, int]], check_at: datetime) -> None:
    r = graph_run(
        routine(
            actions=[_inv("a"), _inv("b", after=[]), ApprovalStep(type="approval", id="ok", after=["a"])]
        ),
        {"a": StepStatus.succeeded},
    )
    decide.result(r, "a").ended_at = after(10)
    ok = decide.result(r, "ok")
    now = after(200) if state in ("sent_long_ago", "approved") else after(60)
    r.progress.steps["b"] = StepProgress(sent_at=after(10) if state != "sent_long_ago" else after(0))
    if state == "approved":
        decide.result(r, "b").status = StepStatus.succeeded
        r.progress.steps.pop("b")
        ok.status, ok.ended_at = StepStatus.succeeded, after(10)
    else:
        ok.status, ok.attempt = StepStatus.waiting, 1
        r.progress.steps["ok"] = StepProgress(decide_by=after(600))
    decision = decide.repair(r, FIRE_MSG, now, AFTER)
    assert [(m.kind, m.step, m.attempt) for m in decision.sends] == sends, decision.why
    assert decision.check_at == check_at
