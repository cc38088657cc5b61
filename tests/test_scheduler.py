"""The tick and the look-ahead (docs/guarantees.md #1, #3, #4, #5; catch-up in docs/api.md#routine).

``plan_fires`` is a pure table. The tick runs on ``MemoryStore`` with a fake clock for the logic and on
Azurite (real ``TableStore`` and ``AzureQueue``) for request counts, concurrency and crashes; fires are
then pumped through the real ``Dispatcher`` with a stub agent to show each fire ends as one run.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from azure.data.tables import TableServiceClient

from routines import scheduler
from routines.agents.base import AgentCall, AgentOutcome
from routines.config import Settings
from routines.dispatcher import Dispatcher
from routines.errors import StorageUnavailable
from routines.messages import DispatchMessage, DispatchQueue, MemoryQueue
from routines.models import (
    InvocationAction,
    Routine,
    RoutineState,
    RunStatus,
    ScheduleTrigger,
    TimerTrigger,
    scheduled_run_id,
)
from routines.runtime import AzureQueue, storage_clients
from routines.scheduler import MAX_FIRES_PER_PLAN, FirePlan, horizon, plan_fires
from routines.store import Advance, Store, codec
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore
from tests.helpers import Clock, RequestCounter, make_routine

NOW = datetime(2026, 11, 30, 6, 0, 20, tzinfo=UTC)
UNTIL = horizon(NOW)  # 06:01:10


def schedule_immediately(routine: Routine, queue: DispatchQueue, now: datetime) -> Routine:
    """What the API does around its routine write, without the write: plan the near fires and send
    them (the API writes the routine and its watches in between)."""
    plan = scheduler.plan_immediately(routine, now)
    scheduler.send_immediate(queue, plan)
    return plan.routine


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def cron(expression: str, time_zone: str = "UTC") -> ScheduleTrigger:
    return ScheduleTrigger(type="schedule", cron_expression=expression, time_zone=time_zone)


def timer(when: datetime) -> TimerTrigger:
    return TimerTrigger(type="timer", at=when)


def yearly_at(when: datetime) -> ScheduleTrigger:
    """A schedule whose only fire this year is ``when`` (whole seconds): one fire per tick, and a valid
    fire for the dispatcher's staleness check."""
    return cron(f"{when.second} {when.minute} {when.hour} {when.day} {when.month} *")


# --- plan_fires ------------------------------------------------------------------------------


def seconds(first: str, last: str, step: int = 1) -> list[datetime]:
    start, end = at(first), at(last)
    return [start + timedelta(seconds=s) for s in range(0, int((end - start).total_seconds()) + 1, step)]


