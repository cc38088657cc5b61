"""A local host for ``function_app.py``: its HTTP routes, timers and queue triggers, without Core Tools.

``python -m routines.devhost [--port 7071] [--app-dir .] [--no-timers]``

The triggers come from the app's own decorators (``app.get_functions()``), so a route, schedule or
queue name changed in ``function_app.py`` is what runs here. Settings come from the environment,
then ``local.settings.json`` ``Values``; binding expressions ``%NAME%`` resolve against them. The
queue trigger follows ``host.json`` ``extensions.queues`` (batch size, new-batch threshold, polling
back-off, visibility timeout, ``maxDequeueCount`` then ``<queue>-poison``, base64 or plain messages).

With ``--function-key KEY``, routes whose ``auth_level`` is not anonymous need that key (header
``x-functions-key`` or query ``code``) as in Azure, else ``401``; without it every route is open.
What it does not do (see ``DevHost``): per-function and host keys, timer schedule monitoring and singleton
locks, output and input bindings, other trigger types.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import util as importlib_util
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote

import azure.functions as func
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as FuncQueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import LinearRetry, QueueClient
from azure.storage.queue import QueueMessage as StorageQueueMessage
from croniter import croniter

from routines.errors import RoutinesError

log = logging.getLogger("routines.devhost")

DEFAULT_PORT = 7071
SHUTDOWN_GRACE_SECONDS = 30.0
# Like the Functions host: a received message stays invisible this long while it is processed.
PROCESSING_VISIBILITY_SECONDS = 600
MIN_POLLING_INTERVAL = 0.1
MAX_REQUEST_BODY = 100 * 1024 * 1024  # the Functions host's request size limit
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})  # Host headers the devhost answers
PAST_DUE_AFTER = timedelta(seconds=1)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
# Any other method token (QUERY, PROPFIND, ...) is routed too, so it gets 405 or 404 rather than the
# http.server default of 501.
_METHOD_TOKEN = re.compile(r"^[A-Z][A-Z0-9-]{0,31}$")
QUEUE_NAME_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


class DevHostError(RoutinesError, RuntimeError):
    """The app cannot be hosted as declared (the message names the function and setting)."""


# -- settings and host.json ---------------------------------------------------------------------------


def apply_local_settings(app_dir: Path, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Copy ``local.settings.json`` ``Values`` into ``environ`` where not already set.

    The environment wins over the file. Returns the names taken from the file.
    Raises ``DevHostError`` when the file exists but is not a JSON object with an object ``Values``.
    """
    path = app_dir / "local.settings.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise DevHostError(f"{path}: cannot read it as JSON: {exc}") from exc
    values = data.get("Values", {}) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise DevHostError(f"{path}: 'Values' must be a JSON object")
    applied = []
    for name, value in values.items():
        if name not in environ and value is not None:
            environ[name] = value if isinstance(value, str) else json.dumps(value)
            applied.append(name)
    return applied


_SETTING_EXPRESSION = re.compile(r"%([^%]+)%")


def resolve_setting_expressions(text: str, env: Mapping[str, str], where: str) -> str:
    """Replace each ``%NAME%`` in ``text`` by the value of app setting ``NAME``.

    Raises ``DevHostError`` (naming ``where``) when a referenced setting is not set.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise DevHostError(f"{where}: binding expression %{name}% refers to app setting {name}, not set")
        return env[name]

    return _SETTING_EXPRESSION.sub(replace, text)


_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d+):(\d+)(?::(\d+)(?:\.(\d+))?)?$")


def parse_timespan(value: object, where: str) -> float:
    """Seconds in a .NET TimeSpan string (``[d.]hh:mm[:ss[.fff]]``); a bare number is milliseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000.0
    match = _TIMESPAN.match(str(value).strip())
    if not match:
        raise DevHostError(f"{where}: {value!r} is not a TimeSpan like '00:00:30' or '00:00:00.500'")
    days, hours, minutes, seconds, fraction = match.groups()
    return (
        int(days or 0) * 86400
        + int(hours) * 3600
        + int(minutes) * 60
        + int(seconds or 0)
        + (float(f"0.{fraction}") if fraction else 0.0)
    )


