"""Dispatcher behaviours checked in memory with a fake clock: poll back-off, the outcome write
surviving a storage blip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from routines import decide
from routines.agents.base import AgentCall, AgentOutcome
from routines.dispatcher import Dispatcher
from routines.errors import StorageUnavailable
from routines.messages import DispatchMessage, MemoryQueue
from routines.models import (
    InvocationAction,
    OverlapPolicy,
    Routine,
    Run,
    RunStatus,
    scheduled_run_id,
)
from routines.store import SlotWrite
from routines.store.memory import MemoryStore
from tests.helpers import Clock, make_routine

FIRE = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


class SlowAgent:
    """Pending until ``duration`` seconds after its start; counts the calls it gets."""

    def __init__(self, clock: Clock, duration: float) -> None:
        self.clock, self.duration = clock, duration
        self.starts = self.polls = self.cancels = 0
        self.started: datetime | None = None

    def start(self, call: AgentCall) -> AgentOutcome:
        self.starts += 1
        self.started = self.clock()
        return AgentOutcome(done=False, handle={"run": "r1"}, poll_after=1.0)

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        self.polls += 1
        assert self.started is not None
        if (self.clock() - self.started).total_seconds() >= self.duration:
            return AgentOutcome(done=True, output="done")
        return AgentOutcome(done=False, handle=handle, poll_after=1.0)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        self.cancels += 1


def stored_routine(
    store: MemoryStore, timeout: int = 3600, overlap: OverlapPolicy = OverlapPolicy.allow_all
) -> Routine:
    routine = make_routine(
        "slow",
        id="rt_00000000000000aa",
        actions=[InvocationAction(type="invocation", agent_id="a", input="x")],
        overlap_policy=overlap,
        timeout_seconds=timeout,
        now=FIRE,
    )
    store.create_routine(routine)
    return routine


def run_to_end(dispatcher: Dispatcher, queue: MemoryQueue, clock: Clock, limit: int = 500) -> int:
    """Deliver messages in due order (moving the clock); returns how many handler calls it took."""
    calls = 0
    pending = [(clock() + timedelta(seconds=d), m) for d, m in queue.take_all()]
    while pending and calls < limit:
        pending.sort(key=lambda item: item[0])
        due, message = pending.pop(0)
        clock.now = max(clock.now, due)
        dispatcher.handle(message.encode())
        calls += 1
        pending += [(clock() + timedelta(seconds=d), m) for d, m in queue.take_all()]
    return calls


def fire_message(routine: Routine) -> DispatchMessage:
    return DispatchMessage(
        kind="fire",
        routine_id=routine.id,
        scheduled_for=FIRE,
        routine_version=1,
        run_id=scheduled_run_id(routine.id, FIRE),
    )


def handler_calls_for(duration: float) -> int:
    store, queue, clock = MemoryStore(), MemoryQueue(), Clock(FIRE)
    routine = stored_routine(store)
    agent = SlowAgent(clock, duration)
    dispatcher = Dispatcher(store, queue, agent, clock=clock, sleep=clock.sleep)
    queue.send(fire_message(routine))
    calls = run_to_end(dispatcher, queue, clock)
    run, _ = store.get_run(routine.id, scheduled_run_id(routine.id, FIRE))
    assert run.status is RunStatus.succeeded and agent.starts == 1
    finished_late = (run.ended_at - FIRE).total_seconds() - duration if run.ended_at else None
    assert finished_late is not None and finished_late <= max(1.0, duration * decide.POLL_BACKOFF) + 1
    return calls


def test_polls_back_off_so_handler_calls_grow_with_the_log_of_the_agent_run() -> None:
    short, minute, ten_minutes = handler_calls_for(1), handler_calls_for(60), handler_calls_for(600)
    assert short <= 3
    assert minute <= 20, minute  # one poll a second would be ~60
    # Geometric until the 30 s cap (MAX_POLL_SECONDS), then one poll per cap: ~600 with fixed polling.
    assert ten_minutes <= minute + 600 / decide.MAX_POLL_SECONDS + 2, (minute, ten_minutes)


class BlipStore(MemoryStore):
    """Storage fails the first outcome write (a terminal ``replace_run``), once."""

    def __init__(self, answer_lost: bool) -> None:
        super().__init__()
        self.blips, self.answer_lost = 0, answer_lost

    def write_run(self, run: Run, etag: str | None, slot: SlotWrite | None = None) -> tuple[str, str | None]:
        if run.status.terminal and self.blips == 0:
            self.blips += 1
            if self.answer_lost:  # written, but the reply never came back
                super().write_run(run, etag, slot)
            raise StorageUnavailable("connection reset")
        return super().write_run(run, etag, slot)


def test_the_outcome_write_is_retried_through_a_storage_blip() -> None:
    for answer_lost in (False, True):
        store, queue, clock = BlipStore(answer_lost), MemoryQueue(), Clock(FIRE)
        routine = stored_routine(store, overlap=OverlapPolicy.skip)
        agent = SlowAgent(clock, 0)
        agent.start = lambda call: AgentOutcome(done=True, output="at once")  # type: ignore[method-assign]
        Dispatcher(store, queue, agent, clock=clock, sleep=clock.sleep).handle(fire_message(routine).encode())
        run, _ = store.get_run(routine.id, scheduled_run_id(routine.id, FIRE))
        assert store.blips == 1
        assert run.status is RunStatus.succeeded, answer_lost
        assert store.get_slot(routine.id) is None  # released with the outcome
        assert queue.take_all() == []  # nothing re-queued to wait out a lease


def test_disabling_a_buffer_one_routine_cancels_its_waiting_run_and_frees_the_slot() -> None:
    """Regression (soak): the hand-over to a buffered run was dropped as stale after a disable,
    leaving that run queued and the slot held, so every fire after re-enabling was skipped. Since
    disable cancels runs in flight, the running one ends cancelled too (its agent run cancelled)."""
    from routines.api import Api, Request
    from routines.config import Settings, StorageTarget

    clock = Clock(datetime(2026, 6, 1, 12, 0, 0, 500000, tzinfo=UTC))
    store, queue = MemoryStore(), MemoryQueue()
    agent = SlowAgent(clock, 3600)
    api = Api(store, queue, Settings(StorageTarget("x"), min_interval_seconds=1), clock)
    dispatcher = Dispatcher(store, queue, agent, clock=clock, sleep=lambda s: None)

    def post(handler: Any, body: bytes = b"", **params: str) -> Any:
        return api.handle(
            handler, Request("POST", params, {}, {"content-type": "application/json"}, body)
        ).body

    rid = post(
        api.create_routine,
        json.dumps(
            {
                "name": "wedge",
                "overlap_policy": "buffer_one",
                "trigger": {"type": "schedule", "cron_expression": "* * * * * *"},
                "actions": [{"type": "invocation", "agent_id": "a", "input": "x"}],
            }
        ).encode(),
    )["id"]
    first, second = sorted(
        (m for _, m in queue.take_all() if m.kind == "fire"), key=lambda m: m.scheduled_for
    )[:2]
    clock.sleep(1)
    dispatcher.handle(first.encode())  # starts, pending
    clock.sleep(1)
    dispatcher.handle(second.encode())  # buffered behind it
    assert store.get_run(rid, second.run_id)[0].status is RunStatus.queued
    post(api.disable_routine, id=rid)
    agent.duration = 0  # the first run is done at its next poll
    for _ in range(3):
        for _, message in queue.take_all():
            if message.run_id in (first.run_id, second.run_id):
                dispatcher.handle(message.encode())
    # Disable cancels what is in flight: the pending agent run at its next poll, the waiting fire.
    first_run = store.get_run(rid, first.run_id)[0]
    assert (first_run.status, first_run.error_message) == (
        RunStatus.cancelled,
        "the routine was disabled",
    )
    assert agent.cancels == 1
    assert store.get_run(rid, second.run_id)[0].status is RunStatus.cancelled
    assert store.get_slot(rid) is None


def test_storage_sdk_retries_of_queue_and_tables_last_seconds_not_a_minute() -> None:
    """The queue SDK's own default (15, 18, 24 s) held an API call or a tick for a minute on one
    refused send; each client retries 3 times within about 10 s, and the layers above take over."""
    from azure.core.pipeline.policies import RetryPolicy
    from azure.storage.queue import ExponentialRetry

    from routines.config import Settings, StorageTarget
    from routines.runtime import storage_clients

    settings = Settings(StorageTarget("UseDevelopmentStorage=true"), min_interval_seconds=1)
    tables, queue = storage_clients(settings)
    for retry in (queue.client._config.retry_policy, queue.poison_client._config.retry_policy):
        assert isinstance(retry, ExponentialRetry) and retry.total_retries == 3
        waits = [retry.get_backoff_time({"count": count}) for count in range(3)]
        assert sum(waits) <= 10, waits
    table_retry = tables._client._client._pipeline._impl_policies  # azure-core's pipeline
    [policy] = [p for p in table_retry if type(p).__name__.endswith("RetryPolicy")]
    assert isinstance(policy, RetryPolicy)
    assert policy.total_retries == 3 and policy.backoff_factor == 0.4