@pytest.mark.parametrize(
    ("trigger", "fire_at", "window", "expected"),
    [
        pytest.param(
            cron("* * * * *"),
            at("2026-11-30T06:01:00Z"),
            3600,
            FirePlan([at("2026-11-30T06:01:00Z")], at("2026-11-30T06:02:00Z")),
            id="minutely_next_fire_within_horizon",
        ),
        pytest.param(
            cron("*/5 * * * *"),
            at("2026-11-30T06:05:00Z"),
            3600,
            FirePlan([], at("2026-11-30T06:05:00Z")),
            id="next_fire_beyond_horizon_waits",
        ),
        pytest.param(
            cron("0 * * * * *"),
            at("2026-11-30T06:01:00Z"),
            3600,
            FirePlan([at("2026-11-30T06:01:00Z")], at("2026-11-30T06:02:00Z")),
            id="six_fields_minutely",
        ),
        pytest.param(
            cron("* * * * * *"),
            at("2026-11-30T06:00:21Z"),
            3600,
            FirePlan(seconds("2026-11-30T06:00:21Z", "2026-11-30T06:01:09Z"), at("2026-11-30T06:01:10Z")),
            id="per_second_all_fires_before_horizon",
        ),
        pytest.param(
            cron("*/5 * * * * *"),
            at("2026-11-30T06:00:25Z"),
            3600,
            FirePlan(seconds("2026-11-30T06:00:25Z", "2026-11-30T06:01:05Z", 5), at("2026-11-30T06:01:10Z")),
            id="every_5s_all_fires_before_horizon",
        ),
        pytest.param(
            cron("* * * * *"),
            at("2026-11-30T05:30:00Z"),
            3600,
            FirePlan(
                [at("2026-11-30T06:00:00Z"), at("2026-11-30T06:01:00Z")],
                at("2026-11-30T06:02:00Z"),
                coalesced=30,
            ),
            id="catchup_within_window_coalesced_to_latest",
        ),
        pytest.param(
            cron("* * * * * *"),
            at("2026-11-30T06:00:05Z"),
            3600,
            FirePlan(
                [at("2026-11-30T06:00:20Z"), *seconds("2026-11-30T06:00:21Z", "2026-11-30T06:01:09Z")],
                at("2026-11-30T06:01:10Z"),
                coalesced=15,
            ),
            id="per_second_catchup_latest_is_now",
        ),
        pytest.param(
            cron("0 6 * * *"),
            at("2026-11-30T06:00:00Z"),
            3600,
            FirePlan([at("2026-11-30T06:00:00Z")], at("2026-12-01T06:00:00Z")),
            id="daily_fire_20s_late_runs",
        ),
        pytest.param(
            cron("0 6 * * *"),
            at("2026-11-30T06:00:00Z"),
            10,
            FirePlan(
                [],
                at("2026-12-01T06:00:00Z"),
                missed=(1, at("2026-11-30T06:00:00Z"), at("2026-11-30T06:00:10Z")),
            ),
            id="daily_fire_older_than_short_window_missed",
        ),
        pytest.param(
            cron("* * * * *"),
            at("2026-11-29T06:01:00Z"),
            3600,
            FirePlan(
                [at("2026-11-30T06:00:00Z"), at("2026-11-30T06:01:00Z")],
                at("2026-11-30T06:02:00Z"),
                missed=(1380, at("2026-11-29T06:01:00Z"), at("2026-11-30T05:00:20Z")),
                coalesced=59,
            ),
            id="down_a_day_minutely_one_missed_record",
        ),
        pytest.param(
            cron("* * * * *"),
            at("2026-11-29T06:01:00Z"),
            0,
            FirePlan(
                [at("2026-11-30T06:01:00Z")],
                at("2026-11-30T06:02:00Z"),
                missed=(1440, at("2026-11-29T06:01:00Z"), at("2026-11-30T06:00:20Z")),
            ),
            id="down_a_day_no_catchup_window",
        ),
        pytest.param(
            cron("0 9 * * *", "Europe/Paris"),
            at("2026-11-30T08:00:00Z"),
            3600,
            FirePlan([], at("2026-11-30T08:00:00Z")),
            id="time_zone_fire_beyond_horizon",
        ),
        pytest.param(
            timer(at("2026-11-30T06:00:50Z")),
            at("2026-11-30T06:00:50Z"),
            3600,
            FirePlan([at("2026-11-30T06:00:50Z")], None),
            id="timer_due_fires_once",
        ),
        pytest.param(
            timer(at("2026-11-30T05:59:00Z")),
            at("2026-11-30T05:59:00Z"),
            3600,
            FirePlan([at("2026-11-30T05:59:00Z")], None),
            id="timer_late_within_window_fires",
        ),
        pytest.param(
            timer(at("2026-11-30T06:30:00Z")),
            at("2026-11-30T06:30:00Z"),
            3600,
            FirePlan([], at("2026-11-30T06:30:00Z")),
            id="timer_beyond_horizon_waits",
        ),
        pytest.param(
            timer(at("2026-11-30T04:00:00Z")),
            at("2026-11-30T04:00:00Z"),
            3600,
            FirePlan(
                [], None, completed=True, missed=(1, at("2026-11-30T04:00:00Z"), at("2026-11-30T05:00:20Z"))
            ),
            id="timer_missed_completed_without_running",
        ),
    ],
)
def test_plan_fires(trigger: Any, fire_at: datetime, window: int, expected: FirePlan) -> None:
    assert plan_fires(trigger, fire_at, window, NOW, UNTIL) == expected


