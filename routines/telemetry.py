"""OpenTelemetry: spans, metrics, W3C ``traceparent`` in queue messages, JSON logs (docs/observability.md).

One trace covers a fire from the tick to the agent::

    routines.tick (SERVER)                         one per tick (or routines.hook (SERVER): one per
      routines.fire (PRODUCER)                     webhook delivery, whose run's message carries it)
        │                                          one per fire enqueued; its context is the
        │                                          message's ``traceparent``
        routines.dispatch.fire (CONSUMER)          one per message handled, child of the message
          routines.agent.start (CLIENT)            one per agent call; the agent gets its traceparent
          routines.dispatch.retry / .poll          a retry or poll message carries the context of the
            routines.agent.start / .poll (CLIENT)  dispatch span that sent it, so it joins the trace

The rest of Routines calls the small helpers here and never touches the OpenTelemetry API directly.
Exporters are installed once per process by ``routines.observability.configure``; until then (and in
unit tests that install nothing) every span and instrument is a no-op and messages carry no
``traceparent``.

Metric attributes are low-cardinality on purpose (status, trigger, source): per-routine questions are
answered from spans and logs, which carry ``routine.id``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from routines.agents.base import AgentCall

__all__ = [
    "JsonLogFormatter",
    "call_attributes",
    "current_trace_id",
    "current_traceparent",
    "fire_span",
    "run_attributes",
    "span",
    "tick_span",
    "trace_id_of",
]

_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("routines")
meter = metrics.get_meter("routines")

TICK_SPAN: Final = "routines.tick"
FIRE_SPAN: Final = "routines.fire"
DISPATCH_SPAN_PREFIX: Final = "routines.dispatch."  # + the message kind: fire, retry, poll
AGENT_START_SPAN: Final = "routines.agent.start"
AGENT_POLL_SPAN: Final = "routines.agent.poll"
HOOK_SPAN: Final = "routines.hook"  # a webhook delivery; its run's messages carry this span's context

# The span kind follows from the name, so call sites only name what they do. The kinds are what
# Application Insights maps to its tables: SERVER/CONSUMER -> requests, the others -> dependencies.
_KIND_BY_PREFIX: Final = (
    (TICK_SPAN, SpanKind.SERVER),
    (HOOK_SPAN, SpanKind.SERVER),
    (FIRE_SPAN, SpanKind.PRODUCER),
    (DISPATCH_SPAN_PREFIX, SpanKind.CONSUMER),
    ("routines.agent.", SpanKind.CLIENT),
)

fires_scheduled = meter.create_counter(
    "routines.fires.scheduled", unit="{fire}", description="Fires enqueued by the tick or on create/update"
)
runs_finished = meter.create_counter(
    "routines.runs.finished", unit="{run}", description="Runs reaching a final status, by status"
)
dispatch_lag = meter.create_histogram(
    "routines.dispatch.lag", unit="s", description="Agent start minus scheduled time (first attempt)"
)
retries = meter.create_counter("routines.retries", unit="{attempt}", description="Retries scheduled")
poison_messages = meter.create_counter(
    "routines.poison", unit="{message}", description="Unreadable dispatch messages"
)
routines_paused = meter.create_counter(
    "routines.paused", unit="{routine}", description="Routines disabled by pause_after_failures"
)
tick_duration = meter.create_histogram("routines.tick.duration", unit="s", description="Tick wall time")


# --- spans -------------------------------------------------------------------------------------------


def _kind_for(name: str) -> SpanKind:
    for prefix, kind in _KIND_BY_PREFIX:
        if name.startswith(prefix):
            return kind
    return SpanKind.INTERNAL


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenTelemetry rejects ``None`` attribute values (with a warning each): drop them."""
    return {k: v for k, v in (attributes or {}).items() if v is not None}


@contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    traceparent: str | None = None,
    kind: SpanKind | None = None,
) -> Iterator[Span]:
    """A span, child of ``traceparent`` when given (the message's trace), else of the current one.

    ``kind`` defaults to the one its name implies (see the module docstring). An exception marks the
    span failed, is recorded on it, and propagates."""
    parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind if kind is not None else _kind_for(name),
        attributes=_clean(attributes),
        record_exception=True,
        set_status_on_exception=True,
    ) as current:
        yield current


@contextmanager
def tick_span() -> Iterator[Span]:
    """The tick's span; records ``routines.tick.duration`` when it ends."""
    started = time.perf_counter()
    try:
        with span(TICK_SPAN, {"faas.trigger": "timer"}) as current:
            yield current
    finally:
        tick_duration.record(time.perf_counter() - started)


@contextmanager
def fire_span(
    routine_id: str, run_id: str, scheduled_for: datetime, routine_name: str | None = None
) -> Iterator[Span]:
    """A short span per fire scheduled: the fire message carries *its* traceparent, so each run's
    dispatch spans hang under the fire that caused them."""
    attributes = run_attributes(routine_id, run_id, 1, routine_name)
    attributes["fire.scheduled_for"] = scheduled_for.astimezone(UTC).isoformat().replace("+00:00", "Z")
    with span(FIRE_SPAN, attributes) as current:
        yield current


def fail(current: Span, message: str) -> None:
    current.set_status(Status(StatusCode.ERROR, message))


