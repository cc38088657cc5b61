"""Flow control (README "Flow control"), the schedule's side: ``start_at`` / ``end_at``, ``max_fires``
with ``fire_count``, ``jitter_seconds`` with ``dispatch_at``, and ``pause_after_failures`` with
``disabled_reason``. End to end on the in-memory store with a fake clock: the API, the minute tick,
the dispatcher, the repair pass and a scripted agent. Every bad value is a ``422`` naming the field,
and nothing is stored or changed."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from datetime import datetime, timedelta
from typing import Any

import pytest

from routines import decide, limits, schedule, scheduler
from routines.agents.base import AgentError
from routines.errors import StorageUnavailable
from routines.models import RoutineState, Run, RunStatus, ScheduleTrigger
from routines.repair import repair
from routines.scheduler import Bounds, plan_fires
from tests.test_steps import REPAIR_AFTER, T0, World

EVERY_10S = {"type": "schedule", "cron_expression": "*/10 * * * * *"}
ECHO = [{"type": "invocation", "agent_id": "echo", "input": "go"}]


class Fleet(World):
    """``World`` with the minute tick running, as the timer trigger runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.next_tick = self.next_repair = T0

    def run_for(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock() + timedelta(seconds=seconds)
        while self.clock() < end:
            now = self.clock()
            if now >= self.next_tick:
                scheduler.tick(self.store, self.queue, now)
                self.next_tick = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
            if now >= self.next_repair:
                repair(self.store, self.queue, now, REPAIR_AFTER, "repairer")
                self.next_repair = now + timedelta(seconds=15)
            self.deliver_due()
            self.clock.now += timedelta(seconds=step)
        self.deliver_due()

    def routine(self, routine_id: str) -> dict[str, Any]:
        response = self.call("get_routine", id=routine_id)
        assert response.status == 200, response.body
        return dict(response.body)

    def runs(self, routine_id: str) -> list[Run]:
        found = self.store.list_runs(routine_id, None, 200, None).items
        return sorted(found, key=lambda r: r.scheduled_for)

    def patch(self, routine_id: str, body: dict[str, Any]) -> Any:
        return self.call("patch_routine", body, id=routine_id)


def a_fleet() -> Fleet:
    fleet = Fleet()
    fleet.clock.now = T0 + timedelta(seconds=0.5)  # half a second into the minute, as a user would be
    return fleet


# --- bad input --------------------------------------------------------------------------------------

LATER = (T0 + timedelta(days=1)).isoformat()
SOONER = (T0 + timedelta(hours=1)).isoformat()
WEBHOOK = {"type": "webhook", "secret_setting": "HOOK_SECRET"}


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        pytest.param({"jitter_seconds": 3601}, ["jitter_seconds"], id="jitter-over-an-hour"),
        pytest.param({"jitter_seconds": -1}, ["jitter_seconds"], id="jitter-negative"),
        pytest.param({"jitter_seconds": 11}, ["jitter_seconds"], id="jitter-over-the-interval"),
        pytest.param({"jitter_seconds": "5"}, ["jitter_seconds"], id="jitter-a-string"),
        pytest.param({"start_at": LATER, "end_at": SOONER}, ["end_at"], id="end-before-start"),
        pytest.param({"end_at": (T0 - timedelta(seconds=1)).isoformat()}, ["end_at"], id="end-in-the-past"),
        pytest.param({"end_at": "2026-07-01"}, ["end_at"], id="end-not-rfc3339"),
        pytest.param({"max_fires": 0}, ["max_fires"], id="max-fires-0"),
        pytest.param({"max_fires": True}, ["max_fires"], id="max-fires-a-boolean"),
        pytest.param({"pause_after_failures": -1}, ["pause_after_failures"], id="pause-negative"),
        pytest.param({"pause_after_failures": 101}, ["pause_after_failures"], id="pause-over-100"),
        pytest.param(
            {"trigger": {"type": "timer", "at": LATER}, "end_at": SOONER},
            ["trigger", "at"],
            id="timer-after-end",
        ),
        pytest.param({"trigger": WEBHOOK, "jitter_seconds": 5}, ["jitter_seconds"], id="webhook-jitter"),
        pytest.param({"trigger": WEBHOOK, "max_fires": 5}, ["max_fires"], id="webhook-max-fires"),
        pytest.param({"trigger": WEBHOOK, "end_at": LATER}, ["end_at"], id="webhook-end"),
    ],
)
def test_a_bad_flow_control_is_422_naming_the_field_and_nothing_is_stored(
    fields: dict[str, Any], loc: list[Any]
) -> None:
    fleet = a_fleet()
    fleet.api.service.settings = dataclasses.replace(
        fleet.api.service.settings, app_settings={"HOOK_SECRET": "whsec_" + "a" * 32}
    )
    body = {"name": "bad", "trigger": EVERY_10S, "actions": ECHO, **fields}
    response = fleet.call("create_routine", body)
    assert response.status == 422, response.body
    assert loc in [e["loc"] for e in response.body["errors"]], response.body
    assert fleet.store.list_routines(None, 10, None).items == []