def test_plan_fires_caps_one_plan_and_continues_where_it_stopped() -> None:
    far = NOW + timedelta(hours=1)
    plan = plan_fires(cron("* * * * * *"), at("2026-11-30T06:00:21Z"), 3600, NOW, far)
    assert len(plan.fires) == MAX_FIRES_PER_PLAN
    assert plan.next_fire_at == plan.fires[-1] + timedelta(seconds=1)


def test_plan_fires_for_a_year_of_downtime_is_quick() -> None:
    started = time.perf_counter()
    plan = plan_fires(cron("* * * * *"), NOW - timedelta(days=365, seconds=20), 3600, NOW, UNTIL)
    assert plan.missed is not None and plan.missed[0] == 365 * 1440 - 59  # 06:00 a year ago to 05:00 today
    assert plan.fires == [at("2026-11-30T06:00:00Z"), at("2026-11-30T06:01:00Z")]
    per_second = plan_fires(cron("* * * * * *"), NOW - timedelta(days=365), 3600, NOW, UNTIL)
    assert per_second.missed is not None and per_second.missed[0] == 1_000_000, "counting stops at a cap"
    assert per_second.fires[0] == NOW and len(per_second.fires) == 50
    assert time.perf_counter() - started < 2
    record = scheduler._missed_run("rt_0000000000000001", per_second.missed, "schedule")
    assert record.error_message is not None and record.error_message.startswith(
        "missed 1000000+ fires between "
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(at("2026-11-30T06:00:00Z"), at("2026-11-30T06:01:10Z"), id="on_the_minute"),
        pytest.param(at("2026-11-30T06:00:20.5Z"), at("2026-11-30T06:01:10Z"), id="mid_minute"),
        pytest.param(at("2026-11-30T06:00:59.999Z"), at("2026-11-30T06:01:10Z"), id="end_of_minute"),
        pytest.param(at("2026-12-31T23:59:30Z"), at("2027-01-01T00:00:10Z"), id="year_end"),
    ],
)
def test_horizon(now: datetime, expected: datetime) -> None:
    assert horizon(now) == expected


# --- helpers: routines, a stub agent, a fake-clock driver -------------------------------------


def numbered_routine(
    index: int, trigger: Any, due_at: datetime | None, now: datetime = NOW, **fields: Any
) -> Routine:
    """Routine number ``index`` (its id, name and input say it), due at ``due_at``."""
    return make_routine(
        f"routine-{index}",
        id=f"rt_{index:016x}",
        trigger=trigger,
        actions=[InvocationAction(type="invocation", agent_id="echo", input=f"hello {index}")],
        fire=due_at,
        now=now,
        **fields,
    )


@dataclass
class StubAgent:
    """Answers every start at once; records (run id, attempt, clock at the start)."""

    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    starts: list[tuple[str, int, datetime]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, call: AgentCall) -> AgentOutcome:
        with self.lock:
            self.starts.append((call.run_id, call.attempt, self.clock()))
        return AgentOutcome(done=True, output="ok")

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        raise AssertionError("the stub agent never answers pending")

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        return None

    def run_ids(self) -> list[str]:
        return [run_id for run_id, _, _ in self.starts]


class Driver:
    """Delivers a ``MemoryQueue``'s messages to a real ``Dispatcher`` in visibility order, moving a
    fake clock forward instead of sleeping."""

    def __init__(self, store: Store, now: datetime) -> None:
        self.store = store
        self.clock = Clock(now)
        self.queue = MemoryQueue(self.clock)
        self.agent = StubAgent(self.clock)
        self.dispatcher = Dispatcher(store, self.queue, self.agent, clock=self.clock, sleep=self.clock.sleep)
        self.handled = 0

    def tick(self, now: datetime | None = None, owner: str = "tick-owner") -> scheduler.TickReport:
        return scheduler.tick(self.store, self.queue, now or self.clock(), owner)

    def deliver(self, messages: Sequence[DispatchMessage]) -> None:
        for message in messages:
            self.dispatcher.handle(message.encode())
            self.handled += 1

    def run_until(self, when: datetime) -> None:
        while (visible := self.queue.next_visible_at()) is not None and visible <= when:
            self.clock.now = max(self.clock.now, visible)
            self.deliver(self.queue.due(self.clock.now))
        self.clock.now = max(self.clock.now, when)


