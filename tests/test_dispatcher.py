"""Fault tests of the dispatcher (docs/api.md, docs/guarantees.md) on Azurite, with the fake HTTP agent.

Everything real but the Functions host: ``TableStore`` and ``AzureQueue`` on Azurite, the HTTP agent
backend against ``tests/fake_agent.py``. ``Rig.pump`` plays the host's queue trigger: it receives
messages from the real queue (base64, as the host does), hands each to ``Dispatcher.handle``, deletes it
when the handler returns, moves it to the poison queue on ``PoisonMessage`` and leaves it to reappear
after its visibility timeout on any other exception. Retry delays are a second or two, so real time is
used throughout.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from azure.storage.queue import QueueClient, QueueMessage

from routines import decide, scheduler
from routines.agents.base import AgentBackend, AgentCall, AgentOutcome
from routines.agents.http import HttpAgentBackend
from routines.api import Api, Request
from routines.config import Settings
from routines.dispatcher import Dispatcher, PoisonMessage
from routines.errors import AgentError, NotFound, StorageUnavailable
from routines.messages import DispatchMessage, DispatchQueue, MemoryQueue
from routines.models import (
    InvocationAction,
    Routine,
    RoutineState,
    Run,
    RunStatus,
    ScheduleTrigger,
    StepStatus,
    TimerTrigger,
    idempotency_key,
    scheduled_run_id,
)
from routines.runtime import AzureQueue, storage_clients
from routines.store import Store
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore
from tests.fake_agent import FakeAgent, Reply
from tests.helpers import Clock, RequestCounter, make_routine

TOKEN = "tok-dispatch-5e1d"
SIGNING_SECRET = "sig-0b7e3c9a"  # the fake agent checks every request's signature
EVERY_SECOND = ScheduleTrigger(type="schedule", cron_expression="* * * * * *")  # any whole second is a fire


def schedule_immediately(routine: Routine, queue: DispatchQueue, now: datetime) -> Routine:
    """What the API does around its routine write, without the write: plan the near fires and send
    them (the API writes the routine and its watches in between)."""
    plan = scheduler.plan_immediately(routine, now)
    scheduler.send_immediate(queue, plan)
    return plan.routine


class Killed(BaseException):
    """A worker process dying mid-message: not an ``Exception``, so nothing in ``handle`` catches it."""


@dataclass(frozen=True)
class Sent:
    at: float  # time.time()
    delay: float
    message: DispatchMessage
    run: Run | None  # the run as stored when the message was sent


class RecordingQueue:
    """The real ``AzureQueue``, recording each send with the run's state at that moment; ``fail_next``
    makes the next sends of a kind raise ``StorageUnavailable`` (a queue outage, or a crash just
    before the send)."""

    def __init__(self, inner: AzureQueue, reader: TableStore) -> None:
        self.inner, self.reader = inner, reader
        self._lock = threading.Lock()
        self.sent: list[Sent] = []
        self.fail_next: dict[str, int] = {}

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        with self._lock:
            if self.fail_next.get(message.kind):
                self.fail_next[message.kind] -= 1
                raise StorageUnavailable(f"injected: cannot enqueue the {message.kind} message")
        try:
            run: Run | None = self.reader.get_run(message.routine_id, message.run_id)[0]
        except NotFound:
            run = None
        self.inner.send(message, delay_seconds)
        with self._lock:
            self.sent.append(Sent(time.time(), delay_seconds, message, run))

    def of(self, run_id: str, kind: str | None = None) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.message.run_id == run_id and kind in (None, s.message.kind)]


@dataclass(frozen=True)
class Delivery:
    run_id: str | None
    kind: str | None
    started: float  # time.time()
    seconds: float
    error: str | None


@dataclass
class Rig:
    settings: Settings
    store: TableStore  # the dispatcher's, counted
    reader: TableStore  # the test's own, not counted
    azure_queue: AzureQueue
    queue: RecordingQueue
    receiver: QueueClient
    poison: QueueClient
    agent: FakeAgent
    backend: HttpAgentBackend
    counter: RequestCounter
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- set-up -------------------------------------------------------------------------------
    def routine(self, agent: str = "echo", **fields: Any) -> Routine:
        now = datetime.now(UTC)
        index = secrets.token_hex(8)
        defaults: dict[str, Any] = {
            "id": f"rt_{index}",
            "trigger": EVERY_SECOND,
            "actions": [InvocationAction(type="invocation", agent_id=agent, input=f"hello {index}")],
        }
        routine = make_routine(f"r-{index}", now=now, **{**defaults, **fields})
        self.store.create_routine(routine)
        return routine

    def fire(
        self, routine: Routine, scheduled_for: datetime | None = None, times: int = 1, delay: float = 0
    ) -> DispatchMessage:
        when = scheduled_for or datetime.now(UTC).replace(microsecond=0)
        message = scheduler.fire_message(routine.id, when, routine.schedule_version, routine.trigger.type)
        for _ in range(times):
            self.queue.send(message, delay)
        return message

    def dispatcher(self, backend: Any = None, owner: str = "worker") -> Dispatcher:
        return Dispatcher(self.store, self.queue, backend or self.backend, owner=owner)

    # --- the host's queue trigger -------------------------------------------------------------
    def deliver(self, dispatcher: Dispatcher, received: QueueMessage) -> None:
        body = base64.b64decode(received.content)
        try:
            parsed = json.loads(body)
            run_id, kind = (
                (parsed.get("run_id"), parsed.get("kind")) if isinstance(parsed, dict) else (None, None)
            )
        except ValueError:
            run_id = kind = None
        started, clock = time.time(), time.perf_counter()
        error = None
        try:
            dispatcher.handle(body)
        except PoisonMessage:
            error = "poison"
            self.azure_queue.poison(body.decode(errors="replace"))  # as function_app.dispatch does
        except (Exception, Killed) as exc:  # the host leaves the message to reappear later
            error = type(exc).__name__
        with self.lock:
            self.deliveries.append(Delivery(run_id, kind, started, time.perf_counter() - clock, error))
        if error in (None, "poison"):
            self.receiver.delete_message(received)

    def pump(
        self,
        until: Callable[[], bool],
        *,
        timeout: float = 15,
        visibility: int = 5,
        dispatchers: list[Dispatcher] | None = None,
    ) -> None:
        """Deliver messages until ``until()`` holds; raises ``TimeoutError`` after ``timeout`` s."""
        workers = dispatchers or [self.dispatcher()]
        deadline = time.monotonic() + timeout
        done = threading.Event()

        def work(dispatcher: Dispatcher) -> None:
            while not done.is_set():
                if until():
                    done.set()
                    return
                if time.monotonic() > deadline:
                    done.set()
                    raise TimeoutError(f"pump gave up after {timeout}s; deliveries: {self.deliveries}")
                batch = list(
                    self.receiver.receive_messages(
                        messages_per_page=4, max_messages=4, visibility_timeout=visibility
                    )
                )
                if not batch:
                    time.sleep(0.05)
                for received in batch:
                    self.deliver(dispatcher, received)

        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            for future in [pool.submit(work, d) for d in workers]:
                future.result()

    # --- reading ------------------------------------------------------------------------------
    def run(self, message: DispatchMessage) -> Run:
        return self.reader.get_run(message.routine_id, message.run_id)[0]

    def status(self, message: DispatchMessage) -> RunStatus | None:
        try:
            return self.run(message).status
        except NotFound:
            return None

    def finished(self, *messages: DispatchMessage) -> Callable[[], bool]:
        return lambda: all((s := self.status(m)) is not None and s.terminal for m in messages)

    def delivered(self, run_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.run_id == run_id]


@pytest.fixture
def rig(storage_env: dict[str, str]) -> Iterator[Rig]:
    settings = Settings.from_env({**storage_env, "ROUTINES_AGENT_BACKEND": "http"})
    counter = RequestCounter()
    tables, azure_queue = storage_clients(settings, hook=counter)
    store = TableStore(tables, settings.table_prefix)
    store.ensure_tables()
    azure_queue.ensure()
    plain_tables, plain_queue = storage_clients(settings)
    reader = TableStore(plain_tables, settings.table_prefix)
    with (
        FakeAgent(token=TOKEN, signing_secret=SIGNING_SECRET) as agent,
        HttpAgentBackend(agent.url, token=TOKEN, signing_secret=SIGNING_SECRET) as backend,
    ):
        yield Rig(
            settings,
            store,
            reader,
            azure_queue,
            RecordingQueue(azure_queue, reader),
            plain_queue.client,
            plain_queue.poison_client,
            agent,
            backend,
            counter,
        )


def fixed(*delays: int, attempts: int = 4, **extra: Any) -> dict[str, Any]:
    return {"max_attempts": attempts, "delays_seconds": list(delays), **extra}


# --- duplicates, crashes, concurrent workers ------------------------------------------------


def test_the_same_fire_delivered_twice_calls_the_agent_once(rig: Rig) -> None:
    routine = rig.routine()
    message = rig.fire(routine, times=2)
    rig.pump(lambda: len(rig.delivered(message.run_id)) >= 2 and rig.finished(message)())
    run = rig.run(message)
    assert (run.status, run.attempt, run.trigger.value) == (RunStatus.succeeded, 1, "schedule")
    [start] = rig.agent.starts()
    assert start.idempotency_key == run.idempotency_key == idempotency_key(routine.id, message.scheduled_for)
    assert start.attempt == 1 and start.headers["authorization"] == f"Bearer {TOKEN}"
    assert isinstance(routine.actions[0], InvocationAction)
    assert run.actions[0].output == routine.actions[0].input
    assert run.id == scheduled_run_id(routine.id, message.scheduled_for)


class DiesAfterStart:
    """Starts the agent run, then the worker dies before recording anything (once)."""

    def __init__(self, inner: HttpAgentBackend) -> None:
        self.inner = inner
        self.died = False

    def start(self, call: AgentCall) -> AgentOutcome:
        outcome = self.inner.start(call)
        if not self.died:
            self.died = True
            raise Killed
        return outcome

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        return self.inner.poll(call, handle)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        self.inner.cancel(call, handle)


def test_a_killed_workers_attempt_is_taken_over_after_its_lease_never_before(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decide, "LEASE", timedelta(seconds=3))
    routine = rig.routine(timeout_seconds=1)
    message = rig.fire(routine)
    dying = DiesAfterStart(rig.backend)
    rig.pump(lambda: dying.died, dispatchers=[rig.dispatcher(dying, owner="doomed")], visibility=1)
    claimed = rig.run(message)
    lease = claimed.progress.steps["step1"]
    assert (claimed.status, lease.lease_owner) == (RunStatus.running, "doomed")
    assert lease.lease_until is not None
    lease_end = lease.lease_until.timestamp()

    rig.pump(rig.finished(message), visibility=1)
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.succeeded, 1)
    first, second = rig.agent.starts()
    assert second.received_at >= lease_end, "taken over only after the lease ended"
    assert first.idempotency_key == second.idempotency_key
    deliveries = rig.delivered(message.run_id)
    assert [d.error for d in deliveries] == ["Killed", None, None]
    assert deliveries[1].started < lease_end, "redelivered before the lease ended ..."
    requeued = rig.queue.of(message.run_id, "fire")[1:]
    assert len(requeued) == 1, "... it re-queued itself without calling the agent"
    assert requeued[0].at + requeued[0].delay >= lease_end
    assert requeued[0].delay <= 4


def test_two_workers_on_one_queue_start_each_fire_once(rig: Rig) -> None:
    messages = [rig.fire(rig.routine(), times=2) for _ in range(10)]
    workers = [rig.dispatcher(owner="worker-a"), rig.dispatcher(owner="worker-b")]
    rig.pump(rig.finished(*messages), dispatchers=workers)
    assert {rig.status(m) for m in messages} == {RunStatus.succeeded}
    assert len(rig.agent.starts()) == 10
    assert rig.agent.duplicate_starts() == {}
    assert {d.error for d in rig.deliveries} == {None}


# --- agent answers and the retry policy --------------------------------------------------------


def test_500_500_200_succeeds_on_attempt_3_after_the_configured_delays(rig: Rig) -> None:
    rig.agent.script("flaky", [500, 500, 200])
    routine = rig.routine("flaky", retry_policy=fixed(1, 2))
    message = rig.fire(routine)
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt, run.max_attempts, run.error_message) == (RunStatus.succeeded, 3, 4, None)
    assert run.actions[0].status is StepStatus.succeeded and run.actions[0].error_message is None
    retries = rig.queue.of(message.run_id, "retry")
    assert [(s.delay, s.message.attempt) for s in retries] == [(1.0, 2), (2.0, 3)]
    for sent in retries:
        assert sent.run is not None and sent.run.status is RunStatus.retrying
        assert sent.run.next_attempt_at is not None
        assert sent.run.next_attempt_at.timestamp() - sent.at == pytest.approx(sent.delay, abs=0.5)
        assert sent.run.error_message is not None and "500" in sent.run.error_message
    starts = rig.agent.starts("flaky")
    assert [c.attempt for c in starts] == [1, 2, 3]
    assert starts[1].received_at - starts[0].received_at >= 1.0
    assert starts[2].received_at - starts[1].received_at >= 2.0
    assert {c.idempotency_key for c in starts} == {run.idempotency_key}


def test_400_fails_on_attempt_1_without_retry(rig: Rig) -> None:
    rig.agent.script("picky", [Reply.error(400, body={"error": "bad input"})])
    message = rig.fire(rig.routine("picky", retry_policy=fixed(1)))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.failed, 1)
    assert run.error_message is not None and "400" in run.error_message and "bad input" in run.error_message
    assert run.actions[0].status is StepStatus.failed
    assert len(rig.agent.starts()) == 1
    assert rig.queue.of(message.run_id, "retry") == []


def test_429_retry_after_is_honoured_when_larger_than_the_policy_delay(rig: Rig) -> None:
    rig.agent.script("busy", [(429, {"Retry-After": "2"}), 200])
    message = rig.fire(rig.routine("busy", retry_policy=fixed(1)))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.succeeded, 2)
    [retry] = rig.queue.of(message.run_id, "retry")
    assert retry.delay >= 2.0
    assert retry.run is not None and retry.run.next_attempt_at is not None
    assert retry.run.next_attempt_at.timestamp() - retry.at >= 1.5
    first, second = rig.agent.starts("busy")
    assert second.received_at - first.received_at >= 2.0


@pytest.mark.parametrize(
    ("reply", "expected_error"),
    [
        pytest.param(Reply.slow(3), "timed out", id="slow_answer"),
        pytest.param(
            Reply.pending(polls=100, retry_after=1), "timed out after 1s", id="pending_past_timeout"
        ),
    ],
)
def test_an_agent_past_timeout_seconds_is_retried(rig: Rig, reply: Reply, expected_error: str) -> None:
    rig.agent.script("sluggish", [reply, 200])
    message = rig.fire(rig.routine("sluggish", timeout_seconds=1, retry_policy=fixed(1)))
    rig.pump(rig.finished(message), timeout=20)
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.succeeded, 2)
    [retry] = rig.queue.of(message.run_id, "retry")
    assert retry.run is not None and retry.run.error_message is not None
    assert expected_error in retry.run.error_message
    assert max(d.seconds for d in rig.delivered(message.run_id)) < 2, "no handler waited out the agent"
    if reply.status == 202:
        assert len(rig.agent.cancelled()) == 1, "the timed-out agent run was cancelled"


def test_a_timeout_on_the_last_attempt_fails_the_run(rig: Rig) -> None:
    rig.agent.script("sluggish", [Reply.slow(3)])
    message = rig.fire(rig.routine("sluggish", timeout_seconds=1, retry_policy={"max_attempts": 1}))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.failed, 1)
    assert run.error_message is not None and "timed out" in run.error_message
    assert "no retry: all 1 attempts used" in run.error_message


def test_max_age_seconds_stops_retries(rig: Rig) -> None:
    rig.agent.script("flaky", [500, 200])
    message = rig.fire(rig.routine("flaky", retry_policy=fixed(5, attempts=5, max_age_seconds=3)))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.failed, 1)
    assert run.error_message is not None and "max_age_seconds" in run.error_message
    assert len(rig.agent.starts()) == 1


def test_exhausted_attempts_fail_with_the_last_error(rig: Rig) -> None:
    rig.agent.script(
        "down",
        [Reply.error(503, body={"error": "first outage"}), Reply.error(500, body={"error": "second outage"})],
    )
    message = rig.fire(rig.routine("down", retry_policy=fixed(1, attempts=2)))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt, run.next_attempt_at) == (RunStatus.failed, 2, None)
    assert run.error_message is not None
    assert run.error_message.startswith("attempt 2: ") and "second outage" in run.error_message
    assert run.error_message.endswith("(no retry: all 2 attempts used)")
    assert len(rig.agent.starts()) == 2


# --- pending agent runs: polling through delayed messages --------------------------------------


def test_202_then_polling_succeeds_through_poll_messages(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(polls=1, retry_after=1)])
    message = rig.fire(rig.routine("long"))
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.succeeded, 1)
    assert run.actions[0].agent_run_id is not None and run.actions[0].agent_run_id.startswith("fake_run_")
    assert run.actions[0].output is not None and run.actions[0].output.startswith("hello")
    assert [c.kind for c in rig.agent.calls_for("long")] == ["start", "poll", "poll"]
    polls = rig.queue.of(message.run_id, "poll")
    assert [(s.delay, s.message.attempt) for s in polls] == [(1.0, 1), (1.0, 1)]
    assert polls[0].run is not None and polls[0].run.status is RunStatus.running
    assert polls[0].run.progress.steps["step1"].lease_owner is None, (
        "a pending run holds no lease: polls carry it"
    )
    [start] = [d for d in rig.delivered(message.run_id) if d.kind == "fire"]
    assert start.seconds < 0.5, "the start returned at once"


def test_a_pending_run_costs_the_same_handler_work_however_long_the_agent_takes(rig: Rig) -> None:
    """docs/guarantees.md #6: the dispatcher never waits for the agent; runs of 1 s and of 3 s take
    the same number of handler invocations, each short."""
    messages = {}
    for seconds in (1, 3):
        rig.agent.script(f"takes-{seconds}s", [Reply.pending(done_after=seconds, retry_after=seconds)])
        messages[seconds] = rig.fire(rig.routine(f"takes-{seconds}s"))
    started = time.monotonic()
    rig.pump(rig.finished(*messages.values()))
    assert time.monotonic() - started >= 3
    work = {}
    for seconds, message in messages.items():
        assert rig.status(message) is RunStatus.succeeded
        deliveries = rig.delivered(message.run_id)
        assert max(d.seconds for d in deliveries) < 0.5
        calls = rig.agent.calls_for(f"takes-{seconds}s")
        assert calls[-1].received_at - calls[0].received_at >= seconds - 0.1
        work[seconds] = len(deliveries)
    assert work[1] == work[3] == 2, work


def test_a_zero_retry_after_does_not_poll_in_a_tight_loop(rig: Rig) -> None:
    rig.agent.script("eager", [Reply.pending(done_after=2, retry_after=0)])
    message = rig.fire(rig.routine("eager"))
    rig.pump(rig.finished(message))
    polls = [c.received_at for c in rig.agent.calls_for("eager", "poll")]
    assert 2 <= len(polls) <= 3, polls
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(polls))


# --- messages that must not run -----------------------------------------------------------------


GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not_json"),
    pytest.param(b"\xff\xfe\x00", id="not_utf8"),
    pytest.param(b"[]", id="json_array"),
    pytest.param(b"{}", id="empty_object"),
    pytest.param(b'{"v": 1, "kind": "fire"}', id="missing_fields"),
]


def _valid(**changes: Any) -> bytes:
    message = {
        "v": 1,
        "kind": "fire",
        "routine_id": "rt_0f3c2a9d6b1e4c7a",
        "scheduled_for": "2026-11-30T06:00:00Z",
        "routine_version": 1,
        "attempt": 1,
        "run_id": "run_8203981480000_15ccf52eda",
        "traceparent": None,
    }
    message.update(changes)
    return json.dumps({k: v for k, v in message.items() if v != "<drop>"}).encode()


GARBAGE += [
    pytest.param(_valid(v=2), id="unknown_version"),
    pytest.param(_valid(kind="cancel"), id="unknown_kind"),
    pytest.param(_valid(extra="x"), id="unknown_field"),
    pytest.param(_valid(scheduled_for="2026-11-30T06:00:00"), id="naive_time"),
    pytest.param(_valid(attempt=0), id="attempt_0"),
    pytest.param(_valid(routine_version="one"), id="version_not_int"),
    pytest.param(_valid(routine_id="rt_" + "a" * 80), id="routine_id_too_long"),
    pytest.param(_valid(run_id="<drop>"), id="no_run_id"),
]


@pytest.mark.parametrize("body", GARBAGE)
def test_an_unreadable_message_raises_poison(body: bytes) -> None:
    dispatcher = Dispatcher(MemoryStore(), MemoryQueue(), backend=cast(AgentBackend, None))
    with pytest.raises(PoisonMessage, match="unreadable dispatch message"):
        dispatcher.handle(body)


def test_garbage_goes_to_poison_and_the_next_message_still_runs(rig: Rig) -> None:
    rig.azure_queue.client.send_message("this is not a dispatch message")
    rig.azure_queue.client.send_message(json.dumps({"v": 1, "kind": "fire"}))
    message = rig.fire(rig.routine())
    rig.pump(lambda: rig.finished(message)() and len(rig.deliveries) >= 3)
    assert rig.status(message) is RunStatus.succeeded
    assert sorted(d.error or "" for d in rig.deliveries) == ["", "poison", "poison"]
    poisoned = [base64.b64decode(m.content) for m in rig.poison.peek_messages(max_messages=10)]
    assert sorted(poisoned) == sorted([b"this is not a dispatch message", b'{"v": 1, "kind": "fire"}'])


@pytest.mark.parametrize("change", ["deleted", "disabled", "rescheduled"])
def test_a_fire_queued_before_its_routine_changed_does_not_run(rig: Rig, change: str) -> None:
    routine = rig.routine()
    message = rig.fire(routine)
    current, etag = rig.store.get_routine(routine.id)
    if change == "deleted":
        rig.store.delete_routine(routine.id)
    else:
        update: dict[str, Any] = {"version": 2, "schedule_version": 2}
        if change == "disabled":
            update["state"] = RoutineState.disabled
        else:
            update["trigger"] = ScheduleTrigger(type="schedule", cron_expression="*/2 * * * * *")
        rig.store.replace_routine(current.model_copy(update=update), etag, current)
    rig.pump(lambda: len(rig.deliveries) >= 1)
    assert rig.agent.calls == []
    assert rig.status(message) is None, "no run recorded for a stale fire"


def test_a_routine_deleted_while_its_run_waits_to_retry_ends_cancelled(rig: Rig) -> None:
    rig.agent.script("flaky", [500, 200])
    routine = rig.routine("flaky", retry_policy=fixed(1))
    message = rig.fire(routine)
    rig.pump(lambda: rig.status(message) is RunStatus.retrying)
    rig.store.delete_routine(routine.id)
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.error_message) == (RunStatus.cancelled, "the routine was deleted")
    assert len(rig.agent.starts()) == 1


# --- overlap policies ------------------------------------------------------------------------


def seconds_ago(n: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=n)


def test_overlap_skip_records_a_skipped_run_while_the_first_runs(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(done_after=1.5, retry_after=1)])
    routine = rig.routine("long")
    first = rig.fire(routine, seconds_ago(2))
    rig.pump(lambda: rig.status(first) is RunStatus.running)
    second = rig.fire(routine, seconds_ago(1))
    rig.pump(rig.finished(second))
    skipped = rig.run(second)
    assert (skipped.status, skipped.attempt) == (RunStatus.skipped, 0)
    assert skipped.error_message == (
        f"skipped: run {first.run_id} of this routine was still running (overlap_policy skip)"
    )
    assert rig.status(first) is RunStatus.running
    rig.pump(rig.finished(first))
    assert rig.status(first) is RunStatus.succeeded
    assert len(rig.agent.starts()) == 1
    third = rig.fire(routine)
    rig.pump(rig.finished(third))
    assert rig.status(third) is RunStatus.succeeded, "the slot was released"


def test_overlap_buffer_one_runs_one_waiting_fire_after_the_first_and_skips_a_third(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(done_after=1.5, retry_after=1), 200])
    routine = rig.routine("long", overlap_policy="buffer_one")
    first = rig.fire(routine, seconds_ago(3))
    rig.pump(lambda: rig.status(first) is RunStatus.running)
    second = rig.fire(routine, seconds_ago(2))
    rig.pump(lambda: rig.status(second) is RunStatus.queued)
    rig.fire(routine, seconds_ago(2))  # a duplicate of the waiting fire must not start it early
    third = rig.fire(routine, seconds_ago(1))
    rig.pump(rig.finished(first, second, third), timeout=20)
    assert [rig.status(m) for m in (first, second, third)] == [
        RunStatus.succeeded,
        RunStatus.succeeded,
        RunStatus.skipped,
    ]
    first_done = rig.agent.calls_for("long", "poll")[-1].received_at
    [_, second_start] = rig.agent.starts("long")
    assert second_start.body["run_id"] == second.run_id
    assert second_start.received_at >= first_done, "the buffered fire started only after the first ended"
    # That a duplicate of the waiting fire's message does not start it early is checked without timing
    # in tests/test_decide.py (test_a_duplicate_of_a_buffered_fire_does_not_start_it); whether the
    # duplicate reaches a worker before the run ends here depends on the machine's speed.
    assert len(rig.delivered(second.run_id)) >= 2, "the fire and its release were delivered"
    assert rig.reader.get_slot(routine.id) is None


def test_overlap_allow_all_runs_fires_concurrently(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(done_after=1.5, retry_after=1)] * 2)
    routine = rig.routine("long", overlap_policy="allow_all")
    first, second = rig.fire(routine, seconds_ago(2)), rig.fire(routine, seconds_ago(1))
    rig.pump(lambda: rig.status(first) is RunStatus.running and rig.status(second) is RunStatus.running)
    rig.pump(rig.finished(first, second))
    assert rig.status(first) is rig.status(second) is RunStatus.succeeded
    starts = rig.agent.starts("long")
    assert len(starts) == 2
    assert max(c.received_at for c in starts) < min(
        c.received_at for c in rig.agent.calls_for("long", "poll")
    )


# --- manual and timer runs --------------------------------------------------------------------


def test_a_manual_dispatch_succeeds_with_trigger_manual(rig: Rig) -> None:
    routine = rig.routine()
    api = Api(rig.store, rig.queue, rig.settings)
    response = api.dispatch_routine(
        Request(
            "POST",
            route_params={"id": routine.id},
            headers={"content-type": "application/json"},
            body=b'{"input": {"ad hoc": true}}',
        )
    )
    assert response.status == 202
    run_id = response.body["id"]
    run = rig.reader.get_run(routine.id, run_id)[0]
    assert run.status is RunStatus.queued
    message = rig.queue.of(run_id)[0].message
    rig.pump(rig.finished(message))
    run = rig.run(message)
    assert (run.status, run.trigger.value, run.attempt) == (RunStatus.succeeded, "manual", 1)
    assert run.idempotency_key == f"{routine.id}:manual:{run_id}"
    [start] = rig.agent.starts()
    assert start.input == {"ad hoc": True} and start.idempotency_key == run.idempotency_key


def test_a_timer_routine_completes_after_its_fire(rig: Rig) -> None:
    now = datetime.now(UTC)
    fire = now.replace(microsecond=0) + timedelta(seconds=2)
    routine = rig.routine(trigger=TimerTrigger(type="timer", at=fire))
    current, etag = rig.store.get_routine(routine.id)
    scheduled = schedule_immediately(current, rig.queue, now)
    rig.store.replace_routine(scheduled, etag, current)
    [sent] = rig.queue.sent
    assert sent.delay == pytest.approx((fire - now).total_seconds() - scheduler.EARLY_SURFACE_SECONDS)
    rig.pump(rig.finished(sent.message))
    run = rig.run(sent.message)
    assert (run.status, run.trigger.value, run.scheduled_for) == (RunStatus.succeeded, "timer", fire)
    [start] = rig.agent.starts()
    assert start.received_at >= fire.timestamp(), "not before its time"
    assert start.received_at - fire.timestamp() < 1.5, "about on time"
    done, _ = rig.reader.get_routine(routine.id)
    assert (done.state, done.next_fire_at, done.due_at) == (RoutineState.completed, None, None)


# --- whole-second visibility delays -----------------------------------------------------------------


class ClockedAgent:
    """Fails each start with the next scripted error (``None``: succeeds); records the clock at starts."""

    def __init__(self, clock: Callable[[], datetime], errors: list[AgentError | None]) -> None:
        self.clock, self.errors = clock, errors
        self.starts: list[datetime] = []

    def start(self, call: AgentCall) -> AgentOutcome:
        self.starts.append(self.clock())
        error = self.errors.pop(0)
        if error is not None:
            raise error
        return AgentOutcome(done=True, output="ok")

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        raise AssertionError("never pending")

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        return None


def test_a_retry_surfacing_early_waits_for_its_time() -> None:
    """A retry due in 1.7 s is invisible for 1 s only (whole seconds): the attempt still waits for
    the retry's time (unit test on the in-memory store with a fake clock)."""
    now = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    clock = Clock(now)
    store, queue = MemoryStore(), MemoryQueue(clock)
    routine = make_routine(
        "early",
        id="rt_0f3c2a9d6b1e4c7a",
        trigger=EVERY_SECOND,
        actions=[{"type": "invocation", "agent_id": "a", "input": "x"}],
        now=now,
        retry_policy=fixed(1),
    )
    store.create_routine(routine)
    agent = ClockedAgent(clock, [AgentError("busy", retriable=True, retry_after=1.7), None])
    dispatcher = Dispatcher(store, queue, agent, clock=clock, sleep=clock.sleep)
    message = scheduler.fire_message(routine.id, now, 1, "schedule")
    queue.send(message)
    while (visible := queue.next_visible_at()) is not None:
        clock.now = max(clock.now, visible)
        for due in queue.due(clock.now):
            dispatcher.handle(due.encode())
    assert agent.starts == [now, now + timedelta(seconds=1.7)]
    assert store.get_run(routine.id, message.run_id)[0].status is RunStatus.succeeded


