"""No loss windows: each test reproduces a way a fire was lost or a run stuck on version 1, with the
in-memory store, a fake clock and a fake agent, and shows it now ends as exactly one terminal run."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from routines import decide, scheduler
from routines.agents.base import AgentCall, AgentError, AgentOutcome
from routines.api import Api, Request
from routines.config import Settings, StorageTarget
from routines.dispatcher import MAX_DELIVERIES, Dispatcher
from routines.errors import StorageUnavailable
from routines.messages import DispatchMessage, MemoryQueue
from routines.models import Routine, Run, RunStatus
from routines.repair import repair
from routines.store.memory import MemoryStore
from tests.helpers import Clock

T0 = datetime(2026, 6, 1, 12, 0, 0, 500000, tzinfo=UTC)
REPAIR_AFTER = timedelta(seconds=90)


class Killed(BaseException):
    """A worker dying mid-message: nothing in the handler catches it."""


class Agent:
    """Answers at once (``pending_for`` > 0: pending that long); ``die_on_start`` kills the worker
    after the agent started, once per listed attempt."""

    def __init__(self, clock: Clock, pending_for: float = 0) -> None:
        self.clock, self.pending_for = clock, pending_for
        self.starts: list[tuple[str, int, datetime]] = []
        self.cancels = 0
        self.die_on_start: set[int] = set()
        self.fail_with: AgentError | None = None

    def start(self, call: AgentCall) -> AgentOutcome:
        self.starts.append((call.run_id, call.attempt, self.clock()))
        if call.attempt in self.die_on_start:
            self.die_on_start.discard(call.attempt)
            raise Killed
        if self.fail_with:
            raise self.fail_with
        if self.pending_for:
            return AgentOutcome(done=False, handle={"at": self.clock().isoformat()}, poll_after=1)
        return AgentOutcome(done=True, output="ok")

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        started = datetime.fromisoformat(handle["at"])
        done = (self.clock() - started).total_seconds() >= self.pending_for
        return AgentOutcome(done=done, output="ok" if done else None, handle=handle, poll_after=1)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        self.cancels += 1


class World:
    """One store, one queue, one worker, the API, the tick and the repair pass on one fake clock."""

    def __init__(self, now: datetime = T0, pending_for: float = 0) -> None:
        self.clock = Clock(now)
        self.store = MemoryStore()
        self.queue = MemoryQueue(self.clock)
        self.agent = Agent(self.clock, pending_for)
        self.dispatcher = Dispatcher(
            self.store, self.queue, self.agent, clock=self.clock, sleep=self.clock.sleep
        )
        settings = Settings(StorageTarget("x"), min_interval_seconds=1)
        self.api = Api(self.store, self.queue, settings, self.clock)
        self.lost_sends: set[str] = set()  # message kinds whose next send is dropped (a crash, an outage)
        self.deaths = 0

    def call(self, handler: Callable[[Api], Any], body: Any = None, **params: str) -> Any:
        raw = json.dumps(body).encode() if body is not None else b""
        request = Request("POST", params, {}, {"content-type": "application/json"}, raw)
        response = self.api.handle(handler(self.api), request)
        assert response.status < 400, response.body
        return response.body

    def create(self, **fields: Any) -> str:
        body = {"name": "r", "actions": [{"type": "invocation", "agent_id": "a", "input": "x"}], **fields}
        return str(self.call(lambda a: a.create_routine, body)["id"])

    def deliver_due(self) -> int:
        handled = 0
        for message in self.queue.due(self.clock()):
            handled += 1
            try:
                self.dispatcher.handle(message.encode())
            except Killed:
                self.deaths += 1  # the host would redeliver after its 10-minute visibility: never here
        return handled

    def run_for(self, seconds: float, step: float = 1.0, repair_every: float = 15.0) -> None:
        """Move time on, delivering what is due and running the repair pass on its timer."""
        end = self.clock() + timedelta(seconds=seconds)
        next_repair = self.clock()
        while self.clock() < end:
            self.deliver_due()
            if self.clock() >= next_repair:
                repair(self.store, self.queue, self.clock(), REPAIR_AFTER, "repairer")
                next_repair = self.clock() + timedelta(seconds=repair_every)
            self.clock.now += timedelta(seconds=step)

    def runs(self, routine_id: str) -> list[Run]:
        return list(self.store.list_runs(routine_id, None, 200, None).items)

    def open_runs(self, routine_id: str) -> list[Run]:
        return [r for r in self.runs(routine_id) if not r.status.terminal]


class InlineQueue(MemoryQueue):
    """A worker so fast it handles a fire the moment it is sent: the window in which version 1
    handled a fire before the routine write landed (and dropped it as "deleted" or "stale")."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.dispatcher: Dispatcher | None = None
        self.handled: set[str] = set()

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        super().send(message, delay_seconds)
        if self.dispatcher is not None and message.kind == "fire" and message.run_id not in self.handled:
            self.handled.add(message.run_id)
            self.dispatcher.handle(message.encode())


