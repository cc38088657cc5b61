"""Telemetry (docs/observability.md): one trace from tick to agent, metrics, JSON logs, exporter set-up.

A real flow on the in-memory store and queue with the HTTP backend against ``FakeAgent``: the agent
fails once (500), the retry succeeds. Spans go to an in-memory exporter and metrics to an in-memory
reader, both installed once per session on the global providers (OpenTelemetry allows one global
provider per process): the ``otel`` fixture clears them around each test.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from routines import observability, scheduler, telemetry
from routines.agents.http import HttpAgentBackend
from routines.api import Api, Request
from routines.config import Settings, StorageTarget
from routines.dispatcher import Dispatcher
from routines.messages import DispatchMessage, MemoryQueue
from routines.models import RunStatus
from routines.scheduler import tick
from routines.store.memory import MemoryStore
from tests.fake_agent import FakeAgent, Reply
from tests.helpers import Clock

AGENT = "flaky-agent"
SECRET_INPUT = "do-not-log-7f3a91c2"  # appears only in the routine's input
DELIVERY_LATENCY = timedelta(milliseconds=1250)  # how late each message is handled after it surfaces


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def metric_points(self) -> dict[str, list[Any]]:
        """Data points recorded since the last call (delta temporality), by metric name."""
        data = self.reader.get_metrics_data()
        points: dict[str, list[Any]] = {}
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


_session: Otel | None = None


@pytest.fixture
def otel() -> Iterator[Otel]:
    """SDK tracer and meter providers with in-memory exporters: installed on first use, then reused
    (a global provider can be set once per process); emptied before and after each test."""
    global _session
    if _session is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        assert isinstance(trace.get_tracer_provider(), TracerProvider)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        delta = AggregationTemporality.DELTA
        reader = InMemoryMetricReader(preferred_temporality={Counter: delta, Histogram: delta})
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _session = Otel(exporter, reader)
    _session.spans.clear()
    _session.metric_points()  # drop what earlier tests recorded
    yield _session
    _session.spans.clear()


@dataclass
class Flow:
    store: MemoryStore
    queue: MemoryQueue
    clock: Clock
    dispatcher: Dispatcher
    routine_id: str
    fire_at: datetime
    handled: list[DispatchMessage] = field(default_factory=list)

    def pump(self) -> None:
        """Hand every queued message to the dispatcher in due order, moving the clock to each one's
        due time (plus a little delivery latency), until the queue is empty."""
        pending: list[tuple[datetime, int, DispatchMessage]] = []
        order = itertools.count()
        while True:
            for delay, message in self.queue.take_all():
                due = self.clock.now + timedelta(seconds=delay)
                heapq.heappush(pending, (due, next(order), message))
            if not pending:
                return
            due, _, message = heapq.heappop(pending)
            self.clock.now = max(self.clock.now, due + DELIVERY_LATENCY)
            self.handled.append(message)
            self.dispatcher.handle(message.encode())


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


def run_flaky_flow(agent: FakeAgent, replies: list[Any] | None = None) -> Flow:
    """A daily routine created a few minutes ahead (so the *tick* schedules its fire), run through the
    tick and the dispatcher: the agent answers 500, then 200 to the retry one second later (or
    ``replies``)."""
    agent.script(AGENT, [500, 200] if replies is None else replies)
    # Near real time: the HTTP backend checks the run's deadline against the real clock.
    start = datetime.now(UTC).replace(microsecond=0)
    fire_at = start.replace(second=0) + timedelta(minutes=3)
    clock = Clock(start)
    store, queue = MemoryStore(), MemoryQueue()
    settings = Settings(storage=StorageTarget(connection_string="unused"))
    body = {
        "name": "nightly-scan",
        "trigger": {"type": "schedule", "cron_expression": f"{fire_at.minute} {fire_at.hour} * * *"},
        "actions": [{"type": "invocation", "agent_id": AGENT, "input": {"instructions": SECRET_INPUT}}],
        "retry_policy": {"max_attempts": 3, "delays_seconds": [1]},
    }
    created = Api(store, queue, settings, clock).create_routine(
        Request("POST", headers={"content-type": "application/json"}, body=json.dumps(body).encode())
    )
    assert created.status == 201, created.body
    assert queue.take_all() == []  # the fire is beyond the look-ahead: the tick will enqueue it

    backend = HttpAgentBackend(agent.url)
    dispatcher = Dispatcher(store, queue, backend, clock=clock, sleep=clock.sleep)
    flow = Flow(store, queue, clock, dispatcher, created.body["id"], fire_at)
    clock.now = fire_at - timedelta(seconds=30)
    report = tick(store, queue, clock())
    assert report.enqueued == 1
    try:
        flow.pump()
    finally:
        backend.close()
    return flow


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def test_one_trace_covers_tick_fire_dispatches_retry_and_agent_calls(otel: Otel, agent: FakeAgent) -> None:
    flow = run_flaky_flow(agent)

    [run] = flow.store.list_runs(flow.routine_id, None, 10, None).items
    assert (run.status, run.attempt) == (RunStatus.succeeded, 2)
    assert [m.kind for m in flow.handled] == ["fire", "retry"]

    spans = list(otel.spans.get_finished_spans())
    [tick_span] = by_name(spans, "routines.tick")
    [fire] = by_name(spans, "routines.fire")
    [first] = by_name(spans, "routines.dispatch.fire")
    [second] = by_name(spans, "routines.dispatch.retry")
    calls = by_name(spans, "routines.agent.start")
    assert len(calls) == 2

    trace_id = tick_span.context.trace_id
    assert {s.context.trace_id for s in [fire, first, second, *calls]} == {trace_id}
    assert run.trace_id == format(trace_id, "032x")
    # tick -> fire -> dispatch of the fire -> its agent call; the retry hangs under the failed dispatch
    assert tick_span.parent is None
    assert parent_id(fire) == tick_span.context.span_id
    assert parent_id(first) == fire.context.span_id
    # each agent call under its step's span, under the dispatch
    steps = by_name(spans, "routines.step.start")
    assert [parent_id(c) for c in calls] == [s.context.span_id for s in steps]
    assert [parent_id(s) for s in steps] == [first.context.span_id, second.context.span_id]
    assert [(s.attributes or {})["step.id"] for s in steps] == ["step1", "step1"]
    assert parent_id(second) == first.context.span_id
    assert [s.kind for s in (tick_span, fire, first, second, calls[0])] == [
        SpanKind.SERVER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
    ]

    # The failed attempt is an error on its agent call and on its dispatch; the retry is not.
    assert calls[0].status.status_code is StatusCode.ERROR
    assert first.status.status_code is StatusCode.ERROR
    assert calls[1].status.status_code is not StatusCode.ERROR
    assert second.status.status_code is not StatusCode.ERROR
    assert second.attributes is not None and second.attributes["run.status"] == "succeeded"

    expected = {"routine.id": flow.routine_id, "routine.name": "nightly-scan", "run.id": run.id}
    for attempt, (dispatch, call) in enumerate([(first, calls[0]), (second, calls[1])], start=1):
        assert {**expected, "run.attempt": attempt, "agent.id": AGENT}.items() <= dict(
            call.attributes or {}
        ).items()
        assert {**expected, "run.attempt": attempt}.items() <= dict(dispatch.attributes or {}).items()
    assert {**expected, "run.attempt": 1}.items() <= dict(fire.attributes or {}).items()

    # The agent got the trace on both calls, as a child of the agent call span.
    starts = agent.starts(AGENT)
    assert len(starts) == 2
    for received, call in zip(starts, calls, strict=True):
        traceparent = received.headers["traceparent"]
        assert telemetry.trace_id_of(traceparent) == run.trace_id
        assert traceparent.split("-")[2] == format(call.context.span_id, "016x")


def test_status_polls_join_the_trace(otel: Otel, agent: FakeAgent) -> None:
    flow = run_flaky_flow(agent, [Reply.pending(polls=1, retry_after=1)])
    [run] = flow.store.list_runs(flow.routine_id, None, 10, None).items
    assert run.status is RunStatus.succeeded
    assert [m.kind for m in flow.handled] == ["fire", "poll", "poll"]

    spans = list(otel.spans.get_finished_spans())
    [first] = by_name(spans, "routines.dispatch.fire")
    [start] = by_name(spans, "routines.agent.start")
    dispatch_polls = by_name(spans, "routines.dispatch.poll")
    agent_polls = by_name(spans, "routines.agent.poll")
    assert len(dispatch_polls) == len(agent_polls) == 2
    assert {s.context.trace_id for s in [first, start, *dispatch_polls, *agent_polls]} == {
        int(run.trace_id or "0", 16)
    }
    # The poll message is sent by the dispatch that started the agent, and re-sent unchanged.
    assert [parent_id(s) for s in dispatch_polls] == [first.context.span_id] * 2
    step_polls = by_name(spans, "routines.step.poll")
    assert [parent_id(s) for s in agent_polls] == [s.context.span_id for s in step_polls]
    assert [parent_id(s) for s in step_polls] == [s.context.span_id for s in dispatch_polls]
    expected = {"run.id": run.id, "agent.id": AGENT, "routine.name": "nightly-scan"}
    assert expected.items() <= dict(agent_polls[0].attributes or {}).items()
    assert (
        dispatch_polls[-1].attributes is not None
        and dispatch_polls[-1].attributes["run.status"] == "succeeded"
    )
    polls = agent.calls_for(AGENT, "poll")
    assert [c.headers["traceparent"].split("-")[2] for c in polls] == [
        format(s.context.span_id, "016x") for s in agent_polls
    ]


def test_metrics_of_the_flow(otel: Otel, agent: FakeAgent) -> None:
    run_flaky_flow(agent)
    points = otel.metric_points()

    [lag] = points["routines.dispatch.lag"]
    assert lag.count == 1  # the first attempt only
    # Fires surface EARLY_SURFACE_SECONDS ahead of their time (scheduler.fire_delay).
    expected = DELIVERY_LATENCY.total_seconds() - scheduler.EARLY_SURFACE_SECONDS
    assert lag.sum == pytest.approx(expected, abs=0.01)
    assert dict(lag.attributes) == {"trigger": "schedule"}

    finished = {(p.attributes["status"], p.value) for p in points["routines.runs.finished"]}
    assert finished == {("succeeded", 1)}
    assert sum(p.value for p in points["routines.retries"]) == 1
    [fires] = points["routines.fires.scheduled"]
    assert (dict(fires.attributes), fires.value) == ({"source": "tick"}, 1)
    [tick_duration] = points["routines.tick.duration"]
    assert tick_duration.count == 1


def test_json_logs_of_the_flow_carry_the_trace_and_never_the_input(
    otel: Otel, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("routines")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    handler = observability.install_json_logs(stream)
    try:
        flow = run_flaky_flow(agent)
    finally:
        observability.uninstall_json_logs()
    assert logger.propagate and handler not in logger.handlers and logger.level == logging.NOTSET

    [run] = flow.store.list_runs(flow.routine_id, None, 10, None).items
    text = stream.getvalue()
    assert SECRET_INPUT not in text
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message", "trace_id", "span_id"} <= line.keys()
    failed = [line for line in lines if "attempt 1 failed" in line["message"]]
    assert len(failed) == 1
    assert failed[0]["level"] == "WARNING"
    assert failed[0]["trace_id"] == run.trace_id
    assert (failed[0]["run.id"], failed[0]["run.attempt"]) == (run.id, 1)
    finished = [line for line in lines if line["message"].endswith(": succeeded")]
    assert [line["trace_id"] for line in finished] == [run.trace_id]


def test_json_formatter_fields_ids_and_redaction(otel: Otel) -> None:
    record = logging.LogRecord(
        "routines.dispatcher", logging.ERROR, __file__, 1, "run %s failed", ("run_1",), None
    )
    record.__dict__.update(
        {
            "run.id": "run_1",
            "input": {"prompt": SECRET_INPUT},
            "agent_token": "tok-1",
            "when": datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
        }
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    formatter = telemetry.JsonLogFormatter()

    outside = json.loads(formatter.format(record))
    assert (outside["trace_id"], outside["span_id"]) == (None, None)
    with telemetry.span("routines.test") as current:
        line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["trace_id"] == format(current.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(current.get_span_context().span_id, "016x")
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "ERROR",
        "routines.dispatcher",
        "run run_1 failed",
    )
    assert entry["time"].endswith("Z")
    assert entry["run.id"] == "run_1"
    assert entry["input"] == entry["agent_token"] == "[redacted]"
    assert SECRET_INPUT not in line and "tok-1" not in line
    assert entry["when"].startswith("2026-11-30 06:00:00")
    assert "ValueError: boom" in entry["exception"]


def test_messages_carry_no_traceparent_of_a_span_that_ended(otel: Otel) -> None:
    with telemetry.span("routines.tick"):
        inside = telemetry.current_traceparent()
    assert inside is not None and telemetry.trace_id_of(inside) is not None
    assert telemetry.current_traceparent() is None
    assert telemetry.trace_id_of("not-a-traceparent") is None


def test_configure_once_and_leaves_an_installed_provider_alone(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_mode", None)
    provider = trace.get_tracer_provider()
    settings = Settings(storage=StorageTarget(connection_string="unused"), otlp_endpoint="http://127.0.0.1:9")
    assert observability.configure(settings) == "external"
    assert observability.configure(Settings(storage=StorageTarget(connection_string="unused"))) == "external"
    assert trace.get_tracer_provider() is provider
    assert not any(
        type(h).__name__ == "LoggingHandler" for h in logging.getLogger(observability.LOGGER_NAME).handlers
    )


def test_install_json_logs_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("routines")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    stream = io.StringIO()
    first = observability.install_json_logs(stream)
    try:
        assert observability.install_json_logs(io.StringIO()) is first
        assert not logger.propagate
        logging.getLogger("routines.scheduler").info("hello %s", "world", extra={"routine.id": "rt_1"})
    finally:
        observability.uninstall_json_logs()
    assert logger.propagate and logger.level == logging.NOTSET
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "hello world"
    assert json.loads(line)["routine.id"] == "rt_1"


def test_a_webhook_delivery_span_is_the_root_of_its_runs_trace(otel: Otel) -> None:
    """routines.hook (SERVER) -> routines.dispatch.fire -> routines.agent.start, one trace; the run
    records that trace id and the delivery span names the run."""
    from tests.test_webhooks import World

    world = World()
    rid = world.create()["id"]
    run_id = world.deliver(rid).body["id"]
    world.drain()
    spans = {s.name: s for s in otel.spans.get_finished_spans()}
    hook, dispatch, start = (
        spans["routines.hook"],
        spans["routines.dispatch.fire"],
        spans["routines.agent.start"],
    )
    assert hook.kind is SpanKind.SERVER and hook.attributes is not None
    assert hook.attributes["run.id"] == run_id and hook.attributes["webhook.delivery_id"] == "msg_1"
    assert hook.attributes["routine.id"] == rid and hook.attributes["webhook.outcome"] == 202
    assert dispatch.parent is not None and dispatch.parent.span_id == hook.context.span_id
    assert start.context.trace_id == hook.context.trace_id
    run = world.store.get_run(rid, run_id)[0]
    assert run.trace_id == format(hook.context.trace_id, "032x")
    fires = otel.metric_points()["routines.fires.scheduled"]
    assert any(p.attributes == {"source": "webhook"} and p.value == 1 for p in fires)