# --- a crash between a run write and the message that carries the run on --------------------------


def test_a_lost_retry_message_is_sent_again_on_redelivery(rig: Rig) -> None:
    rig.agent.script("flaky", [500, 200])
    message = rig.fire(rig.routine("flaky", retry_policy=fixed(1)))
    rig.queue.fail_next["retry"] = 1
    rig.pump(rig.finished(message), visibility=1)
    run = rig.run(message)
    assert (run.status, run.attempt) == (RunStatus.succeeded, 2)
    assert [d.error for d in rig.delivered(message.run_id)][:2] == ["StorageUnavailable", None]
    assert len(rig.agent.starts()) == 2


def test_a_lost_first_poll_message_is_sent_again_on_redelivery(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(polls=0, retry_after=1)])
    message = rig.fire(rig.routine("long"))
    rig.queue.fail_next["poll"] = 1
    rig.pump(rig.finished(message), visibility=1)
    assert rig.status(message) is RunStatus.succeeded
    assert len(rig.agent.starts()) == 1, "the redelivery polls, it does not start again"


def test_a_lost_release_of_a_buffered_fire_is_sent_again_on_redelivery(rig: Rig) -> None:
    rig.agent.script("long", [Reply.pending(done_after=1, retry_after=1), 200])
    routine = rig.routine("long", overlap_policy="buffer_one")
    first = rig.fire(routine, seconds_ago(2))
    rig.pump(lambda: rig.status(first) is RunStatus.running)
    second = rig.fire(routine, seconds_ago(1))
    rig.pump(lambda: rig.status(second) is RunStatus.queued)
    rig.queue.fail_next["retry"] = 1  # the release sent when the first run ends (a retry of attempt 1)
    rig.pump(rig.finished(first, second), visibility=1, timeout=20)
    assert rig.status(first) is rig.status(second) is RunStatus.succeeded
    assert any(d.error == "StorageUnavailable" for d in rig.delivered(first.run_id))