def test_a_bad_flow_control_in_a_patch_is_422_and_changes_nothing() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S)
    before = fleet.routine(rid)
    for patch in (
        {"max_fires": 0},
        {"end_at": (T0 - timedelta(minutes=1)).isoformat()},
        {"jitter_seconds": 30},
        {"start_at": LATER, "end_at": SOONER},
    ):
        response = fleet.patch(rid, patch)
        assert response.status == 422, (patch, response.body)
    assert fleet.routine(rid) == before


def test_a_preview_with_jitter_needs_the_routine_id() -> None:
    fleet = a_fleet()
    response = fleet.call("preview", {"trigger": EVERY_10S, "jitter_seconds": 5})
    assert response.status == 422
    assert response.body["errors"][0]["loc"] == ["routine_id"]
    response = fleet.call(
        "preview", {"trigger": EVERY_10S, "jitter_seconds": 11, "routine_id": "rt_" + "0" * 16}
    )
    assert (response.status, response.body["errors"][0]["loc"]) == (422, ["jitter_seconds"])
    unknown = fleet.call("preview", {"trigger": EVERY_10S, "routine_id": "rt_" + "0" * 16})
    assert unknown.status == 404, "the routine's own jitter is read"


# --- the plan, pure ---------------------------------------------------------------------------------

CRON = ScheduleTrigger(type="schedule", cron_expression="*/10 * * * * *")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


SIX = [at(s) for s in (10, 20, 30, 40, 50, 60)]  # the fires before the horizon (0:70) from 0:10


@pytest.mark.parametrize(
    ("fire_at", "now", "bounds", "fires", "next_fire_at", "completed", "coalesced"),
    [
        pytest.param(at(10), at(0), Bounds(), SIX, at(70), False, 0, id="no-bounds"),
        pytest.param(at(10), at(0), Bounds(end_at=at(30)), SIX[:3], None, True, 0, id="end-at-is-inclusive"),
        pytest.param(at(10), at(0), Bounds(end_at=at(300)), SIX, at(70), False, 0, id="end-beyond-horizon"),
        pytest.param(at(10), at(0), Bounds(remaining=2), SIX[:2], None, True, 0, id="max-fires-cuts"),
        pytest.param(at(10), at(0), Bounds(remaining=6), SIX, None, True, 0, id="max-fires-reached-exactly"),
        pytest.param(at(10), at(0), Bounds(remaining=0), [], None, True, 0, id="nothing-left"),
        pytest.param(at(80), at(0), Bounds(end_at=at(75)), [], None, True, 0, id="next-fire-past-the-end"),
        # A late tick at 0:45 with end_at 0:25: the latest past fire inside the bounds runs, for all.
        pytest.param(
            at(10), at(45), Bounds(end_at=at(25)), [at(20)], None, True, 1, id="late-tick-keeps-end"
        ),
        pytest.param(at(10), at(45), Bounds(remaining=1), [at(40)], None, True, 3, id="late-tick-one-left"),
    ],
)
def test_plan_fires_within_bounds(
    fire_at: datetime,
    now: datetime,
    bounds: Bounds,
    fires: list[datetime],
    next_fire_at: datetime | None,
    completed: bool,
    coalesced: int,
) -> None:
    until = at(70)
    plan = plan_fires(CRON, fire_at, 3600, now, until, bounds)
    assert (plan.fires, plan.next_fire_at, plan.completed, plan.coalesced) == (
        fires,
        next_fire_at,
        completed,
        coalesced,
    )
    assert plan.counted == len(fires)


def test_a_missed_record_counts_as_one_fire() -> None:
    plan = plan_fires(CRON, at(10), 30, at(3600), at(3610), Bounds(remaining=1))
    assert plan.missed is not None and plan.fires == [] and plan.completed and plan.counted == 1


