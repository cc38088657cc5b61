"""Exporter set-up, once per process: Application Insights, OTLP, or nothing (docs/observability.md).

``configure`` is called by ``routines.runtime.get_runtime`` the first time a trigger runs, never per
invocation. It picks one of:

- ``azure-monitor``: ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set. ``configure_azure_monitor``
  installs traces, metrics and logs (the ``routines`` logger hierarchy) exporters.
- ``otlp``: ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. OTLP/HTTP exporters for traces, metrics and logs
  (``<endpoint>/v1/traces``, ``/v1/metrics``, ``/v1/logs``); the other ``OTEL_EXPORTER_OTLP_*``
  variables (headers, timeouts) are read by the exporters themselves.
- ``none``: an SDK tracer provider without exporter, so runs still get trace ids and agents a
  ``traceparent`` that joins whatever tracing they do.
- ``external``: a tracer provider was installed before (the Functions Python worker does so with
  ``PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true``, a test, or a local snippet): it is used as is,
  and nothing is installed on top (no second pipeline, no duplicate telemetry).

JSON logs (``install_json_logs``) are opt-in: see ``configure``.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

from routines.config import Settings
from routines.telemetry import JsonLogFormatter

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

LOGGER_NAME = "routines"  # the hierarchy whose records are exported and (opt-in) written as JSON
SERVICE_NAME = "routines"  # service.name when OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES give none
# httpx instrumentation is off: the agent call spans already cover those requests, and an agent's
# Location URL may carry a credential in its query string (an Azure Functions `code=`) that the
# instrumentation would record as `url.full`.
AZURE_MONITOR_INSTRUMENTATION_OPTIONS: dict[str, dict[str, Any]] = {
    "httpx": {"enabled": False},
    "httpx2": {"enabled": False},
}

_mode: str | None = None
_lock = threading.Lock()


def configure(settings: Settings, *, json_logs: bool | None = None, log_stream: TextIO | None = None) -> str:
    """Install the exporters for this process, once; later calls change nothing and return the same.

    Returns the mode: ``azure-monitor``, ``otlp``, ``none`` or ``external`` (module docstring).
    ``json_logs`` (default: the ``log_format`` setting is ``json``) writes the ``routines`` loggers
    as JSON lines to ``log_stream`` (default stderr) instead of passing them to the root logger.
    """
    global _mode
    with _lock:
        if _mode is not None:
            return _mode
        if json_logs is None:
            json_logs = getattr(settings, "log_format", "text") == "json"
        if json_logs:
            install_json_logs(log_stream)
        _mode = _install_exporters(settings)
        log.info("telemetry: %s", _mode)
        return _mode


def _install_exporters(settings: Settings) -> str:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return "external"
    if settings.appinsights_connection_string:
        from azure.monitor.opentelemetry import configure_azure_monitor

        configure_azure_monitor(
            connection_string=settings.appinsights_connection_string,
            logger_name=LOGGER_NAME,
            instrumentation_options=AZURE_MONITOR_INSTRUMENTATION_OPTIONS,
        )
        return "azure-monitor"
    if settings.otlp_endpoint:
        _install_otlp(settings.otlp_endpoint.rstrip("/"))
        return "otlp"
    trace.set_tracer_provider(TracerProvider(resource=_resource()))
    return "none"


def _resource() -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    return resource


def _install_otlp(endpoint: str) -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = _resource()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    trace.set_tracer_provider(provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    try:
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.instrumentation.logging.handler import LoggingHandler
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    except ImportError:  # pragma: no cover - the logs signal is optional; traces and metrics still go
        log.warning("telemetry: OpenTelemetry logging packages missing; logs are not exported over OTLP")
        return
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{endpoint}/v1/logs"))
    )
    set_logger_provider(logger_provider)
    logging.getLogger(LOGGER_NAME).addHandler(LoggingHandler(logger_provider=logger_provider))


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``install_json_logs`` added, so a second call finds it (and remembers what to
    restore on ``uninstall_json_logs``)."""

    previous_level: int = logging.NOTSET


def install_json_logs(stream: TextIO | None = None, logger_name: str = LOGGER_NAME) -> logging.Handler:
    """Write ``logger_name``'s records (default: every ``routines.*`` logger) to ``stream`` (default
    stderr) as JSON lines (``telemetry.JsonLogFormatter``). Idempotent: returns the handler already
    installed, if any.

    The logger stops propagating to the root logger, so each record is written once (not also by a
    text handler such as the devhost's ``basicConfig``, or the Functions worker's, which forwards to
    the host's own logs). Exporters attached to this logger itself (Application Insights, OTLP) still
    see every record. A level of INFO is set when the logger has none. ``uninstall_json_logs`` undoes
    all this (pytest's ``caplog`` listens on the root logger: it sees nothing while JSON logs are on)."""
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if isinstance(handler, _JsonHandler):
            return handler
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    handler.previous_level = logger.level
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


def uninstall_json_logs(logger_name: str = LOGGER_NAME) -> None:
    """Remove the JSON handler; ``logger_name`` propagates to the root logger again, at its former level."""
    logger = logging.getLogger(logger_name)
    for handler in [h for h in logger.handlers if isinstance(h, _JsonHandler)]:
        logger.removeHandler(handler)
        logger.setLevel(handler.previous_level)
    logger.propagate = True