@pytest.mark.parametrize("operation", ["create", "enable", "patch"])
def test_a_near_fire_handled_at_once_finds_the_write_that_made_it_valid(operation: str) -> None:
    """Window 1: create, PATCH and enable sent near fires before the routine write landed."""
    world = World()
    inline = InlineQueue(world.clock)
    world.queue = inline
    world.api = Api(world.store, inline, Settings(StorageTarget("x"), min_interval_seconds=1), world.clock)
    world.dispatcher = Dispatcher(
        world.store, inline, world.agent, clock=world.clock, sleep=world.clock.sleep
    )
    at = (T0 + timedelta(seconds=2)).replace(microsecond=0)
    timer = {"type": "timer", "at": at.isoformat()}
    if operation == "create":
        inline.dispatcher = world.dispatcher
        rid = world.create(trigger=timer)
    elif operation == "enable":
        rid = world.create(trigger=timer, state="disabled")
        inline.dispatcher = world.dispatcher
        world.call(lambda a: a.enable_routine, id=rid)
    else:
        rid = world.create(trigger={"type": "timer", "at": (at + timedelta(hours=1)).isoformat()})
        inline.dispatcher = world.dispatcher
        body = json.dumps({"trigger": timer}).encode()
        response = world.api.handle(
            world.api.patch_routine,
            Request("PATCH", {"id": rid}, {}, {"content-type": "application/json"}, body),
        )
        assert response.status == 200
    assert [(r.status, r.scheduled_for) for r in world.runs(rid)] == [(RunStatus.succeeded, at)]
    routine, _ = world.store.get_routine(rid)
    assert routine.state.value == "completed" and routine.next_fire_at is None


def test_fires_whose_send_failed_after_the_tick_wrote_them_are_sent_by_the_repair_pass() -> None:
    world = World()
    rid = world.create(trigger={"type": "schedule", "cron_expression": "30 12 * * *"})
    real_send = world.queue.send

    def failing(message: DispatchMessage, delay_seconds: float = 0) -> None:
        raise StorageUnavailable("queue down")

    world.queue.send = failing  # type: ignore[method-assign]
    world.clock.now = T0 + timedelta(minutes=29, seconds=30)
    with pytest.raises(StorageUnavailable):
        scheduler.tick(world.store, world.queue, world.clock(), "ticker")
    world.queue.send = real_send  # type: ignore[method-assign]
    fire = T0.replace(minute=30, second=0, microsecond=0)
    world.run_for(120)
    [run] = world.runs(rid)
    assert (run.status, run.scheduled_for) == (RunStatus.succeeded, fire)
    started = world.agent.starts[0][2]
    assert started - fire <= decide.FIRST_CHECK + timedelta(seconds=16), (
        "the first repair pass after it was due"
    )
    assert world.store.watched(world.clock() + timedelta(days=1), 100) == [], "nothing left watched"


def test_a_worker_killed_after_starting_the_agent_is_taken_over_within_90_seconds() -> None:
    """Window 10: takeover waited for the host's 10-minute visibility."""
    world = World()
    world.agent.die_on_start = {1}
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"})  # 12:01:00
    world.run_for(180)
    assert world.deaths == 1
    [run] = world.runs(rid)
    assert run.status is RunStatus.succeeded
    (_, a1, first), (_, a2, second) = world.agent.starts
    fire = T0.replace(minute=1, second=0, microsecond=0)
    assert (a1, a2) == (1, 1), "the same attempt, taken over"
    assert second - fire <= timedelta(seconds=90), second - fire
    assert second - first >= decide.LEASE, "never before the lease ended"


def test_a_manual_run_whose_message_was_lost_is_started_by_the_repair_pass() -> None:
    """Window 6: the run stayed queued for ever when the send failed."""
    world = World()
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 0 1 1 *"})

    def failing(message: DispatchMessage, delay_seconds: float = 0) -> None:
        raise StorageUnavailable("queue down")

    real = world.queue.send
    world.queue.send = failing  # type: ignore[method-assign]
    run = world.call(lambda a: a.dispatch_routine, {"input": "now"}, id=rid)
    world.queue.send = real  # type: ignore[method-assign]
    assert run["status"] == "queued"
    world.run_for(120)
    [done] = world.runs(rid)
    assert done.status is RunStatus.succeeded and done.id == run["id"]