def runs_of(store: Store, routine_id: str) -> list[Any]:
    return store.list_runs(routine_id, None, 200, None).items


# --- tick on the in-memory store ---------------------------------------------------------------


def test_tick_after_a_day_down_records_one_missed_run_and_runs_the_latest_fire() -> None:
    store = MemoryStore()
    store.create_routine(numbered_routine(1, cron("* * * * *"), at("2026-11-29T06:01:00Z")))
    driver = Driver(store, NOW)
    report = driver.tick()
    assert (report.due, report.enqueued, report.missed_records) == (1, 2, 1)
    coalesced, missed = runs_of(store, "rt_0000000000000001")  # newest first
    # The 59 fires from the window's start to 06:00 run as one, counted on it (not dropped silently).
    assert (coalesced.status, coalesced.scheduled_for, coalesced.coalesced_fires) == (
        RunStatus.queued,
        at("2026-11-30T06:00:00Z"),
        59,
    )
    assert missed.status is RunStatus.missed
    assert missed.scheduled_for == at("2026-11-29T06:01:00Z")
    assert missed.error_message == (
        "missed 1380 fires between 2026-11-29T06:01:00Z and 2026-11-30T05:00:20Z: "
        "older than the catch-up window"
    )
    assert [m.scheduled_for for m in report.fires] == [at("2026-11-30T06:00:00Z"), at("2026-11-30T06:01:00Z")]
    routine, _ = store.get_routine("rt_0000000000000001")
    assert routine.next_fire_at == routine.due_at == at("2026-11-30T06:02:00Z")

    driver.run_until(at("2026-11-30T06:01:05Z"))
    assert sorted(driver.agent.run_ids()) == sorted(m.run_id for m in report.fires)
    statuses = sorted(r.status.value for r in runs_of(store, "rt_0000000000000001"))
    assert statuses == ["missed", "succeeded", "succeeded"]
    assert driver.tick(NOW + timedelta(seconds=30)).enqueued == 0, "a horizon is never enqueued twice"
    assert [m.scheduled_for for m in driver.tick().fires] == [at("2026-11-30T06:02:00Z")]


def test_tick_fires_a_due_timer_once_and_the_dispatch_completes_the_routine() -> None:
    store = MemoryStore()
    fire = at("2026-11-30T06:00:50Z")
    store.create_routine(numbered_routine(2, timer(fire), fire))
    driver = Driver(store, NOW)
    report = driver.tick()
    assert [(m.scheduled_for, m.kind, m.attempt) for m in report.fires] == [(fire, "fire", 1)]
    assert driver.queue.sent[0][0] == 30.0 - scheduler.EARLY_SURFACE_SECONDS
    routine, _ = store.get_routine("rt_0000000000000002")
    assert (routine.state, routine.next_fire_at, routine.due_at) == (RoutineState.enabled, fire, None)
    assert driver.tick().enqueued == 0

    driver.run_until(fire + timedelta(seconds=5))
    assert len(driver.agent.starts) == 1
    assert driver.agent.starts[0][2] == fire, "dispatched at its time"
    routine, _ = store.get_routine("rt_0000000000000002")
    assert (routine.state, routine.next_fire_at) == (RoutineState.completed, None)
    [run] = runs_of(store, routine.id)
    assert (run.status, run.trigger.value) == (RunStatus.succeeded, "timer")


def test_tick_completes_a_missed_timer_without_running_it() -> None:
    store = MemoryStore()
    fire = at("2026-11-30T04:00:00Z")
    store.create_routine(numbered_routine(3, timer(fire), fire))
    driver = Driver(store, NOW)
    report = driver.tick()
    assert (report.enqueued, report.missed_records) == (0, 1)
    routine, _ = store.get_routine("rt_0000000000000003")
    assert (routine.state, routine.next_fire_at, routine.due_at) == (RoutineState.completed, None, None)
    [run] = runs_of(store, routine.id)
    assert (run.status, run.trigger.value, run.scheduled_for) == (RunStatus.missed, "timer", fire)
    driver.run_until(NOW + timedelta(minutes=5))
    assert driver.agent.starts == []