def test_the_jitter_offset_is_deterministic_and_within_bounds() -> None:
    offsets = {schedule.jitter_offset("rt_a", at(i * 60), 30) for i in range(200)}
    assert all(timedelta(0) <= o < timedelta(seconds=30) for o in offsets)
    assert len(offsets) > 150, "spread over the window, not one value"
    assert schedule.jitter_offset("rt_a", at(60), 30) == schedule.jitter_offset("rt_a", at(60), 30)
    assert schedule.jitter_offset("rt_a", at(60), 30) != schedule.jitter_offset("rt_b", at(60), 30)
    assert schedule.jitter_offset("rt_a", at(60), 0) == timedelta(0)


# --- end to end -------------------------------------------------------------------------------------


def test_max_fires_runs_that_many_then_completes_and_a_patch_resumes() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S, max_fires=3)
    fleet.run_for(90)
    runs = fleet.runs(rid)
    assert [r.scheduled_for for r in runs] == [at(10), at(20), at(30)]
    assert all(r.status is RunStatus.succeeded for r in runs)
    routine = fleet.routine(rid)
    assert (routine["state"], routine["fire_count"], routine["next_fire_at"]) == ("completed", 3, None)
    assert fleet.call("enable_routine", id=rid).status == 409, "completed: PATCH max_fires to go on"
    assert fleet.patch(rid, {"max_fires": 5}).status == 200
    fleet.run_for(60)
    routine = fleet.routine(rid)
    assert (routine["state"], routine["fire_count"]) == ("completed", 5)
    assert len(fleet.runs(rid)) == 5


def test_manual_runs_do_not_count_towards_max_fires() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S, max_fires=2)
    fleet.dispatch(rid)
    fleet.run_for(60)
    routine = fleet.routine(rid)
    assert (routine["state"], routine["fire_count"]) == ("completed", 2)
    triggers = sorted(r.trigger.value for r in fleet.runs(rid))
    assert triggers == ["manual", "schedule", "schedule"]


def test_start_at_and_end_at_bound_the_fires_and_the_routine_completes() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S, start_at=at(95).isoformat(), end_at=at(150).isoformat())
    assert fleet.routine(rid)["next_fire_at"] == "2026-06-01T12:01:40Z"
    fleet.run_for(240)
    assert [r.scheduled_for for r in fleet.runs(rid)] == [at(s) for s in (100, 110, 120, 130, 140, 150)]
    routine = fleet.routine(rid)
    assert (routine["state"], routine["fire_count"]) == ("completed", 6)


def test_jitter_starts_each_fire_at_its_offset_and_the_preview_and_routine_say_when() -> None:
    fleet = a_fleet()
    every_minute = {"type": "schedule", "cron_expression": "0 * * * * *"}
    rid = fleet.create(ECHO, trigger=every_minute, jitter_seconds=45)
    routine = fleet.routine(rid)
    assert routine["next_fire_at"] == "2026-06-01T12:01:00Z"
    offset = schedule.jitter_offset(rid, at(60), 45)
    assert datetime.fromisoformat(routine["next_dispatch_at"]) == at(60) + offset
    preview = fleet.call(
        "preview", {"trigger": every_minute, "routine_id": rid, "after": at(0).isoformat(), "count": 3}
    )
    assert preview.status == 200
    fleet.run_for(240)
    runs = [r for r in fleet.runs(rid) if r.scheduled_for <= at(180)]
    assert [r.scheduled_for for r in runs] == [at(60), at(120), at(180)]
    assert [r.dispatch_at for r in runs] == [
        f + schedule.jitter_offset(rid, f, 45) for f in (at(60), at(120), at(180))
    ]
    assert preview.body["dispatch_at"] == [r.public()["dispatch_at"] for r in runs]
    started = fleet.agent.started_at("echo")[:3]
    assert all(s >= r.due for s, r in zip(started, runs, strict=True)), "never before its time"
    assert all(r.status is RunStatus.succeeded for r in runs)


def test_a_jittered_fire_whose_message_is_lost_is_sent_again_after_its_dispatch_time() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger={"type": "timer", "at": at(30).isoformat()}, jitter_seconds=600)
    dispatch_at = at(30) + schedule.jitter_offset(rid, at(30), 600)
    lost = fleet.queue.take_all()
    assert [m.dispatch_at for _, m in lost] == [dispatch_at]
    fleet.run_for((dispatch_at - fleet.clock()).total_seconds() - 1, step=5)
    assert fleet.runs(rid) == [], "the repair pass does not send it before its time"
    fleet.run_for(decide.FIRST_CHECK.total_seconds() + 30, step=5)
    [run] = fleet.runs(rid)
    assert run.status is RunStatus.succeeded and run.dispatch_at == dispatch_at
    assert fleet.agent.started_at("echo")[0] >= dispatch_at


