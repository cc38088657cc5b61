"""Storage retries: one layer per kind of failure (docs/architecture.md, "Retries"), pinned as
request counts. A table write failing on the wire is tried ``WRITE_ATTEMPTS`` times by
``TableStore._execute`` with the SDK's own retries off; the dispatcher tries an outcome write again
only when the store did not already (``StorageUnavailable.retried``), so an outcome write through an
outage costs 6 requests, not 6 per dispatcher try. Sleeps are recorded, never slept."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport

from routines import runtime, scheduler
from routines.agents.base import AgentCall, AgentOutcome
from routines.config import Settings, StorageTarget
from routines.dispatcher import OUTCOME_WRITE_PAUSES, Dispatcher
from routines.errors import StorageUnavailable
from routines.messages import MemoryQueue
from routines.models import InvocationAction, Run, RunStatus
from routines.store import SlotWrite, tables
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore
from tests.helpers import Clock, make_routine

FIRE = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
WRITES = ("create_entity", "update_entity", "upsert_entity", "delete_entity", "submit_transaction")


class UnreachableTable:
    """A table client whose every write fails with ``error``; records the keyword arguments."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[dict[str, Any]] = []
        for name in WRITES:
            setattr(self, name, self._fail)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        raise self.error


def unavailable(status: int) -> HttpResponseError:
    error = HttpResponseError(message=f"{status} from storage")
    error.status_code = status
    return error


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The store's back-off pauses, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(tables, "time", SimpleNamespace(sleep=recorded.append))
    return recorded


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ServiceRequestError("connection refused"), id="refused"),
        pytest.param(ServiceResponseError("connection reset"), id="answer_lost"),
        pytest.param(unavailable(503), id="server_busy"),
    ],
)
def test_a_table_write_failing_on_the_wire_is_tried_six_times_by_the_store_alone(
    error: Exception, sleeps: list[float]
) -> None:
    table = UnreachableTable(error)
    service: Any = SimpleNamespace(get_table_client=lambda name: table)
    store = TableStore(service, "t")
    with pytest.raises(StorageUnavailable) as failed:
        store.create_routine(make_routine(fire=FIRE))  # its rows in one transaction
    assert len(table.calls) == tables.WRITE_ATTEMPTS == 6
    assert all(call.get("retry_total") == 0 for call in table.calls), "the SDK must not retry writes too"
    assert len(sleeps) == 5
    assert failed.value.retried, "marked, so no caller tries it all again"


class OutcomeDown(MemoryStore):
    """Every terminal write (the outcome of an agent call) fails with ``error``; counts them."""

    def __init__(self, error: StorageUnavailable) -> None:
        super().__init__()
        self.error, self.outcome_writes = error, 0

    def write_run(self, run: Run, etag: str | None, slot: SlotWrite | None = None) -> tuple[str, str | None]:
        if run.status.terminal:
            self.outcome_writes += 1
            raise self.error
        return super().write_run(run, etag, slot)


class Answers:
    """Answers every start at once; ``on_start`` runs first (to take storage down, say)."""

    def __init__(self, on_start: Any = None) -> None:
        self.on_start, self.starts = on_start, 0

    def start(self, call: AgentCall) -> AgentOutcome:
        self.starts += 1
        if self.on_start is not None:
            self.on_start()
        return AgentOutcome(done=True, output="ok")

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        raise AssertionError("never polled")

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        raise AssertionError("never cancelled")


@pytest.mark.parametrize(
    ("retried", "store_calls"),
    [
        pytest.param(False, 1 + len(OUTCOME_WRITE_PAUSES), id="a_store_without_retries_of_its_own"),
        pytest.param(True, 1, id="already_retried_by_the_store"),
    ],
)
def test_the_dispatcher_tries_an_outcome_write_again_only_when_the_store_did_not(
    retried: bool, store_calls: int
) -> None:
    store, queue, clock = OutcomeDown(StorageUnavailable("down", retried=retried)), MemoryQueue(), Clock(FIRE)
    routine = make_routine("outcome", now=FIRE)
    store.create_routine(routine)
    message = scheduler.fire_message(routine.id, FIRE, routine.schedule_version, "schedule")
    dispatcher = Dispatcher(store, queue, Answers(), clock=clock, sleep=clock.sleep)
    with pytest.raises(StorageUnavailable):
        dispatcher.handle(message.encode())
    assert store.outcome_writes == store_calls


def test_an_outcome_write_through_an_outage_costs_six_requests_on_azurite(
    azurite: Any, table_prefix: str, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole stack as production builds it (``runtime.storage_clients``): storage goes down
    while the agent runs, so the first request after it is the outcome write."""
    refused: list[str] = []
    down = False

    def switched(**options: Any) -> Any:
        """The transport ``storage_clients`` builds, refusing every request while ``down``."""
        transport = RequestsTransport(**options)
        send = transport.send

        def maybe_send(request: Any, **kwargs: Any) -> Any:
            if down:
                refused.append(f"{request.method} {request.url.split('?')[0]}")
                raise ServiceRequestError("injected: storage unreachable")
            return send(request, **kwargs)

        transport.send = maybe_send
        return transport

    monkeypatch.setattr(runtime, "RequestsTransport", switched)
    settings = Settings(StorageTarget(azurite.connection_string), table_prefix=table_prefix)
    service, _ = runtime.storage_clients(settings)
    store = TableStore(service, table_prefix)
    store.ensure_tables()
    routine = make_routine(
        "outage", now=FIRE, actions=[InvocationAction(type="invocation", agent_id="a", input="x")]
    )
    store.create_routine(routine)

    def storage_goes_down() -> None:
        nonlocal down
        down = True

    clock, queue = Clock(FIRE), MemoryQueue()
    agent = Answers(on_start=storage_goes_down)
    dispatcher = Dispatcher(store, queue, agent, clock=clock, sleep=clock.sleep)
    message = scheduler.fire_message(routine.id, FIRE, routine.schedule_version, "schedule")
    dispatcher.deliver(message.encode())  # storage unavailable: the message is re-queued
    assert agent.starts == 1
    assert len(refused) == 6, refused  # one layer: TableStore's; not 6 per dispatcher try (24)
    assert len(set(refused)) == 1, "the same request each time: the outcome write"
    [(delay, again)] = queue.take_all()
    assert again.run_id == message.run_id and delay > 0
    down = False
    run, _ = store.get_run(routine.id, message.run_id)
    assert run.status is RunStatus.running, "the outcome is lost; the lease ends it (guarantee #2)"