def test_a_routine_whose_stored_trigger_no_longer_validates_does_not_stop_the_tick() -> None:
    store = MemoryStore()
    fire = NOW + timedelta(seconds=30)
    broken = ScheduleTrigger.model_construct(type="schedule", cron_expression="61 * * * *", time_zone="UTC")
    store.create_routine(numbered_routine(10, broken, fire))
    store.create_routine(numbered_routine(11, yearly_at(fire), fire))
    report = Driver(store, NOW).tick()
    assert [m.routine_id for m in report.fires] == ["rt_000000000000000b"]
    assert report.advanced == 1


def test_second_tick_within_the_lease_of_another_owner_is_skipped() -> None:
    store = MemoryStore()
    queue = MemoryQueue()
    assert not scheduler.tick(store, queue, NOW, "a").skipped
    assert scheduler.tick(store, queue, NOW + timedelta(seconds=5), "b").skipped
    assert not scheduler.tick(store, queue, NOW + timedelta(seconds=5), "a").skipped, "the owner renews"
    assert not scheduler.tick(store, queue, NOW + timedelta(seconds=60), "b").skipped, "an expired lease"


def test_tick_request_count_grows_with_due_fires_not_routines_in_memory() -> None:
    counts = {}
    for total in (10, 500):
        store = MemoryStore()
        for i in range(total):
            due = NOW + timedelta(seconds=5) if i < 5 else NOW + timedelta(days=30)
            store.create_routine(numbered_routine(i, yearly_at(NOW + timedelta(seconds=5)), due))
        store.requests = 0
        assert scheduler.tick(store, MemoryQueue(), NOW, "x").enqueued == 5
        counts[total] = store.requests
    assert counts[10] == counts[500]


# --- look-ahead and immediate scheduling -------------------------------------------------------


def test_schedule_immediately_enqueues_fires_before_the_horizon_with_their_distance_as_delay() -> None:
    now = at("2026-11-30T06:00:20.300Z")
    routine = numbered_routine(4, cron("*/5 * * * * *"), None, now)
    queue = MemoryQueue()
    scheduled = schedule_immediately(routine, queue, now)
    fires = seconds("2026-11-30T06:00:25Z", "2026-11-30T06:01:05Z", 5)
    assert [m.scheduled_for for _, m in queue.sent] == fires
    assert [d for d, _ in queue.sent] == [
        pytest.approx((f - now).total_seconds() - scheduler.EARLY_SURFACE_SECONDS) for f in fires
    ]
    assert queue.sent[0][0] == pytest.approx(4.7 - scheduler.EARLY_SURFACE_SECONDS)
    assert {(m.kind, m.attempt, m.routine_version) for _, m in queue.sent} == {("fire", 1, 1)}
    assert [m.run_id for _, m in queue.sent] == [scheduled_run_id(routine.id, f) for f in fires]
    assert scheduled.next_fire_at == scheduled.due_at == at("2026-11-30T06:01:10Z")


def test_schedule_immediately_leaves_a_far_fire_to_the_tick() -> None:
    routine = numbered_routine(5, cron("0 7 * * *"), None)
    queue = MemoryQueue()
    scheduled = schedule_immediately(routine, queue, NOW)
    assert queue.sent == []
    assert scheduled.next_fire_at == scheduled.due_at == at("2026-11-30T07:00:00Z")


def test_immediate_then_ticks_cover_every_fire_once_and_on_time() -> None:
    """A 5-second schedule created mid-minute: the create enqueues up to the horizon, each minute tick
    continues from there; over three minutes every fire runs once, at its time."""
    now = at("2026-11-30T06:00:20.300Z")
    store = MemoryStore()
    driver = Driver(store, now)
    routine = schedule_immediately(numbered_routine(6, cron("*/5 * * * * *"), None, now), driver.queue, now)
    store.create_routine(routine)
    for minute in (1, 2, 3):
        driver.run_until(at(f"2026-11-30T06:0{minute}:00.200Z"))
        driver.tick()
    driver.run_until(at("2026-11-30T06:04:00Z"))
    expected = seconds("2026-11-30T06:00:25Z", "2026-11-30T06:04:00Z", 5)
    started = [when for _, _, when in driver.agent.starts]
    assert sorted(started) == expected, "each fire started once, exactly at its time"
    assert len({m.run_id for _, m in driver.queue.sent}) == len(driver.queue.sent), "no fire enqueued twice"
    assert all(r.status is RunStatus.succeeded for r in runs_of(store, routine.id))
    assert len(runs_of(store, routine.id)) == len(expected)