FAILS = AgentError("agent exploded", retriable=False)


def test_pause_after_failures_disables_the_routine_and_enable_clears_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S, pause_after_failures=3)
    fleet.agent.replies["echo"] = ["ok", FAILS, FAILS, "ok", FAILS, FAILS, FAILS]
    with caplog.at_level(logging.WARNING, logger="routines.lifecycle"):
        fleet.run_for(80)
    statuses = [r.status.value for r in fleet.runs(rid)]
    assert statuses == ["succeeded", "failed", "failed", "succeeded", "failed", "failed", "failed"]
    routine = fleet.routine(rid)
    assert (routine["state"], routine["disabled_reason"]) == ("disabled", "failures")
    assert any("disabled after 3 failed runs in a row" in r.getMessage() for r in caplog.records)
    assert fleet.call("enable_routine", id=rid).status == 200
    assert fleet.routine(rid)["disabled_reason"] is None
    fleet.agent.replies["echo"] = [FAILS]
    fleet.run_for(20)
    assert fleet.routine(rid)["state"] == "enabled", "the streak starts again from the enable"
    fleet.run_for(20)
    assert fleet.routine(rid)["disabled_reason"] == "failures"


def test_a_disable_through_the_api_says_manual() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S)
    assert fleet.call("disable_routine", id=rid).body["disabled_reason"] == "manual"
    assert fleet.call("enable_routine", id=rid).body["disabled_reason"] is None


def test_a_failure_its_worker_did_not_count_is_counted_by_the_repair_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger={"type": "timer", "at": at(10).isoformat()}, pause_after_failures=1)
    fleet.agent.replies["echo"] = [FAILS]
    perform = fleet.dispatcher._perform

    def dies_after_the_final_write(facts: Any, effect: Any) -> Any:
        if isinstance(effect, decide.CountOutcome | decide.Unwatch):
            return None  # the worker is gone: neither the count nor the unwatch happens
        return perform(facts, effect)

    monkeypatch.setattr(fleet.dispatcher, "_perform", dies_after_the_final_write)
    fleet.run_for(20)
    assert [r.status for r in fleet.runs(rid)] == [RunStatus.failed]
    assert fleet.routine(rid)["state"] == "completed", "a timer completes when it has fired"
    routine = fleet.store.get_routine(rid)[0]
    assert routine.failures == []
    fleet.run_for(decide.FIRST_CHECK.total_seconds() + 30)
    routine = fleet.store.get_routine(rid)[0]
    assert routine.failures == [fleet.runs(rid)[0].id], "counted once, by the repair pass"
    assert routine.state is RoutineState.completed, "a completed routine is not disabled"


# --- concurrency keys -------------------------------------------------------------------------------


def waiter(second: int, run_id: str) -> limits.Waiter:
    return limits.Waiter(at(second), run_id, "rt_x")


def test_admit_takes_a_free_permit_and_lines_up_oldest_first() -> None:
    permits, ok = limits.admit(None, "k", 2, waiter(10, "a"))
    assert ok and permits.holders == {"a": "rt_x"}
    permits, ok = limits.admit(permits, "k", 2, waiter(20, "b"))
    assert ok and set(permits.holders) == {"a", "b"}
    again, ok = limits.admit(permits, "k", 2, waiter(20, "b"))
    assert ok and again is permits, "a holder asking again changes nothing"
    permits, ok = limits.admit(permits, "k", 2, waiter(40, "d"))
    assert not ok and [w.run_id for w in permits.waiters] == ["d"]
    permits, ok = limits.admit(permits, "k", 2, waiter(30, "c"))
    assert not ok and [w.run_id for w in permits.waiters] == ["c", "d"], "oldest scheduled first"
    permits, handed = limits.release(permits, "a")
    assert [w.run_id for w in handed] == ["c"] and set(permits.holders) == {"b", "c"}
    assert [w.run_id for w in permits.waiters] == ["d"]
    same, handed = limits.release(permits, "a")
    assert same is permits and handed == [], "releasing twice changes nothing"
    permits, handed = limits.release(permits, "d")
    assert handed == [] and permits.waiters == (), "a waiter that ends leaves the line"