def test_a_lost_poll_chain_is_polled_again_and_the_run_ends() -> None:
    world = World(pending_for=200)
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"})
    world.run_for(70)
    [run] = world.runs(rid)
    assert run.status is RunStatus.running and run.progress.steps["step1"].poll is not None
    dropped = [m for m in world.queue.due(world.clock() + timedelta(hours=1)) if m.kind == "poll"]
    assert len(dropped) == 1, "the poll chain, now lost"
    world.run_for(400)
    [done] = world.runs(rid)
    assert done.status is RunStatus.succeeded
    assert world.open_runs(rid) == []


def test_an_action_added_while_a_run_waits_for_its_retry_does_not_change_the_run() -> None:
    """Window 2: the retry read the routine's current actions (IndexError, agents restarted)."""
    world = World()
    world.agent.fail_with = AgentError("busy", retriable=True)
    rid = world.create(
        trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"},
        retry_policy={"max_attempts": 2, "delays_seconds": [30]},
    )
    world.run_for(65)
    [run] = world.runs(rid)
    assert run.status is RunStatus.retrying
    two = [
        {"type": "invocation", "agent_id": "a", "input": "x"},
        {"type": "invocation", "agent_id": "b", "input": "y"},
    ]
    world.api.handle(
        world.api.patch_routine,
        Request(
            "PATCH",
            {"id": rid},
            {},
            {"content-type": "application/json"},
            json.dumps({"actions": two}).encode(),
        ),
    )
    world.agent.fail_with = None
    world.run_for(60)
    [done] = world.runs(rid)
    assert done.status is RunStatus.succeeded and len(done.actions) == 1
    assert [a for _, a, _ in world.agent.starts] == [1, 2], "one start per attempt"


def test_an_action_removed_while_its_agent_is_polled_does_not_strand_the_run() -> None:
    world = World(pending_for=5)
    two = [
        {"type": "invocation", "agent_id": "a", "input": "x"},
        {"type": "invocation", "agent_id": "b", "input": "y"},
    ]
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"}, actions=two)
    world.run_for(62)
    one = [two[0]]
    world.api.handle(
        world.api.patch_routine,
        Request(
            "PATCH",
            {"id": rid},
            {},
            {"content-type": "application/json"},
            json.dumps({"actions": one}).encode(),
        ),
    )
    world.run_for(60)
    [done] = world.runs(rid)
    assert done.status is RunStatus.succeeded and len(done.actions) == 2, "finished with its snapshot"


def test_storage_unavailable_requeues_with_back_off_instead_of_burning_deliveries() -> None:
    world = World()
    message = scheduler.fire_message("rt_0000000000000001", T0, 1, "schedule")

    def down(routine_id: str) -> tuple[Routine, str]:
        raise StorageUnavailable("throttled")

    world.store.get_routine = down  # type: ignore[method-assign]
    world.dispatcher.deliver(message.encode(), delivery=1)  # no exception: the host deletes the original
    [(delay, again)] = world.queue.take_all()
    assert again == message and delay >= 2


def test_the_last_delivery_of_a_failing_message_ends_its_run_failed_and_poisons_it() -> None:
    """Window 5: any other exception meant 5 deliveries, then the poison queue and a lost fire."""
    world = World()
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 12 * * *"})
    message = scheduler.fire_message(rid, T0.replace(microsecond=0), 1, "schedule")
    poisoned: list[str] = []

    def broken(call: AgentCall) -> AgentOutcome:
        raise RuntimeError("a bug")

    world.agent.start = broken  # type: ignore[method-assign]
    for delivery in range(1, MAX_DELIVERIES):
        with pytest.raises(RuntimeError):
            world.dispatcher.deliver(message.encode(), delivery, poisoned.append)
        world.clock.now += timedelta(seconds=60)  # past the lease: the next delivery takes over
    world.dispatcher.deliver(message.encode(), MAX_DELIVERIES, poisoned.append)
    [run] = world.runs(rid)
    assert run.status is RunStatus.failed
    assert run.error_message == "its dispatch message failed on every delivery: RuntimeError: a bug"
    assert len(poisoned) == 1
    assert world.store.get_slot(rid) is None


