"""The devhost's HTTP server: ASP.NET-style route templates, the router and the request handler."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

import azure.functions as func

from routines.devhost.functions import FunctionSpec
from routines.devhost.settings import DevHostError

if TYPE_CHECKING:
    from routines.devhost.host import DevHost

log = logging.getLogger("routines.devhost")

MAX_REQUEST_BODY = 100 * 1024 * 1024  # the Functions host's request size limit
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})  # Host headers the devhost answers

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
# Any other method token (QUERY, PROPFIND, ...) is routed too, so it gets 405 or 404 rather than the
# http.server default of 501.
_METHOD_TOKEN = re.compile(r"^[A-Z][A-Z0-9-]{0,31}$")

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