def test_a_free_permit_still_goes_to_an_older_waiter_first() -> None:
    permits = limits.Permits("k", 1, {}, (waiter(10, "old"),))
    permits, ok = limits.admit(permits, "k", 1, waiter(20, "new"))
    assert not ok and [w.run_id for w in permits.waiters] == ["old", "new"]
    permits, ok = limits.admit(permits, "k", 1, waiter(10, "old"))
    assert ok and permits.holders == {"old": "rt_x"}


def test_a_full_line_is_refused() -> None:
    line = tuple(waiter(i, f"w{i}") for i in range(limits.MAX_WAITERS))
    with pytest.raises(limits.QueueFull):
        limits.admit(limits.Permits("k", 1, {"h": "rt_x"}, line), "k", 1, waiter(99999, "late"))


@pytest.mark.parametrize(
    "concurrency",
    [
        pytest.param({"key": "openai", "limit": 0}, id="limit-0"),
        pytest.param({"key": "openai", "limit": -1}, id="limit-negative"),
        pytest.param({"key": "openai", "limit": 1001}, id="limit-over-1000"),
        pytest.param({"key": "open ai", "limit": 2}, id="key-with-a-space"),
        pytest.param({"key": "k" * 65, "limit": 2}, id="key-too-long"),
        pytest.param({"key": "", "limit": 2}, id="key-empty"),
        pytest.param({"limit": 2}, id="key-missing"),
        pytest.param({"key": "openai", "limit": 2, "burst": 1}, id="unknown-member"),
    ],
)
def test_a_bad_concurrency_is_422_and_nothing_is_stored(concurrency: dict[str, Any]) -> None:
    refused_alone("concurrency", concurrency)


def refused_alone(field: str, value: Any) -> None:
    """A routine with ``field: value`` is 422 at that field, and nothing is stored."""
    fleet = a_fleet()
    body = {"name": "bad", "trigger": EVERY_10S, "actions": ECHO, field: value}
    response = fleet.call("create_routine", body)
    assert response.status == 422, response.body
    assert all(e["loc"][0] == field for e in response.body["errors"]), response.body
    assert fleet.store.list_routines(None, 10, None).items == []


def busy_fleet(limit: int, routines: int, **fields: Any) -> tuple[Fleet, list[str]]:
    """``routines`` routines firing every 10 s on one key; each agent run takes 25 s."""
    fleet = a_fleet()
    fleet.agent.pending_for = 25
    fleet.agent.replies["slow"] = ["pending"]
    ids = [
        fleet.create(
            [{"type": "invocation", "agent_id": "slow", "input": "go"}],
            trigger=EVERY_10S,
            overlap_policy="allow_all",
            concurrency={"key": "openai", "limit": limit},
            **fields,
        )
        for _ in range(routines)
    ]
    return fleet, ids


def agent_concurrency(fleet: Fleet) -> int:
    """The most agent runs in flight at once, as the agent saw them: from each start to the first
    poll that found it done."""
    starts = {c.idempotency_key: t for kind, c, t in fleet.agent.calls if kind == "start"}
    ends: dict[str, datetime] = {}
    for kind, call, when in fleet.agent.calls:
        if (
            kind == "poll"
            and (when - starts[call.idempotency_key]).total_seconds() >= fleet.agent.pending_for
        ):
            ends.setdefault(call.idempotency_key, when)
    events = sorted([(t, 1) for t in starts.values()] + [(t, -1) for t in ends.values()])
    running = peak = 0
    for _, change in events:  # at the same instant an end (-1) sorts before a start
        running += change
        peak = max(peak, running)
    return peak


def test_a_concurrency_key_holds_across_routines_and_every_fire_runs_oldest_first() -> None:
    fleet, ids = busy_fleet(limit=2, routines=5, max_fires=5)  # 25 fires on a key of 2, each run 25 s
    fleet.run_for(25 * 25 / 2 + 60)
    runs = [run for rid in ids for run in fleet.runs(rid)]
    assert len(runs) == 25
    assert all(r.status is RunStatus.succeeded for r in runs), [r.status.value for r in runs]
    started = [r for r in runs if r.started_at is not None]
    assert agent_concurrency(fleet) <= 2
    assert agent_concurrency(fleet) == 2, "the key is used to its limit"
    order = [r.scheduled_for for r in sorted(started, key=lambda r: (r.started_at, r.scheduled_for))]
    assert order == sorted(order), "permits go to the oldest waiting fire first"
    waited = [r for r in started if r.waited_seconds > 0]
    assert waited and all(r.wait_reason == "waited for a permit of concurrency key openai" for r in waited)
    assert fleet.store.get_limit(limits.Permits, "openai") == limits.Permits(
        "openai",
        2,
        {},
        (),
        fleet.store.get_limit(limits.Permits, "openai").etag,  # type: ignore[union-attr]
    ), "nothing held or waiting once every run ended"