def test_a_routine_created_as_a_minute_turns_loses_no_fire_to_the_tick_that_missed_it() -> None:
    """The create enqueues its near fires, then writes the routine and its due entry. A tick of the
    next minute whose due query ran in between does not see the routine, so the create must already
    have covered that tick's horizon, or the fires up to the following tick are coalesced away."""
    api_now = at("2026-11-30T06:00:59.800Z")
    store = MemoryStore()
    driver = Driver(store, api_now)
    routine = schedule_immediately(
        numbered_routine(12, cron("*/5 * * * * *"), None, api_now), driver.queue, api_now
    )
    assert driver.tick(at("2026-11-30T06:01:00.050Z")).due == 0  # its due query ran before the create
    store.create_routine(routine)
    driver.run_until(at("2026-11-30T06:02:00.100Z"))
    driver.tick()
    driver.run_until(at("2026-11-30T06:03:00Z"))
    started = sorted(when for _, _, when in driver.agent.starts)
    assert started == seconds("2026-11-30T06:01:00Z", "2026-11-30T06:03:00Z", 5)


def test_fire_of_a_rescheduled_routine_is_dropped_without_an_agent_call() -> None:
    now = at("2026-11-30T06:00:20Z")
    store = MemoryStore()
    driver = Driver(store, now)
    routine = schedule_immediately(numbered_routine(7, cron("*/10 * * * * *"), None, now), driver.queue, now)
    store.create_routine(routine)
    old_fires = [m for _, m in driver.queue.sent]
    assert len(old_fires) == 5 and {m.routine_version for m in old_fires} == {1}

    current, etag = store.get_routine(routine.id)
    edited = current.model_copy(update={"trigger": cron("0 * * * * *"), "version": 2, "schedule_version": 2})
    edited = schedule_immediately(edited, driver.queue, now)
    store.replace_routine(edited, etag, current)

    driver.run_until(at("2026-11-30T06:01:30Z"))
    assert [when for _, _, when in driver.agent.starts] == [at("2026-11-30T06:01:00Z")]
    [run] = runs_of(store, routine.id)
    assert (run.scheduled_for, run.status) == (at("2026-11-30T06:01:00Z"), RunStatus.succeeded)
    assert driver.handled == 5 + 1, "the five old fires were delivered and dropped"


def test_fire_of_a_routine_disabled_while_the_fire_waits_out_its_early_arrival_is_dropped() -> None:
    """Visibility delays are whole seconds, so a fire surfaces up to a second early and the dispatcher
    waits for its time. A routine disabled during that wait must not run (docs/guarantees.md #4)."""
    now = at("2026-11-30T06:00:20.100Z")
    store = MemoryStore()
    driver = Driver(store, now)
    routine = schedule_immediately(numbered_routine(8, cron("30 * * * * *"), None, now), driver.queue, now)
    store.create_routine(routine)

    def sleep_then_disable(seconds: float) -> None:
        current, etag = store.get_routine(routine.id)
        store.replace_routine(
            current.model_copy(
                update={
                    "state": RoutineState.disabled,
                    "next_fire_at": None,
                    "due_at": None,
                    "version": 2,
                    "schedule_version": 2,
                }
            ),
            etag,
            current,
        )
        driver.clock.sleep(seconds)

    driver.dispatcher.sleep = sleep_then_disable
    driver.run_until(at("2026-11-30T06:00:31Z"))
    assert driver.handled == 1
    assert driver.agent.starts == []
    assert runs_of(store, routine.id) == []


# --- on Azurite: request counts, concurrent ticks, crashes ------------------------------------