@dataclass(frozen=True)
class QueueOptions:
    """``host.json`` ``extensions.queues``, with the Functions host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @classmethod
    def from_host_json(cls, section: Mapping[str, Any]) -> QueueOptions:
        """Raises ``DevHostError`` on a value the Functions host would reject."""
        where = "host.json extensions.queues"
        batch_size = int(section.get("batchSize", 16))
        if not 1 <= batch_size <= 32:
            raise DevHostError(f"{where}.batchSize must be 1..32, not {batch_size}")
        threshold = int(section.get("newBatchThreshold", batch_size // 2))
        if threshold < 0:
            raise DevHostError(f"{where}.newBatchThreshold must be >= 0, not {threshold}")
        max_dequeue = int(section.get("maxDequeueCount", 5))
        if max_dequeue < 1:
            raise DevHostError(f"{where}.maxDequeueCount must be >= 1, not {max_dequeue}")
        encoding = str(section.get("messageEncoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise DevHostError(f"{where}.messageEncoding must be 'base64' or 'none', not {encoding!r}")
        polling = parse_timespan(section.get("maxPollingInterval", "00:01:00"), f"{where}.maxPollingInterval")
        return cls(
            batch_size=batch_size,
            new_batch_threshold=threshold,
            max_polling_interval=max(polling, MIN_POLLING_INTERVAL),
            visibility_timeout=parse_timespan(
                section.get("visibilityTimeout", "00:00:00"), f"{where}.visibilityTimeout"
            ),
            max_dequeue_count=max_dequeue,
            message_encoding=encoding,
        )


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)

    @classmethod
    def load(cls, app_dir: Path) -> HostConfig:
        """Read ``host.json`` of the app (defaults when absent). Raises ``DevHostError``."""
        path = app_dir / "host.json"
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise DevHostError(f"{path}: cannot read it as JSON: {exc}") from exc
        extensions = data.get("extensions", {}) if isinstance(data, dict) else {}
        http_section = extensions.get("http", {})
        prefix = http_section.get("routePrefix", "api")
        return cls(
            route_prefix=str(prefix).strip("/"),
            queues=QueueOptions.from_host_json(extensions.get("queues", {})),
        )


# -- the app's functions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    """One function of the app: its name, trigger binding (``get_dict_repr()``) and Python callable."""

    name: str
    trigger: Mapping[str, Any]
    user_function: Callable[..., Any]

    @property
    def trigger_type(self) -> str:
        return str(self.trigger.get("type"))

    @property
    def arg_name(self) -> str:
        return str(self.trigger["name"])

    def invoke(self, value: object) -> Any:
        """Call the function with the trigger value as its binding-named argument; awaits coroutines."""
        result = self.user_function(**{self.arg_name: value})
        if inspect.isawaitable(result):
            return asyncio.run(_await(result))
        return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


SUPPORTED_TRIGGERS = ("httpTrigger", "timerTrigger", "queueTrigger")


def load_app_module(app_dir: Path) -> ModuleType:
    """Import ``function_app.py`` of ``app_dir`` afresh (the app dir goes first on ``sys.path``)."""
    path = app_dir / "function_app.py"
    if not path.exists():
        raise DevHostError(f"{path} not found: --app-dir must be the folder holding function_app.py")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    spec = importlib_util.spec_from_file_location("function_app", path)
    if spec is None or spec.loader is None:
        raise DevHostError(f"cannot import {path}")
    module = importlib_util.module_from_spec(spec)
    sys.modules["function_app"] = module
    spec.loader.exec_module(module)
    return module


def find_function_app(module: ModuleType) -> func.FunctionApp:
    """The module's ``app``, or else its only ``FunctionApp`` instance."""
    app = getattr(module, "app", None)
    if isinstance(app, func.FunctionApp):
        return app
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionApp)]
    if len(apps) != 1:
        raise DevHostError(f"{module.__file__}: expected one azure.functions.FunctionApp named 'app'")
    return apps[0]


def discover_functions(app: func.FunctionApp, env: Mapping[str, str]) -> list[FunctionSpec]:
    """The app's functions, from its decorators; ``get_functions()`` is called once, here.

    Functions disabled with the ``AzureWebJobs.<name>.Disabled`` setting are left out.
    Raises ``DevHostError`` for what this host cannot run: other trigger types, input or output
    bindings besides the HTTP return value, or parameters that no binding fills.
    """
    specs = []
    for function in app.get_functions():
        name = function.get_function_name() or function.get_user_function().__name__
        if env.get(f"AzureWebJobs.{name}.Disabled", "").lower() in ("true", "1"):
            log.info("function %s is disabled by AzureWebJobs.%s.Disabled", name, name)
            continue
        trigger = function.get_trigger()
        if trigger is None:
            raise DevHostError(f"function {name} has no trigger")
        trigger_dict = dict(trigger.get_dict_repr())
        spec = FunctionSpec(name, trigger_dict, function.get_user_function())
        if spec.trigger_type not in SUPPORTED_TRIGGERS:
            raise DevHostError(
                f"function {name}: trigger type {spec.trigger_type} is not supported by the devhost "
                f"(only {', '.join(SUPPORTED_TRIGGERS)})"
            )
        for binding in function.get_bindings():
            binding_dict = binding.get_dict_repr()
            if binding_dict.get("name") == spec.arg_name:
                continue
            if binding_dict.get("type") == "http" and binding_dict.get("name") == "$return":
                continue
            raise DevHostError(
                f"function {name}: binding {binding_dict.get('name')!r} of type {binding_dict.get('type')} "
                "is not supported by the devhost (only the trigger and the HTTP return value)"
            )
        _check_parameters(spec)
        specs.append(spec)
    return specs