def test_a_waiting_run_shows_why_and_fails_after_its_max_age() -> None:
    fleet, ids = busy_fleet(limit=1, routines=1, retry_policy={"max_attempts": 1, "max_age_seconds": 10})
    fleet.run_for(21)  # 0:10 runs (until 0:35); 0:20 waits, until 0:30 at most
    [first, second] = fleet.runs(ids[0])
    assert first.status is RunStatus.running
    assert second.status is RunStatus.queued
    assert second.wait_reason == "waiting for a permit of concurrency key openai: 1 of 1 taken, 1 in line"
    assert second.next_attempt_at is not None
    fleet.run_for(20)
    second = fleet.store.get_run(ids[0], second.id)[0]
    assert second.status is RunStatus.failed
    assert "max_age_seconds (10s)" in (second.error_message or "")
    permits = fleet.store.get_limit(limits.Permits, "openai")
    assert permits is not None and second.id not in {w.run_id for w in permits.waiters}, "left the line"


def test_a_permit_whose_worker_died_comes_back_through_the_repair_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet, ids = busy_fleet(limit=1, routines=1)
    perform = fleet.dispatcher._perform
    died: list[str] = []

    def dies_after_its_first_final_write(facts: Any, effect: Any) -> Any:
        if isinstance(effect, decide.ReleasePermit) and not died:
            died.append(effect.run_id)
            raise SystemExit("killed")  # the worker is gone: no release, no unwatch
        return perform(facts, effect)

    monkeypatch.setattr(fleet.dispatcher, "_perform", dies_after_its_first_final_write)
    monkeypatch.setattr(fleet, "deliver_due", lambda: crash_tolerant_delivery(fleet))
    fleet.run_for(45)
    assert fleet.call("disable_routine", id=ids[0]).status == 200
    assert died, "a run ended and its worker died before giving the permit back"
    holder = fleet.store.get_limit(limits.Permits, "openai")
    assert holder is not None and died[0] in holder.holders, "held by a finished run for now"
    fleet.run_for(decide.FIRST_CHECK.total_seconds() + 60)
    permits = fleet.store.get_limit(limits.Permits, "openai")
    assert permits is not None and died[0] not in permits.holders, "the repair pass gave it back"
    assert fleet.store.get_run(ids[0], died[0])[0].status is RunStatus.succeeded


def crash_tolerant_delivery(fleet: Fleet) -> int:
    """``World.deliver_due``, where a worker that dies on a message just drops it (it comes back
    only through the repair pass, as a message taken by a killed worker would after its visibility)."""
    handled = 0
    while due := fleet.queue.due(fleet.clock()):
        for message in due:
            with contextlib.suppress(SystemExit):
                fleet.dispatcher.handle(message.encode())
        handled += len(due)
    return handled


# --- rate limits ------------------------------------------------------------------------------------


def test_take_allows_limit_starts_in_any_window_of_the_period() -> None:
    window, wait = limits.take(None, "k", 2, 10, at(0), "a")
    assert wait is None
    window, wait = limits.take(window, "k", 2, 10, at(4), "b")
    assert wait is None
    same, again = limits.take(window, "k", 2, 10, at(5), "b")
    assert same is window and again is None, "one start asked for twice counts once"
    refused, wait = limits.take(window, "k", 2, 10, at(9), "c")
    assert refused is window and wait == at(10), "the window slides: allowed once a leaves it"
    window, wait = limits.take(window, "k", 2, 10, at(10), "c")
    assert wait is None and [w for _, w in window.starts] == ["b", "c"], "a has left the window"
    _, wait = limits.take(window, "k", 2, 10, at(13.9), "d")
    assert wait == at(14)