class RecordingQueue:
    """The real queue, remembering every message sent (delayed messages cannot be peeked)."""

    def __init__(self, inner: DispatchQueue) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.sent: list[tuple[float, DispatchMessage]] = []

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        self.inner.send(message, delay_seconds)
        with self._lock:
            self.sent.append((delay_seconds, message))

    def run_ids(self) -> list[str]:
        with self._lock:
            return [m.run_id for _, m in self.sent]


@dataclass
class Storage:
    settings: Settings
    tables: TableServiceClient
    azure_queue: AzureQueue
    counter: RequestCounter

    def store(self, suffix: str = "") -> TableStore:
        store = TableStore(self.tables, self.settings.table_prefix + suffix)
        store.ensure_tables()
        return store

    def queue(self) -> RecordingQueue:
        return RecordingQueue(self.azure_queue)


@pytest.fixture
def storage(storage_env: dict[str, str]) -> Storage:
    settings = Settings.from_env(storage_env)
    counter = RequestCounter()
    tables, queue = storage_clients(settings, hook=counter)
    queue.ensure()
    return Storage(settings, tables, queue, counter)


def seed(storage: Storage, store: TableStore, routines: Sequence[Routine]) -> None:
    """Insert routines fast: 33 per entity-group transaction (3 rows each), from 8 threads."""
    table = storage.tables.get_table_client(store.routines_table)

    def insert(chunk: Sequence[Routine]) -> None:
        ops = [
            ("create", row) for r in chunk for kind, row, _ in codec.create_routine_ops(r) if kind == "insert"
        ]
        table.submit_transaction(ops)

    chunks = [routines[i : i + 33] for i in range(0, len(routines), 33)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(insert, chunks))


def population(total: int, due: int, now: datetime) -> list[Routine]:
    fire = (now + timedelta(seconds=5)).replace(microsecond=0)
    far = now + timedelta(days=30)
    return [numbered_routine(i, yearly_at(fire), fire if i < due else far, now) for i in range(total)]


DUE = 10


def test_tick_requests_are_the_same_for_200_and_2000_routines(storage: Storage) -> None:
    now = datetime.now(UTC)
    counts: dict[int, int] = {}
    for total in (200, 2000):
        store = storage.store(f"n{total}")
        started = time.monotonic()
        seed(storage, store, population(total, DUE, now))
        seeded = time.monotonic() - started
        assert len(store.due_entries(now + timedelta(days=365))) == total
        queue = storage.queue()
        storage.counter.reset()
        report = scheduler.tick(store, queue, now, f"owner-{total}")
        counts[total] = storage.counter.reset()
        assert (report.due, report.enqueued, report.advanced) == (DUE, DUE, DUE)
        print(
            f"\n{total} routines ({DUE} due): seeded in {seeded:.1f}s, "
            f"tick made {counts[total]} storage requests"
        )
    assert counts[200] == counts[2000]
    # lease (read + write), one due-range query, one send per fire, one advance transaction per 33 fires
    assert counts[2000] == 2 + 1 + DUE + math.ceil(DUE / 33)