def _check_parameters(spec: FunctionSpec) -> None:
    try:
        parameters = inspect.signature(spec.user_function).parameters
    except (TypeError, ValueError):
        return
    if spec.arg_name not in parameters and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        raise DevHostError(
            f"function {spec.name}: its trigger binding is named {spec.arg_name!r} "
            f"but the Python function has no parameter of that name"
        )
    unfilled = [
        p.name
        for p in parameters.values()
        if p.name != spec.arg_name
        and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if unfilled:
        raise DevHostError(f"function {spec.name}: no binding fills parameter(s) {', '.join(unfilled)}")


class _InFlight:
    """Counts work in progress; lets a caller wait until it drops to a level."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def enter(self) -> None:
        with self._changed:
            self._count += 1

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_at_most(
        self, level: int, timeout: float | None = None, stop: threading.Event | None = None
    ) -> bool:
        """Wait until at most ``level`` are in flight (or ``stop`` is set). True when reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._count > level:
                if stop is not None and stop.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Short waits so a set ``stop`` is noticed without a notify.
                self._changed.wait(0.1 if remaining is None else min(remaining, 0.1))
            return True


# -- HTTP -----------------------------------------------------------------------------------------------

_ROUTE_PARAMETER = re.compile(r"\{([^{}]*)\}")
_PARAMETER_SPEC = re.compile(
    r"^(?P<star>\*{1,2})?(?P<name>[^:=?*]+)(?P<constraints>(?::[^:=?]+)*)(?:=[^?]*)?(?P<opt>\?)?$"
)
_CONSTRAINT = re.compile(r"^(?P<name>\w+)(?:\((?P<args>.*)\))?$")


def _check_constraint(constraint: str, value: str) -> bool:
    """Whether ``value`` satisfies one ASP.NET route constraint; unknown constraints pass."""
    match = _CONSTRAINT.match(constraint)
    if not match:
        return True
    name, args = match.group("name").lower(), match.group("args") or ""
    numbers = [part.strip() for part in args.split(",")] if args else []
    try:
        if name in ("int", "long"):
            return re.fullmatch(r"-?\d+", value) is not None
        if name == "alpha":
            return re.fullmatch(r"[A-Za-z]+", value) is not None
        if name == "bool":
            return value.lower() in ("true", "false")
        if name == "guid":
            uuid.UUID(value)
            return True
        if name in ("decimal", "double", "float"):
            float(value)
            return True
        if name == "minlength":
            return len(value) >= int(numbers[0])
        if name == "maxlength":
            return len(value) <= int(numbers[0])
        if name == "length":
            low, high = (int(numbers[0]), int(numbers[-1]))
            return low <= len(value) <= high
        if name == "min":
            return int(value) >= int(numbers[0])
        if name == "max":
            return int(value) <= int(numbers[0])
        if name == "range":
            return int(numbers[0]) <= int(value) <= int(numbers[1])
        if name == "regex":
            return re.search(args, value, re.IGNORECASE) is not None
    except (ValueError, IndexError, re.error):
        return False
    return True


@dataclass(frozen=True)
class _Segment:
    pattern: re.Pattern[str]
    names: tuple[str, ...]
    constraints: tuple[tuple[str, ...], ...]
    kind: int  # precedence: 1 literal, 2 complex, 3 constrained parameter, 4 parameter, 5 catch-all
    optional: bool = False
    catch_all: bool = False


class RouteTemplate:
    """An Azure Functions (ASP.NET) route template such as ``routines/{id}/runs/{run_id:alpha}``.

    Literals match case-insensitively; ``{name?}`` is optional, ``{*rest}`` takes the remaining path,
    ``{name:constraint}`` is checked for the common constraints (int, alpha, guid, bool, length...).
    """

    def __init__(self, template: str) -> None:
        self.template = template.strip("/")
        self.segments = (
            [self._parse_segment(text) for text in self.template.split("/")] if self.template else []
        )
        self.precedence = tuple(segment.kind for segment in self.segments)

    def _parse_segment(self, text: str) -> _Segment:
        pieces = _ROUTE_PARAMETER.split(text)  # literal, parameter, literal, parameter, ...
        regex, names, constraints = "", [], []
        optional = catch_all = False
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                regex += re.escape(piece)
                continue
            match = _PARAMETER_SPEC.match(piece.strip())
            if not match:
                raise DevHostError(f"route template {self.template!r}: cannot parse parameter {{{piece}}}")
            names.append(match.group("name"))
            constraints.append(tuple(c for c in match.group("constraints").split(":") if c))
            catch_all = catch_all or bool(match.group("star"))
            optional = optional or bool(match.group("opt"))
            regex += f"(?P<p{len(names) - 1}>.+?)"
        if not names:
            kind = 1
        elif len(pieces) > 3 or pieces[0] or pieces[-1]:
            kind = 2
        elif catch_all:
            kind = 5
        else:
            kind = 3 if constraints[0] else 4
        if catch_all:
            regex = regex.replace(".+?", ".*")
        return _Segment(
            re.compile(regex, re.IGNORECASE), tuple(names), tuple(constraints), kind, optional, catch_all
        )

    def match(self, path_segments: list[str]) -> dict[str, str] | None:
        """Route parameters when ``path_segments`` (already URL-decoded) match, else ``None``."""
        params: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.catch_all:
                # As in ASP.NET routing, a catch-all also matches nothing: ``ui/{*path}`` serves ``ui``.
                value = "/".join(path_segments[index:])
                if value:
                    params[segment.names[0]] = value
                return params
            if index >= len(path_segments):
                if all(s.optional or s.catch_all for s in self.segments[index:]):
                    return params
                return None
            found = segment.pattern.fullmatch(path_segments[index])
            if found is None:
                return None
            for number, (name, constraints) in enumerate(
                zip(segment.names, segment.constraints, strict=True)
            ):
                value = found.group(f"p{number}")
                if not all(_check_constraint(c, value) for c in constraints):
                    return None
                params[name] = value
        return params if len(path_segments) == len(self.segments) else None


@dataclass(frozen=True)
class HttpRoute:
    spec: FunctionSpec
    template: RouteTemplate
    methods: frozenset[str]  # empty: every method

    def accepts(self, method: str) -> bool:
        return not self.methods or method in self.methods


class HttpRouter:
    """Finds the function for a request: the most specific matching template that accepts the method."""

    def __init__(self, prefix: str, specs: list[FunctionSpec]) -> None:
        self.prefix = [part for part in prefix.split("/") if part]
        self.routes = []
        for spec in specs:
            methods = frozenset(_method_name(m).upper() for m in spec.trigger.get("methods") or ())
            route = spec.trigger.get("route") or spec.name
            self.routes.append(HttpRoute(spec, RouteTemplate(str(route)), methods))
        self.routes.sort(key=lambda r: r.template.precedence)

    def split(self, path: str) -> list[str] | None:
        """The URL-decoded segments of ``path`` after the route prefix, or ``None`` outside it."""
        parts = path.strip("/").split("/") if path.strip("/") else []
        n = len(self.prefix)
        if [p.lower() for p in parts[:n]] != [p.lower() for p in self.prefix]:
            return None
        return [unquote(part) for part in parts[n:]]

    def find(self, method: str, path: str) -> tuple[HttpRoute | None, dict[str, str], set[str]]:
        """``(route, route params, methods allowed on this path)``; route is ``None`` when none fits."""
        segments = self.split(path)
        allowed: set[str] = set()
        if segments is None:
            return None, {}, allowed
        for route in self.routes:
            params = route.template.match(segments)
            if params is None:
                continue
            if route.accepts(method):
                return route, params, allowed
            allowed |= route.methods
        return None, {}, allowed


def _method_name(method: object) -> str:
    return str(getattr(method, "value", method))


def _problem(status: HTTPStatus, detail: str) -> tuple[int, dict[str, str], bytes]:
    body = {"type": "about:blank", "title": status.phrase, "status": int(status), "detail": detail}
    return int(status), {"Content-Type": "application/problem+json"}, json.dumps(body).encode()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    host: DevHost


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait ~40 ms for an ACK
    server: _HttpServer
    timeout = 30  # idle keep-alive connections are closed after this many seconds

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _handle(self) -> None:
        started = time.monotonic()
        host = self.server.host
        host.http_in_flight.enter()
        try:
            status, headers, body = self._respond()
            if host.stopping:
                self.close_connection = True
            # Still in flight while writing: stop() waits for the response to be sent.
            self._write(status, headers, body)
        finally:
            host.http_in_flight.leave()
        log.info("%s %s %d %.1f ms", self.command, self.path, status, (time.monotonic() - started) * 1000.0)

    def _respond(self) -> tuple[int, dict[str, str], bytes]:
        try:
            body = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            return _problem(HTTPStatus.BAD_REQUEST, str(exc))
        except OverflowError:
            self.close_connection = True
            return _problem(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_REQUEST_BODY} bytes"
            )
        refusal = self._refuse(body)
        if refusal is not None:
            return refusal
        path, _, query = self.path.partition("?")
        router = self.server.host.router
        method = self.command.upper()
        route, route_params, allowed = router.find(method, path)
        if route is None and method == "HEAD":
            # No function takes HEAD: answer it as a GET without the body.
            route, route_params, allowed = router.find("GET", path)
            method = "GET"
        if route is None:
            if allowed:
                status, headers, body = _problem(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}"
                )
                headers["Allow"] = ", ".join(sorted(allowed))
                return status, headers, body
            return _problem(HTTPStatus.NOT_FOUND, f"no function serves {self.command} {path}")
        if not self.server.host.authorized(route.spec, self.headers.get("x-functions-key"), query):
            return 401, {}, b""  # as the Functions host: no body
        request = func.HttpRequest(
            method,
            f"http://{self.headers.get('Host') or self.server.host.address}{self.path}",
            headers={key: ", ".join(self.headers.get_all(key) or ()) for key in set(self.headers.keys())},
            params=_query_params(query),
            route_params=route_params,
            body=body,
        )
        try:
            result = route.spec.invoke(request)
        except Exception as exc:
            log.error("function %s raised %s: %s", route.spec.name, type(exc).__name__, exc)
            traceback.print_exc(file=sys.stderr)
            return _problem(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"function {route.spec.name} raised {type(exc).__name__}"
            )
        return _response_parts(route.spec.name, result)

    def _refuse(self, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """What a web page must not be able to do to this machine's devhost: reach it under another
        name (DNS rebinding points a name the page controls at 127.0.0.1), or send it a body without
        a ``Content-Type`` (a "simple" cross-origin request that no CORS preflight stops)."""
        name = _host_name(self.headers.get("Host") or "localhost")
        if name not in LOOPBACK_NAMES:
            return _problem(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"the devhost answers only to loopback names ({', '.join(sorted(LOOPBACK_NAMES))}), "
                f"not {name!r}",
            )
        if body and not self.headers.get("Content-Type"):
            return _problem(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "a request body needs a Content-Type (application/json)"
            )
        return None

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if not raw:
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise ValueError(f"invalid Content-Length {raw!r}") from None
        if length < 0:
            raise ValueError(f"invalid Content-Length {raw!r}")
        if length > MAX_REQUEST_BODY:
            raise OverflowError
        body = self.rfile.read(length)
        if len(body) != length:
            raise ValueError("request body shorter than its Content-Length")
        return body

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024).strip()
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError:
                raise ValueError("malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_REQUEST_BODY:
                raise OverflowError
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _write(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        if status >= 200 and status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(body)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler dispatches on do_<METHOD>; serve every known method the same way.
        if name.startswith("do_") and (name[3:] in HTTP_METHODS or _METHOD_TOKEN.match(name[3:])):
            return self._handle
        raise AttributeError(name)


def _host_name(host: str) -> str:
    """``host`` of a Host header without its port: ``[::1]:7071`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _query_params(query: str) -> dict[str, str]:
    # As the Functions host: a repeated parameter's values are joined with commas.
    params: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key, []).append(value)
    return {key: ",".join(values) for key, values in params.items()}


def _response_parts(function_name: str, result: object) -> tuple[int, dict[str, str], bytes]:
    if isinstance(result, func.HttpResponse):
        headers = {str(k): str(v) for k, v in result.headers.items()}
        if not any(k.lower() == "content-type" for k in headers):
            mimetype = result.mimetype
            headers["Content-Type"] = (
                f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/") else mimetype
            )
        return result.status_code, headers, result.get_body() or b""
    if isinstance(result, str | bytes):
        body = result.encode() if isinstance(result, str) else result
        return 200, {"Content-Type": "text/plain; charset=utf-8"}, body
    log.error("function %s returned %s, not an azure.functions.HttpResponse", function_name, type(result))
    return _problem(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        f"function {function_name} returned {type(result).__name__}, not an HttpResponse",
    )


# -- timers ---------------------------------------------------------------------------------------------


class Schedule:
    """A timer trigger schedule: NCRONTAB (6 fields, seconds first; or 5 fields) or a TimeSpan, in UTC."""

    def __init__(self, expression: str, where: str) -> None:
        self.expression = expression.strip()
        fields = self.expression.split()
        self.interval: timedelta | None = None
        self.seconds_first = len(fields) == 6
        if len(fields) == 1 and ":" in self.expression:
            self.interval = timedelta(seconds=parse_timespan(self.expression, where))
            if self.interval <= timedelta(0):
                raise DevHostError(f"{where}: interval {expression!r} must be positive")
            return
        if len(fields) not in (5, 6) or not croniter.is_valid(
            self.expression, second_at_beginning=self.seconds_first
        ):
            raise DevHostError(f"{where}: {expression!r} is not a valid NCRONTAB expression")

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (an aware datetime), in UTC."""
        if self.interval is not None:
            return moment + self.interval
        cron = croniter(self.expression, moment.astimezone(UTC), second_at_beginning=self.seconds_first)
        occurrence: datetime = cron.get_next(datetime)
        return occurrence.astimezone(UTC)


class TimerRunner:
    """Runs one timer function on its schedule in its own thread; one invocation at a time."""

    def __init__(
        self, spec: FunctionSpec, schedule: Schedule, run_on_startup: bool, stop: threading.Event
    ) -> None:
        self.spec = spec
        self.schedule = schedule
        self.run_on_startup = run_on_startup
        self._stop = stop
        self.thread = threading.Thread(target=self._run, name=f"timer-{spec.name}", daemon=True)
        self._last: datetime | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        if self.run_on_startup:
            self._invoke(past_due=False, next_due=self.schedule.next_after(_utcnow()))
        due = self.schedule.next_after(_utcnow())
        while not self._stop.is_set():
            remaining = (due - _utcnow()).total_seconds()
            if remaining > 0:
                # Wake at least once a minute: the wall clock may jump (suspend, NTP).
                self._stop.wait(min(remaining, 60.0))
                continue
            now = _utcnow()
            next_due = self.schedule.next_after(max(now, due))
            self._invoke(past_due=now - due > PAST_DUE_AFTER, next_due=next_due)
            # Occurrences that passed while the function ran are skipped, as the Functions host does.
            due = self.schedule.next_after(max(_utcnow(), due))

    def _invoke(self, past_due: bool, next_due: datetime) -> None:
        now = _utcnow()
        status = {"Last": _iso(self._last), "Next": _iso(next_due), "LastUpdated": _iso(now)}
        try:
            self.spec.invoke(TimerRequest(past_due=past_due, schedule_status=status))
        except Exception:
            log.exception("timer function %s failed; its schedule continues", self.spec.name)
        self._last = now


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


# -- queues ---------------------------------------------------------------------------------------------


class _UndecodableMessage(ValueError):
    pass


class QueuePoller:
    """Feeds one queue-trigger function from its storage queue, with the host.json queue semantics.

    A batch of up to ``batch_size`` messages is received (invisible for 10 minutes while processed)
    and processed concurrently; a new batch is fetched when the in-flight count drops to
    ``new_batch_threshold``. An empty queue backs the polling off exponentially from 100 ms to
    ``max_polling_interval``; a message resets it. Success deletes the message. Failure makes it
    visible again after ``visibility_timeout``, and at the ``max_dequeue_count``-th delivery moves it to
    ``<queue>-poison``. A message that cannot be decoded goes to poison at once. Storage errors are
    logged and retried with back-off; the poller never stops before ``stop`` is set.
    """

    def __init__(
        self,
        spec: FunctionSpec,
        queue_name: str,
        connection_string: str,
        options: QueueOptions,
        stop: threading.Event,
    ) -> None:
        self.spec = spec
        self.queue_name = queue_name
        self.poison_name = f"{queue_name}-poison"
        self.options = options
        self.in_flight = _InFlight()
        self._stop = stop
        client_options: dict[str, Any] = {
            # A few quick retries: the poll loop has its own back-off for longer outages.
            "retry_policy": LinearRetry(backoff=1, retry_total=2, random_jitter_range=0),
            "connection_timeout": 10,
            "read_timeout": 30,
        }
        # No encode/decode policies: decoding is ours, so an undecodable message is still seen.
        self._queue = QueueClient.from_connection_string(connection_string, queue_name, **client_options)
        self._poison = QueueClient.from_connection_string(
            connection_string, self.poison_name, **client_options
        )
        self._queue_ready = False
        self._poison_ready = False
        self.thread = threading.Thread(target=self._run, name=f"queue-{spec.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # The poll loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        idle_delay = 0.0
        failures = 0
        last_error_log = 0.0
        while not self._stop.is_set():
            if not self.in_flight.wait_at_most(self.options.new_batch_threshold, stop=self._stop):
                break
            try:
                messages = self._receive()
            except AzureError as exc:
                failures += 1
                if failures == 1 or time.monotonic() - last_error_log > 30:
                    log.warning(
                        "queue %s (function %s): storage error, retrying: %s",
                        self.queue_name,
                        self.spec.name,
                        _first_line(exc),
                    )
                    last_error_log = time.monotonic()
                self._stop.wait(min(0.5 * 2 ** min(failures - 1, 5), 10.0))
                continue
            if failures:
                log.info("queue %s: storage reachable again after %d failed polls", self.queue_name, failures)
                failures = 0
            if messages:
                idle_delay = 0.0
                for message in messages:
                    self._dispatch(message)
                continue
            idle_delay = min(max(idle_delay * 2, MIN_POLLING_INTERVAL), self.options.max_polling_interval)
            self._stop.wait(idle_delay)

    def _receive(self) -> list[StorageQueueMessage]:
        if not self._queue_ready:
            _create_queue(self._queue)
            self._queue_ready = True
        try:
            pages = self._queue.receive_messages(
                messages_per_page=self.options.batch_size,
                max_messages=self.options.batch_size,
                visibility_timeout=PROCESSING_VISIBILITY_SECONDS,
            ).by_page()
            return list(next(pages, []))
        except ResourceNotFoundError:
            self._queue_ready = False  # deleted under us (e.g. storage reset): create it again
            raise

    def _dispatch(self, message: StorageQueueMessage) -> None:
        self.in_flight.enter()
        worker = threading.Thread(
            target=self._process, args=(message,), name=f"{self.spec.name}-{message.id}", daemon=True
        )
        try:
            worker.start()
        except BaseException:
            self.in_flight.leave()
            raise

    # One message ------------------------------------------------------------------------------

    def _process(self, message: StorageQueueMessage) -> None:
        try:
            self._process_one(message)
        except Exception:  # storage calls are guarded; this is a bug guard so in_flight stays right
            log.exception("queue %s: unexpected error handling message %s", self.queue_name, message.id)
        finally:
            self.in_flight.leave()

    def _process_one(self, message: StorageQueueMessage) -> None:
        text = message.content if isinstance(message.content, str) else str(message.content or "")
        try:
            body = self._decode(text)
        except _UndecodableMessage as exc:
            log.error(
                "queue %s: message %s cannot be decoded (%s); moving it to %s",
                self.queue_name,
                message.id,
                exc,
                self.poison_name,
            )
            self._move_to_poison(message, text)
            return
        trigger_value = FuncQueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        try:
            self.spec.invoke(trigger_value)
        except Exception as exc:
            self._failed(message, text, exc)
            return
        self._storage_call("delete", lambda: self._queue.delete_message(message.id, message.pop_receipt))

    def _decode(self, text: str) -> bytes:
        if self.options.message_encoding == "none":
            return text.encode("utf-8")
        try:
            body = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise _UndecodableMessage(f"not valid base64: {exc}") from exc
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _UndecodableMessage(f"not UTF-8 after base64 decoding: {exc}") from exc
        return body

    def _failed(self, message: StorageQueueMessage, text: str, exc: Exception) -> None:
        count = message.dequeue_count or 1
        limit = self.options.max_dequeue_count
        if count >= limit:
            log.error(
                "function %s failed on message %s (delivery %d of %d): %s: %s; moving it to %s",
                self.spec.name,
                message.id,
                count,
                limit,
                type(exc).__name__,
                exc,
                self.poison_name,
                exc_info=exc,
            )
            self._move_to_poison(message, text)
            return
        log.warning(
            "function %s failed on message %s (delivery %d of %d): %s: %s; it comes back in %.1f s",
            self.spec.name,
            message.id,
            count,
            limit,
            type(exc).__name__,
            exc,
            self.options.visibility_timeout,
            exc_info=exc,
        )
        self._storage_call(
            "release",
            lambda: self._queue.update_message(
                message.id,
                pop_receipt=message.pop_receipt,
                visibility_timeout=round(self.options.visibility_timeout),
            ),
        )

    def _move_to_poison(self, message: StorageQueueMessage, text: str) -> None:
        def send() -> None:
            if not self._poison_ready:
                _create_queue(self._poison)
                self._poison_ready = True
            self._poison.send_message(text)

        # Copy first, then delete: a crash in between leaves a duplicate, never a loss.
        if self._storage_call("move to poison", send):
            self._storage_call("delete", lambda: self._queue.delete_message(message.id, message.pop_receipt))

    def _storage_call(self, what: str, call: Callable[[], object]) -> bool:
        try:
            call()
            return True
        except AzureError as exc:
            log.warning(
                "queue %s: %s failed (the message reappears after its visibility timeout): %s",
                self.queue_name,
                what,
                _first_line(exc),
            )
            return False


def _create_queue(client: QueueClient) -> None:
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _queue_connection(spec: FunctionSpec, env: Mapping[str, str]) -> str:
    setting = str(spec.trigger.get("connection") or "AzureWebJobsStorage")
    for name in (setting, f"AzureWebJobs{setting}"):
        value = env.get(name, "").strip()
        if value:
            if "=" not in value:
                raise DevHostError(
                    f"function {spec.name}: app setting {name} must be a storage connection string"
                )
            return value
    raise DevHostError(
        f"function {spec.name}: connection {setting!r} is not set (the devhost needs a connection string "
        f"in app setting {setting}; identity-based connections are not supported locally)"
    )


# -- the host -------------------------------------------------------------------------------------------


class DevHost:
    """Hosts the app in ``app_dir``: HTTP on ``127.0.0.1:port`` (0: a free port), timers, queue pollers.

    ``start()`` applies ``local.settings.json`` to ``os.environ`` (the environment wins), imports
    ``function_app.py``, reads its triggers and starts serving; it raises ``DevHostError`` when the app
    cannot be hosted. ``stop()`` stops accepting work and waits up to ``grace`` seconds for what is in
    flight; it returns whether everything finished.

    Differences from the Functions host: one function key for every non-anonymous route, and only when
    ``function_key`` is given (otherwise every route is anonymous); timers keep no
    schedule status (no catch-up run for a schedule missed while down) and take no singleton lock, so
    run one timer-enabled host per storage account (``timers=False`` for the others); a queue message
    is not renewed past its 10-minute processing visibility; HEAD falls back to a GET function; a path
    that matches with another method gets ``405`` (the Functions host answers ``404``).
    """

    def __init__(
        self,
        app_dir: str | os.PathLike[str] = ".",
        port: int = DEFAULT_PORT,
        timers: bool = True,
        function_key: str | None = None,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.function_key = function_key
        self.requested_port = port
        self.timers_enabled = timers
        self.functions: list[FunctionSpec] = []
        self.config = HostConfig()
        self.router = HttpRouter("api", [])
        self.http_in_flight = _InFlight()
        self.stopping = False
        self._stop = threading.Event()
        self._server: _HttpServer | None = None
        self._server_thread: threading.Thread | None = None
        self._timers: list[TimerRunner] = []
        self._pollers: list[QueuePoller] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise DevHostError("the devhost is not started")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def route_url(self, function_name: str) -> str | None:
        """The URL of HTTP function ``function_name``'s route up to its first parameter, or None."""
        for route in self.router.routes:
            if route.spec.name == function_name:
                literal = route.template.template.split("{", 1)[0].rstrip("/")
                return "/".join([self.url, *self.router.prefix, *([literal] if literal else [])])
        return None

    def authorized(self, spec: FunctionSpec, header_key: str | None, query: str) -> bool:
        """Whether a request may call ``spec``: always when no key is set or the route is anonymous."""
        level = str(_method_name(spec.trigger.get("authLevel", "function"))).lower()
        if self.function_key is None or level == "anonymous":
            return True
        given = header_key or _query_params(query).get("code") or ""
        return hmac.compare_digest(given.encode(), self.function_key.encode())

    def start(self) -> None:
        applied = apply_local_settings(self.app_dir)
        if applied:
            log.info("applied local.settings.json values: %s", ", ".join(sorted(applied)))
        self.config = HostConfig.load(self.app_dir)
        app = find_function_app(load_app_module(self.app_dir))
        env = dict(os.environ)
        self.functions = discover_functions(app, env)
        http_specs = [s for s in self.functions if s.trigger_type == "httpTrigger"]
        self.router = HttpRouter(self.config.route_prefix, http_specs)
        # Build everything first, so a bad binding fails before any thread starts.
        timers = [self._timer_runner(s, env) for s in self.functions if s.trigger_type == "timerTrigger"]
        pollers = [self._queue_poller(s, env) for s in self.functions if s.trigger_type == "queueTrigger"]
        self._server = _HttpServer(("127.0.0.1", self.requested_port), _RequestHandler)
        self._server.host = self
        self._server_thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._server_thread.start()
        self._log_functions(timers, pollers)
        if self.timers_enabled:
            self._timers = timers
        elif timers:
            log.info("timers are disabled (--no-timers): %s", ", ".join(t.spec.name for t in timers))
        self._pollers = pollers
        for timer in self._timers:
            timer.start()
        for poller in self._pollers:
            poller.start()

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> bool:
        """Stop serving and wait up to ``grace`` s for in-flight work. True when all of it finished."""
        self.stopping = True
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        deadline = time.monotonic() + grace
        finished = self.http_in_flight.wait_at_most(0, timeout=grace)
        for poller in self._pollers:
            poller.thread.join(max(deadline - time.monotonic(), 0))
            finished = (
                poller.in_flight.wait_at_most(0, timeout=max(deadline - time.monotonic(), 0)) and finished
            )
        for timer in self._timers:
            timer.thread.join(max(deadline - time.monotonic(), 0))
            finished = not timer.thread.is_alive() and finished
        if not finished:
            log.warning("devhost stopped with work still in flight after %.0f s", grace)
        return finished

    def _timer_runner(self, spec: FunctionSpec, env: Mapping[str, str]) -> TimerRunner:
        where = f"function {spec.name}"
        expression = resolve_setting_expressions(str(spec.trigger.get("schedule", "")), env, where)
        run_on_startup = bool(spec.trigger.get("runOnStartup", spec.trigger.get("run_on_startup", False)))
        return TimerRunner(spec, Schedule(expression, where), run_on_startup, self._stop)

    def _queue_poller(self, spec: FunctionSpec, env: Mapping[str, str]) -> QueuePoller:
        where = f"function {spec.name}"
        queue_name = resolve_setting_expressions(str(spec.trigger.get("queueName", "")), env, where)
        if not QUEUE_NAME_RE.match(queue_name):
            raise DevHostError(
                f"{where}: queue name {queue_name!r} is invalid "
                "(3-63 lowercase letters, digits and single hyphens)"
            )
        return QueuePoller(spec, queue_name, _queue_connection(spec, env), self.config.queues, self._stop)

    def _log_functions(self, timers: list[TimerRunner], pollers: list[QueuePoller]) -> None:
        log.info("functions of %s:", self.app_dir / "function_app.py")
        prefix = "/".join(self.router.prefix)
        for route in self.router.routes:
            methods = ",".join(sorted(route.methods)) or "all methods"
            path = "/".join(p for p in (prefix, route.template.template) if p)
            log.info("  %s: [%s] %s/%s", route.spec.name, methods, self.url, path)
        for timer in timers:
            log.info("  %s: timer %s", timer.spec.name, timer.schedule.expression)
        for poller in pollers:
            log.info("  %s: queue %s", poller.spec.name, poller.queue_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m routines.devhost",
        description="Run function_app.py's HTTP routes, timers and queue triggers locally.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (0: a free one)")
    parser.add_argument("--app-dir", default=".", help="folder holding function_app.py and host.json")
    parser.add_argument("--no-timers", action="store_true", help="do not run timer triggers")
    parser.add_argument(
        "--function-key",
        help="require this key (x-functions-key or ?code=) on non-anonymous routes, as in Azure",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every request at INFO

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    host = DevHost(args.app_dir, port=args.port, timers=not args.no_timers, function_key=args.function_key)
    try:
        host.start()
    except DevHostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 2
    dashboard = host.route_url("dashboard")
    if dashboard:
        print(f"dashboard on {dashboard}", flush=True)
    print(f"devhost ready on {host.url}", flush=True)
    stop.wait()
    log.info("shutting down")
    host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