def attempt_failed(message: str, retriable: bool) -> None:
    """Mark the current span (the dispatch of a failed attempt) as failed."""
    current = trace.get_current_span()
    current.set_attribute("run.attempt.retriable", retriable)
    fail(current, message[:300])


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Add attributes (``None`` values skipped) to the current span, e.g. ``routine.name`` once the
    dispatcher has read the routine."""
    trace.get_current_span().set_attributes(_clean(attributes))


def run_attributes(
    routine_id: str,
    run_id: str | None = None,
    attempt: int | None = None,
    routine_name: str | None = None,
    agent_id: str | None = None,
) -> dict[str, Any]:
    """The standard attributes (docs/observability.md), ``None`` ones out. Also usable as a log record's
    ``extra``: the JSON formatter and Application Insights (``customDimensions``) keep them."""
    return _clean(
        {
            "routine.id": routine_id,
            "routine.name": routine_name,
            "run.id": run_id,
            "run.attempt": attempt,
            "agent.id": agent_id,
        }
    )


def call_attributes(call: AgentCall, routine_name: str | None = None) -> dict[str, Any]:
    """Attributes of an agent call span. ``peer.service`` names the agent, so Application Insights
    shows each agent as a dependency target (and a node of the application map)."""
    attributes = run_attributes(call.routine_id, call.run_id, call.attempt, routine_name, call.agent or None)
    attributes["action.index"] = call.action_index
    attributes["action.type"] = call.action_type
    if call.agent:
        attributes["peer.service"] = call.agent
    return attributes


_Call = TypeVar("_Call", bound=AgentCall)


def with_traceparent(call: _Call) -> _Call:
    """``call`` carrying the current span's traceparent (the agent call span), so the agent's own
    spans become children of the call that started them. Unchanged when tracing is off."""
    traceparent = current_traceparent()
    return replace(call, traceparent=traceparent) if traceparent else call


# --- trace context -----------------------------------------------------------------------------------


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or ``None`` when there is no valid span (no SDK)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, otel_context.get_current())
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a traceparent header, or ``None`` when it is not a valid one."""
    if not traceparent:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


_R = TypeVar("_R")


def in_current_context(function: Callable[..., _R]) -> Callable[..., _R]:
    """Wrap ``function`` to run in the caller's trace context, e.g. on a thread pool's threads (which
    start with an empty context), so spans made there (Azure SDK calls) join the caller's trace."""
    captured = otel_context.get_current()

    def run(*args: Any, **kwargs: Any) -> _R:
        token = otel_context.attach(captured)
        try:
            return function(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run


# --- metrics -----------------------------------------------------------------------------------------


def record_tick(enqueued: int) -> None:
    record_fires(enqueued, "tick")


def record_fires(count: int, source: str) -> None:
    """``source``: ``tick``, ``api`` for fires enqueued at once on create / update / enable, or
    ``webhook`` for a run started by a delivery."""
    if count:
        fires_scheduled.add(count, {"source": source})


def record_run_finished(status: str, trigger: str | None = None) -> None:
    """A run reached a final status (``trigger``: schedule, timer, manual or webhook)."""
    runs_finished.add(1, _clean({"status": status, "trigger": trigger}))


def record_dispatch_lag(seconds: float, trigger: str | None = None, step: str | None = None) -> None:
    """Start - scheduled time of a run's first step; of a later step, start - the time it became
    ready (its dependencies done), with ``step``."""
    dispatch_lag.record(seconds, _clean({"trigger": trigger, "step.id": step}))
    trace.get_current_span().set_attribute("run.dispatch_lag_s", round(seconds, 3))


def record_retry(trigger: str | None = None) -> None:
    retries.add(1, _clean({"trigger": trigger}))


def record_poison() -> None:
    poison_messages.add(1)


def record_paused(routine_id: str, failures: int) -> None:
    """A routine disabled by ``pause_after_failures``: a metric, and an event on the current span."""
    routines_paused.add(1)
    trace.get_current_span().add_event("routine.paused", {"routine.id": routine_id, "failures": failures})


# --- structured logs ---------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted.
_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    # set by opentelemetry-instrumentation-logging when it is active; read below instead
    "otelTraceID",
    "otelSpanID",
    "otelTraceSampled",
    "otelServiceName",
}
# An ``extra`` field whose name contains one of these is never written out: agent inputs may hold
# anything, and credentials must not reach a log by accident.
REDACTED_FIELD_PARTS: Final = (
    "input",
    "token",
    "secret",
    "password",
    "authorization",
    "signature",
    "credential",
    "connection_string",
    "api_key",
)
REDACTED: Final = "[redacted]"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message``,
    ``trace_id`` and ``span_id`` (of the span current when the record was emitted; ``null`` outside
    one), then every ``extra=`` field (``routine.id``, ``run.id``, ...), ``exception`` and ``stack``.

    Extra fields named like an input or a credential (``REDACTED_FIELD_PARTS``) are replaced by
    ``"[redacted]"``; values that are not JSON are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _log_ids(record)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": trace_id,
            "span_id": span_id,
        }
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key in entry:
                continue
            lowered = key.lower()
            entry[key] = REDACTED if any(part in lowered for part in REDACTED_FIELD_PARTS) else value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def _log_ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    stamped = getattr(record, "otelTraceID", None)
    if isinstance(stamped, str) and stamped.strip("0"):
        span_id = getattr(record, "otelSpanID", None)
        return stamped, span_id if isinstance(span_id, str) else None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