@pytest.mark.parametrize(
    "outcome, complaint",
    [
        pytest.param(
            AgentOutcome(done=True, thread_id="t" * 500), "thread_id of 500 characters", id="thread_id"
        ),
        pytest.param(AgentOutcome(done=True, agent_run_id="r" * 5000), "run id of 5000", id="run_id"),
        pytest.param(AgentOutcome(done=True, thread_id="a\nb"), "control characters", id="thread_id_newline"),
        pytest.param(AgentOutcome(done=False, handle={"x": "y" * 2000}), "handle is 2009 bytes", id="handle"),
    ],
)
def test_agent_supplied_values_that_do_not_fit_fail_the_attempt_and_keep_the_routine_readable(
    outcome: AgentOutcome, complaint: str
) -> None:
    """Window 3: a 500-character thread id was saved on the routine, and GET, DELETE and the list
    answered 500 from then on."""
    world = World()
    world.agent.start = lambda call: outcome  # type: ignore[method-assign]
    rid = world.create(
        trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"},
        actions=[{"type": "response", "agent_name": "a", "input": "x"}],
    )
    world.run_for(65)
    [run] = world.runs(rid)
    assert run.status is RunStatus.failed
    assert complaint in (run.error_message or "")
    routine = world.call(lambda a: a.get_routine, id=rid)
    assert routine["actions"][0].get("thread_id") is None, "nothing the agent sent was kept"


def test_an_agent_that_never_answers_is_given_up_on_at_the_call_deadline() -> None:
    """Window 8: socket timeouts bound each read, not the call, so a trickling agent held a call
    open past its lease. The wait is real time here: one second of timeout, plus the grace."""
    world = World()
    release = threading.Event()
    calls: list[AgentCall] = []

    def hangs(call: AgentCall) -> AgentOutcome:
        calls.append(call)
        release.wait(60)
        return AgentOutcome(done=True, output="too late")

    world.agent.start = hangs  # type: ignore[method-assign]
    rid = world.create(
        trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"},
        timeout_seconds=1,
        retry_policy={"max_attempts": 1},
    )
    try:
        world.run_for(62)
    finally:
        release.set()
    [run] = world.runs(rid)
    assert run.status is RunStatus.failed
    assert "did not answer by the call's deadline" in (run.error_message or "")
    assert len(calls) == 1


def test_a_timer_rescheduled_while_its_fire_runs_is_not_completed() -> None:
    """Window 7: the completion overwrote a PATCH of ``at`` that landed between the run insert and
    the completion."""
    world = World()
    at = (T0 + timedelta(seconds=3)).replace(microsecond=0)
    rid = world.create(trigger={"type": "timer", "at": at.isoformat()})
    later = at + timedelta(hours=1)
    insert = world.store.write_run

    def insert_then_patch(run: Run, etag: str | None, slot: Any = None) -> tuple[str, str | None]:
        written = insert(run, etag, slot)
        if etag is None:  # the run's insert: the PATCH lands right after it
            body = json.dumps({"trigger": {"type": "timer", "at": later.isoformat()}}).encode()
            headers = {"content-type": "application/json"}
            response = world.api.handle(
                world.api.patch_routine, Request("PATCH", {"id": rid}, {}, headers, body)
            )
            assert response.status == 200
        return written

    world.store.write_run = insert_then_patch  # type: ignore[method-assign]
    world.run_for(5)
    assert [r.status for r in world.runs(rid)] == [RunStatus.succeeded]
    routine, _ = world.store.get_routine(rid)
    assert (routine.state.value, routine.next_fire_at) == ("enabled", later)


def test_purge_keeps_a_run_that_is_still_going() -> None:
    """Window 9: purge deleted by age whatever the status."""
    from routines.purge import purge

    world = World()
    rid = world.create(trigger={"type": "schedule", "cron_expression": "0 1 12 * * *"})
    world.agent.fail_with = AgentError("busy", retriable=True, retry_after=40 * 86400)
    world.store.get_routine(rid)
    world.run_for(62)
    [run] = world.runs(rid)
    assert run.status is RunStatus.retrying
    deleted = purge(
        world.store, Settings(StorageTarget("x")), T0 + timedelta(days=31), archive=lambda n, r: None
    )
    assert deleted == 0 and world.runs(rid)[0].status is RunStatus.retrying


def test_repair_cost_grows_with_due_watches_not_with_routines() -> None:
    world = World()
    for i in range(50):
        world.create(name=f"idle-{i}", trigger={"type": "schedule", "cron_expression": "0 0 1 1 *"})
    repair(world.store, world.queue, world.clock(), REPAIR_AFTER, "repairer")  # takes the lease
    before = world.store.requests
    report = repair(world.store, world.queue, world.clock(), REPAIR_AFTER, "repairer")
    assert report.due == 0
    assert world.store.requests - before == 2, "renew the lease, query the due watches"