@pytest.mark.parametrize(
    "rate_limit",
    [
        pytest.param({"key": "openai", "limit": 0, "period_seconds": 60}, id="limit-0"),
        pytest.param({"key": "openai", "limit": 1001, "period_seconds": 60}, id="limit-over-1000"),
        pytest.param({"key": "openai", "limit": 5, "period_seconds": 0}, id="period-0"),
        pytest.param({"key": "openai", "limit": 5, "period_seconds": 86401}, id="period-over-a-day"),
        pytest.param({"key": "a/b", "limit": 5, "period_seconds": 60}, id="key-with-a-slash"),
        pytest.param({"key": "openai", "limit": 5}, id="period-missing"),
    ],
)
def test_a_bad_rate_limit_is_422_and_nothing_is_stored(rate_limit: dict[str, Any]) -> None:
    refused_alone("rate_limit", rate_limit)


def test_a_rate_limit_holds_in_every_window_across_routines_and_steps() -> None:
    fleet = a_fleet()
    two_steps: list[dict[str, Any]] = [
        {"id": "a", "type": "invocation", "agent_id": "echo", "input": "first"},
        {
            "id": "b",
            "type": "invocation",
            "agent_id": "echo",
            "input": "then {{steps.a.output}}",
            "after": ["a"],
        },
    ]
    rate = {"key": "openai", "limit": 3, "period_seconds": 20}
    fields: dict[str, Any] = {"trigger": EVERY_10S, "overlap_policy": "allow_all", "rate_limit": rate}
    ids = [fleet.create(two_steps if i == 0 else ECHO, max_fires=4, **fields) for i in range(3)]
    fleet.run_for(200)
    runs = [run for rid in ids for run in fleet.runs(rid)]
    assert len(runs) == 12 and all(r.status is RunStatus.succeeded for r in runs), [r.status for r in runs]
    starts = sorted(fleet.agent.started_at("echo"))
    assert len(starts) == 16, "4 runs of 2 steps, 8 of 1"
    for first in starts:
        in_window = [s for s in starts if first <= s < first + timedelta(seconds=20)]
        assert len(in_window) <= 3, (first, in_window)
    waited = [r for r in runs if r.waited_seconds > 0]
    assert waited and all(r.wait_reason == "waited for the rate limit of key openai" for r in waited)
    assert starts[-1] - starts[0] >= timedelta(seconds=20 * (16 // 3) - 20), "delayed, not dropped"


# --- regressions found in review ------------------------------------------------------------------


def slow_routine(fleet: Fleet, **fields: Any) -> str:
    fleet.agent.pending_for = 25
    fleet.agent.replies["slow"] = ["pending"]
    return fleet.create(
        [{"type": "invocation", "agent_id": "slow", "input": "go"}], trigger=EVERY_10S, **fields
    )


def test_a_duplicate_delivery_that_admits_a_finished_run_gives_the_permit_back() -> None:
    fleet = a_fleet()
    rid = fleet.create(
        ECHO, trigger={"type": "timer", "at": at(10).isoformat()}, concurrency={"key": "k", "limit": 1}
    )
    [(_, fire)] = fleet.queue.take_all()
    fleet.clock.now = at(10)
    other, real = fleet.worker("w2"), fleet.store.get_limit
    raced: list[bool] = []

    def the_other_delivery_finishes_first(kind: Any, key: str) -> Any:
        if not raced:
            raced.append(True)
            other.handle(fire.encode())  # runs the whole run and gives its permit back
        return real(kind, key)

    fleet.store.get_limit = the_other_delivery_finishes_first  # type: ignore[method-assign]
    fleet.dispatcher.handle(fire.encode())  # admits the run again, loses the insert, finds it done
    fleet.store.get_limit = real  # type: ignore[method-assign]
    assert [r.status for r in fleet.runs(rid)] == [RunStatus.succeeded]
    permits = real(limits.Permits, "k")
    assert permits is not None and permits.holders == {} and permits.waiters == ()


def test_a_storage_blip_while_giving_a_permit_back_is_made_good_by_the_redelivery() -> None:
    fleet = a_fleet()
    rid = fleet.create(
        ECHO, trigger={"type": "timer", "at": at(10).isoformat()}, concurrency={"key": "k", "limit": 1},
        pause_after_failures=1,
    )  # fmt: skip
    fleet.agent.replies["echo"] = [FAILS]
    real_put = fleet.store.put_limit

    def blip_on_the_release(row: Any) -> str:
        if isinstance(row, limits.Permits) and not row.holders:
            fleet.store.put_limit = real_put  # type: ignore[method-assign]
            raise StorageUnavailable("blip")
        return real_put(row)

    fleet.store.put_limit = blip_on_the_release  # type: ignore[method-assign]

    def deliver_as_the_host_does() -> int:  # a delivery that fails is re-queued, not raised
        due = fleet.queue.due(fleet.clock())
        for message in due:
            fleet.dispatcher.deliver(message.encode(), 1)
        return len(due)

    fleet.deliver_due = deliver_as_the_host_does  # type: ignore[method-assign]
    fleet.run_for(120, step=5)
    [run] = fleet.runs(rid)
    assert run.status is RunStatus.failed
    permits = fleet.store.get_limit(limits.Permits, "k")
    assert permits is not None and (permits.holders, permits.waiters) == ({}, ())
    assert fleet.store.get_routine(rid)[0].failures == [run.id], "and its failure is counted"


def test_a_run_rekeyed_while_it_waits_leaves_the_old_keys_line() -> None:
    fleet = a_fleet()
    r1 = slow_routine(fleet, overlap_policy="allow_all", concurrency={"key": "k1", "limit": 1}, max_fires=2)
    slow_routine(fleet, overlap_policy="allow_all", concurrency={"key": "k2", "limit": 1}, max_fires=3)
    fleet.run_for(21)  # each key: its 0:10 run holds the permit, its 0:20 run waits
    assert fleet.patch(r1, {"concurrency": {"key": "k2", "limit": 1}}).status == 200
    fleet.run_for(400)
    assert all(r.status is RunStatus.succeeded for r in fleet.runs(r1))
    for key in ("k1", "k2"):
        permits = fleet.store.get_limit(limits.Permits, key)
        assert permits is not None and (permits.holders, permits.waiters) == ({}, ()), key


@pytest.mark.parametrize(("policy", "succeeded"), [("skip", 2), ("buffer_one", 3)])
def test_the_overlap_policy_still_applies_to_fires_behind_a_full_key(policy: str, succeeded: int) -> None:
    fleet = a_fleet()
    rid = slow_routine(fleet, overlap_policy=policy, max_fires=6, concurrency={"key": "k", "limit": 1})
    fleet.run_for(400)
    statuses = [r.status for r in fleet.runs(rid)]
    assert statuses.count(RunStatus.succeeded) == succeeded, statuses
    assert statuses.count(RunStatus.skipped) == 6 - succeeded


def test_fires_dropped_by_a_reschedule_or_a_disable_do_not_count() -> None:
    fleet = a_fleet()
    patched = fleet.create(ECHO, trigger=EVERY_10S, max_fires=5)
    paused = fleet.create(ECHO, trigger=EVERY_10S, max_fires=20)
    assert fleet.routine(patched)["fire_count"] == 5, "all five planned at once"
    fleet.clock.now = at(5)
    assert fleet.patch(patched, {"max_fires": 10}).status == 200  # before any of the five ran
    fleet.call("disable_routine", id=paused)
    fleet.call("enable_routine", id=paused)
    fleet.run_for(300)
    assert len(fleet.runs(patched)) == 10 and fleet.routine(patched)["fire_count"] == 10
    assert len([r for r in fleet.runs(paused) if r.status is RunStatus.succeeded]) == 20


def test_a_success_restarts_the_streak_even_if_a_failure_was_counted_during_it() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, overlap_policy="allow_all", pause_after_failures=2)
    fleet.agent.replies["echo"] = [FAILS, "ok", FAILS]
    a, b = fleet.dispatch(rid), fleet.dispatch(rid)
    messages = {m.run_id: m for _, m in fleet.queue.take_all()}
    other = fleet.worker("w2")

    def a_fails_during_bs_call(call: Any) -> None:
        if call.run_id == b:
            other.handle(messages[a].encode())
        else:
            fleet.agent.during_start = a_fails_during_bs_call

    fleet.agent.during_start = a_fails_during_bs_call
    fleet.dispatcher.handle(messages[b].encode())
    assert fleet.store.get_routine(rid)[0].failures == []
    fleet.clock.now += timedelta(seconds=1)
    fleet.dispatch(rid)
    fleet.run_for(5)
    assert fleet.routine(rid)["state"] == "enabled", "one failure since the success"


def test_a_completed_routine_can_be_disabled_and_its_queued_fires_do_not_run() -> None:
    fleet = a_fleet()
    rid = fleet.create(ECHO, trigger=EVERY_10S, max_fires=3)
    assert fleet.routine(rid)["state"] == "completed", "its three fires are queued"
    response = fleet.call("disable_routine", id=rid)
    assert (response.status, response.body["state"], response.body["disabled_reason"]) == (
        200,
        "disabled",
        "manual",
    )
    fleet.run_for(60)
    assert fleet.runs(rid) == []