class FailsReplaceRoutineOnce:
    def __init__(self, store: TableStore) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def replace_routine(self, routine: Routine, etag: str, previous: Routine) -> str:
        if not self.failed:
            self.failed = True
            raise StorageUnavailable("injected: the host died before the timer was completed")
        result: str = self._store.replace_routine(routine, etag, previous)
        return result


def test_a_timer_completion_lost_to_a_crash_is_done_on_redelivery(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decide, "LEASE", timedelta(seconds=2))
    fire = datetime.now(UTC).replace(microsecond=0)
    routine = rig.routine(trigger=TimerTrigger(type="timer", at=fire + timedelta(hours=1)), timeout_seconds=1)
    current, etag = rig.store.get_routine(routine.id)
    rig.store.replace_routine(
        current.model_copy(update={"trigger": TimerTrigger(type="timer", at=fire)}), etag, current
    )
    message = rig.fire(routine, fire)
    crashing = Dispatcher(cast(Store, FailsReplaceRoutineOnce(rig.store)), rig.queue, rig.backend)
    rig.pump(rig.finished(message), visibility=1, dispatchers=[crashing])
    assert rig.status(message) is RunStatus.succeeded
    done, _ = rig.reader.get_routine(routine.id)
    assert done.state is RoutineState.completed