class BypassLease:
    """A store whose tick lease always succeeds: two ticks really run at once."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def try_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        return True


def tick_together(ticks: Sequence[Callable[[], scheduler.TickReport]]) -> list[scheduler.TickReport]:
    barrier = threading.Barrier(len(ticks))

    def run(tick: Callable[[], scheduler.TickReport]) -> scheduler.TickReport:
        barrier.wait()
        return tick()

    with ThreadPoolExecutor(max_workers=len(ticks)) as pool:
        return list(pool.map(run, ticks))


def expected_fires(routines: Sequence[Routine], now: datetime) -> set[str]:
    until = horizon(now)
    return {scheduled_run_id(r.id, r.due_at) for r in routines if r.due_at is not None and r.due_at < until}


def test_concurrent_ticks_with_the_lease_one_works_the_other_skips(storage: Storage) -> None:
    now = datetime.now(UTC)
    store = storage.store()
    routines = population(60, 40, now)
    seed(storage, store, routines)
    queue = storage.queue()
    reports = tick_together(
        [lambda: scheduler.tick(store, queue, now, "a"), lambda: scheduler.tick(store, queue, now, "b")]
    )
    assert sorted(r.skipped for r in reports) == [False, True]
    assert sorted(queue.run_ids()) == sorted(expected_fires(routines, now)), (
        "each due fire enqueued exactly once"
    )
    worker = next(r for r in reports if not r.skipped)
    assert (worker.advanced, worker.lost_races) == (40, 0)


def test_concurrent_ticks_without_the_lease_lose_no_fire_and_advance_each_entry_once(
    storage: Storage,
) -> None:
    now = datetime.now(UTC)
    store = storage.store()
    routines = population(60, 40, now)
    seed(storage, store, routines)
    queue = storage.queue()
    both = cast(Store, BypassLease(store))
    reports = tick_together(
        [lambda: scheduler.tick(both, queue, now, "a"), lambda: scheduler.tick(both, queue, now, "b")]
    )
    assert set(queue.run_ids()) == expected_fires(routines, now), "every due fire enqueued at least once"
    assert sum(r.advanced for r in reports) == 40, "each due entry advanced by exactly one tick"
    assert sum(r.advanced + r.lost_races for r in reports) == sum(r.due for r in reports)
    entries = store.due_entries(now + timedelta(days=400))
    assert sorted(e.routine_id for e in entries) == sorted(r.id for r in routines), (
        "one due entry per routine"
    )
    fire = routines[0].due_at
    assert fire is not None
    for entry in entries:
        if entry.routine_id in {r.id for r in routines[:40]}:
            assert entry.fire_at == fire.replace(year=fire.year + 1)
            routine, _ = store.get_routine(entry.routine_id)
            assert routine.next_fire_at == routine.due_at == entry.fire_at


class AdvanceFailsOnce:
    """A store that crashes the first tick in its advance (after its missed records)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def advance(self, advances: Sequence[Advance]) -> list[bool]:
        if not self.failures:
            self.failures += 1
            raise StorageUnavailable("injected: the host died before the advance")
        result: list[bool] = self._store.advance(advances)
        return result


@pytest.mark.parametrize("later", [1, 50], ids=["next_tick_at_once", "next_tick_after_the_fires"])
def test_a_tick_that_dies_before_its_advance_enqueues_nothing_and_the_next_sends_each_fire(
    storage: Storage, later: int
) -> None:
    """Write first, then enqueue: a fire is never queued before the write that makes it valid."""
    now = datetime.now(UTC)
    store = storage.store()
    routines = population(20, 5, now)
    seed(storage, store, routines)
    # and a minutely routine down for a day: one missed record
    routines.append(numbered_routine(99, cron("* * * * *"), now - timedelta(days=1), now))
    store.create_routine(routines[-1])
    queue = storage.queue()
    crashing = cast(Store, AdvanceFailsOnce(store))
    with pytest.raises(StorageUnavailable):
        scheduler.tick(crashing, queue, now, "owner")
    assert queue.sent == [], "nothing enqueued before the advance that makes it valid"

    second = scheduler.tick(crashing, queue, now + timedelta(seconds=later), "owner")
    assert second.advanced == 6 and second.missed_records == 0, "the missed record exists already"
    assert len({m.run_id for _, m in queue.sent}) == len(queue.sent), "each fire once"
    yearly = {m.run_id for _, m in queue.sent if m.routine_id != routines[-1].id}
    assert len(yearly) == 5
    assert [r.status for r in runs_of(store, routines[-1].id)][-1] is RunStatus.missed

    # Every message, duplicates included, through the dispatcher: one run and one agent call per fire.
    clock = Clock(now + timedelta(minutes=2))
    agent = StubAgent(clock)
    dispatcher = Dispatcher(store, MemoryQueue(), agent, clock=clock, sleep=clock.sleep)
    for _, message in queue.sent:
        dispatcher.handle(message.encode())
    assert sorted(agent.run_ids()) == sorted({m.run_id for _, m in queue.sent})
    assert yearly <= set(agent.run_ids())
    for routine in routines[:5]:
        assert [r.status for r in runs_of(store, routine.id)] == [RunStatus.succeeded]