# --- cost -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fires", "bound"), [(1, 8), (10, 6)])
def test_storage_requests_per_fire(rig: Rig, fires: int, bound: int) -> None:
    """Tick + dispatch + completion of fires answered 200 at once, counted at the HTTP layer (the
    host's own receive and delete of each message come on top). A steady-state tick costs 2 requests
    whatever it finds (renewing its own lease, the due query), so a lone fire pays them alone."""
    now = datetime.now(UTC)
    scheduler.tick(rig.store, rig.queue, now, "tick-owner")  # an earlier tick: the lease is ours
    fire = now.replace(microsecond=0) + timedelta(seconds=1)
    yearly = ScheduleTrigger(
        type="schedule", cron_expression=f"{fire.second} {fire.minute} {fire.hour} {fire.day} {fire.month} *"
    )
    routines = [rig.routine(trigger=yearly, next_fire_at=fire, due_at=fire) for _ in range(fires)]
    rig.counter.reset()
    report = scheduler.tick(rig.store, rig.queue, now, "tick-owner")
    assert report.enqueued == fires
    tick_requests = rig.counter.count
    messages = [s.message for s in rig.queue.sent]
    rig.pump(rig.finished(*messages))
    total = rig.counter.reset()
    assert {rig.status(m) for m in messages} == {RunStatus.succeeded}
    assert len(rig.agent.starts()) == fires == len(routines)
    per_fire, dispatch = total / fires, total - tick_requests
    print(
        f"\n{fires} fire(s): {total} storage requests = {per_fire:.1f} per fire "
        f"(tick {tick_requests}, dispatch {dispatch} = {dispatch / fires:.1f} a fire)"
    )
    assert dispatch / fires <= 4, "dispatch: read routine, insert run + slot, read slot, finish"
    assert per_fire <= bound
