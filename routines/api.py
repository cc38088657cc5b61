"""The HTTP management API, independent of the Functions runtime: the HTTP adapter of
``routines.service``.

``function_app.py`` turns each ``func.HttpRequest`` into a ``Request`` and calls one handler; a handler
parses the request (body, query, ``If-Match``), calls one domain operation and renders its answer
(JSON, ``ETag``, ``Location``). Errors are ``application/problem+json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic

from routines import validation
from routines.config import Settings
from routines.errors import (
    Conflict,
    Invalid,
    NotFound,
    PreconditionFailed,
    RoutinesError,
    StorageUnavailable,
    TooLarge,
    Unauthorized,
    ValidationError,
)
from routines.messages import DispatchQueue
from routines.models import (
    ROUTINE_ID_PATTERN,
    Model,
    Routine,
    RoutineState,
    RuleError,
    RunStatus,
    Trigger,
    check_jitter,
    json_integers,
    now_utc,
    rfc3339_input,
    utc_text,
)
from routines.schedule import jitter_offset, next_fire_after
from routines.service import Service
from routines.store import Store
from routines.webhooks.intake import SecretUnavailable

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 50, 200
_PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Request:
    method: str
    route_params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/json")

    def encoded(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body, ensure_ascii=False).encode()


class ApiError(RoutinesError):
    def __init__(
        self, status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []


def problem(status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return Response(status, body, {"Content-Type": _PROBLEM})


def _invalid(exc: pydantic.ValidationError, prefix: tuple[Any, ...] = ()) -> ApiError:
    error = validation.invalid(exc, prefix)
    return ApiError(422, "Invalid request", str(error), error.errors)


def _not_json(constant: str) -> Any:
    """``json.loads`` accepts ``NaN`` and ``Infinity``; JSON does not (and they could not be sent back)."""
    raise ValueError(f"{constant} is not a JSON value")


class PreviewRequest(Model):
    trigger: Trigger
    after: datetime | None = None
    count: int = pydantic.Field(default=10, ge=1, le=100)
    # With either, the answer adds each fire's start (``dispatch_at``): the offsets derive from the
    # routine's id; ``jitter_seconds`` defaults to the routine's.
    jitter_seconds: int | None = pydantic.Field(default=None, ge=0, le=3600)
    routine_id: str | None = pydantic.Field(default=None, pattern=ROUTINE_ID_PATTERN.pattern)

    _integers = pydantic.field_validator("count", "jitter_seconds", mode="before")(json_integers)

    @pydantic.model_validator(mode="after")
    def _jitter_needs_a_routine(self) -> PreviewRequest:
        if self.jitter_seconds and self.routine_id is None:
            raise RuleError(
                ("routine_id",), "is needed with jitter_seconds: each fire's offset derives from it"
            )
        check_jitter(self.trigger, self.jitter_seconds or 0)
        return self

    @pydantic.field_validator("after", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return None if value is None else rfc3339_input(value)

    @pydantic.field_validator("after")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone offset (RFC 3339)")
        if value is None:
            return None
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range in UTC") from None
        if value.year >= 2200:  # as a timer's ``at``: previews stay far from the end of the calendar
            raise ValueError("must be before the year 2200")
        return value


class DispatchRequest(Model):
    input: str | dict[str, Any] | None = None


class DecisionRequest(Model):
    """The optional body of an approve or reject."""

    comment: str | None = pydantic.Field(default=None, max_length=2000)


# Domain errors as problem responses, first match wins (Invalid before its base ValidationError).
_PROBLEMS: tuple[tuple[type[RoutinesError], int, str], ...] = (
    (Invalid, 422, "Invalid request"),
    (NotFound, 404, "Not found"),
    (Conflict, 409, "Conflict"),
    (PreconditionFailed, 412, "Precondition failed"),
    (ValidationError, 400, "Bad request"),
    (StorageUnavailable, 503, "Storage unavailable"),
    (Unauthorized, 401, "Unauthorized"),
    (TooLarge, 413, "Payload too large"),
    (SecretUnavailable, 503, "Webhook secret unavailable"),
)


class Api:
    def __init__(
        self, store: Store, queue: DispatchQueue, settings: Settings, clock: Callable[[], datetime] = now_utc
    ) -> None:
        self.store, self.queue, self.settings, self.clock = store, queue, settings, clock
        self.service = Service(store, queue, settings, clock)

    # --- plumbing ---------------------------------------------------------------------------
    def handle(self, handler: Callable[[Request], Response], request: Request) -> Response:
        """Run one handler, mapping every expected failure to its problem response."""
        try:
            return handler(request)
        except ApiError as exc:
            return problem(exc.status, exc.title, exc.detail, exc.errors)
        except RoutinesError as exc:
            for kind, status, title in _PROBLEMS:
                if isinstance(exc, kind):
                    return problem(status, title, str(exc), getattr(exc, "errors", None) or None)
            raise

    def _context(self, now: datetime) -> dict[str, Any]:
        return {"min_interval_seconds": self.settings.min_interval_seconds, "now": now}

    @staticmethod
    def _json_body(request: Request, *, optional: bool = False) -> Any:
        if len(request.body) > MAX_BODY_BYTES:
            raise ApiError(
                413,
                "Payload too large",
                f"the body is {len(request.body)} bytes; at most {MAX_BODY_BYTES} are accepted",
            )
        if not request.body.strip():
            if optional:
                return None
            raise ApiError(400, "Bad request", "a JSON body is required")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            raise ApiError(
                415, "Unsupported media type", f"send JSON (Content-Type: application/json), not {ctype}"
            )
        try:
            return json.loads(request.body, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:
            # ValueError: bad syntax or UTF-8, NaN/Infinity, integers over Python's digit limit;
            # RecursionError: nesting deeper than the parser's stack.
            raise ApiError(400, "Malformed JSON", f"the body is not valid JSON: {exc}") from None

    @staticmethod
    def _object(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ApiError(
                422,
                "Invalid request",
                "the body must be a JSON object",
                [{"loc": ["body"], "msg": "must be a JSON object"}],
            )
        return value

    def _routine_response(
        self, routine: Routine, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        body = routine.as_of(self.clock()).public()
        return Response(status, body, {"ETag": f'"{routine.version}"', **(headers or {})})

    @staticmethod
    def _limit(query: Mapping[str, str]) -> int:
        raw = query.get("limit")
        if raw is None or raw == "":
            return DEFAULT_LIMIT
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
            raise ApiError(
                400,
                "Bad request",
                f"limit must be an integer from 1 to {MAX_LIMIT}",
                [{"loc": ["query", "limit"], "msg": f"must be an integer from 1 to {MAX_LIMIT}"}],
            )
        return int(raw)

    # --- routines ---------------------------------------------------------------------------
    def create_routine(self, request: Request) -> Response:
        routine = self.service.create_routine(self._object(self._json_body(request)))
        return self._routine_response(routine, 201, {"Location": f"/api/routines/{routine.id}"})

    def list_routines(self, request: Request) -> Response:
        state = request.query.get("state") or None
        if state is not None and state not in RoutineState.__members__:
            raise ApiError(
                400,
                "Bad request",
                "state must be enabled, disabled or completed",
                [{"loc": ["query", "state"], "msg": "must be enabled, disabled or completed"}],
            )
        page = self.service.list_routines(
            RoutineState(state) if state else None,
            self._limit(request.query),
            request.query.get("continuation") or None,
        )
        now = self.clock()
        items = [r.as_of(now).public() for r in page.items]
        return Response(200, {"items": items, "continuation": page.continuation})

    def get_routine(self, request: Request) -> Response:
        return self._routine_response(self.service.get_routine(request.route_params["id"]))

    def delete_routine(self, request: Request) -> Response:
        self.service.delete_routine(request.route_params["id"])
        return Response(204)

    @staticmethod
    def _expected_version(if_match: str | None) -> int | None:
        """The version an ``If-Match`` asks for (``"3"``, ``W/"3"``, ``3``; ``*`` or none: any). A tag
        this API never issued matches no version."""
        if if_match is None or if_match.strip() == "*":
            return None
        tag = if_match.strip().removeprefix("W/").strip('"')
        return int(tag) if tag.isascii() and tag.isdigit() and len(tag) < 19 else 0

    def patch_routine(self, request: Request) -> Response:
        patch = self._object(self._json_body(request))
        expected = self._expected_version(request.headers.get("if-match"))
        return self._routine_response(
            self.service.update_routine(request.route_params["id"], patch, expected)
        )

    def disable_routine(self, request: Request) -> Response:
        return self._routine_response(self.service.disable_routine(request.route_params["id"]))

    def enable_routine(self, request: Request) -> Response:
        return self._routine_response(self.service.enable_routine(request.route_params["id"]))

    # --- runs -------------------------------------------------------------------------------
    def dispatch_routine(self, request: Request) -> Response:
        routine_id = request.route_params["id"]
        self.service.get_routine(routine_id)  # 404 before the body is looked at
        body = self._json_body(request, optional=True)
        try:
            override = DispatchRequest.model_validate(body or {}).input
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        run = self.service.dispatch_routine(routine_id, override)
        return Response(202, run.public(), {"Location": f"/api/routines/{routine_id}/runs/{run.id}"})

    def list_runs(self, request: Request) -> Response:
        raw = request.query.get("status") or None
        if raw is not None and raw not in RunStatus.__members__:
            raise ApiError(
                400,
                "Bad request",
                f"status must be one of {', '.join(RunStatus.__members__)}",
                [{"loc": ["query", "status"], "msg": "unknown status"}],
            )
        page = self.service.list_runs(
            request.route_params["id"],
            RunStatus(raw) if raw else None,
            self._limit(request.query),
            request.query.get("continuation") or None,
        )
        return Response(200, {"items": [r.public() for r in page.items], "continuation": page.continuation})

    def get_run(self, request: Request) -> Response:
        run = self.service.get_run(request.route_params["id"], request.route_params["run_id"])
        return Response(200, run.public())

    # --- webhooks ---------------------------------------------------------------------------
    def receive_hook(self, request: Request) -> Response:
        """``POST /api/hooks/{key}``: anonymous; the delivery's signature is its authentication."""
        key = request.route_params["key"]
        outcome = self.service.receive_webhook(key, request.headers, request.body)
        if outcome.status == 204:
            return Response(204)
        run = outcome.run
        if run is None:  # a redelivery whose run was purged
            return Response(outcome.status, {"id": outcome.run_id})
        location = {"Location": f"/api/routines/{run.routine_id}/runs/{run.id}"}
        return Response(outcome.status, run.public(), location)

    def approve_step(self, request: Request) -> Response:
        return self._decide_step(request, approved=True)

    def reject_step(self, request: Request) -> Response:
        return self._decide_step(request, approved=False)

    def _decide_step(self, request: Request, *, approved: bool) -> Response:
        params = request.route_params
        body = self._json_body(request, optional=True)
        try:
            decision = DecisionRequest.model_validate(self._object(body) if body is not None else {})
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        run = self.service.decide_step(
            params["id"], params["run_id"], params["step_id"], approved, decision.comment
        )
        return Response(200, run.public())

    # --- misc -------------------------------------------------------------------------------
    def preview(self, request: Request) -> Response:
        data = self._object(self._json_body(request))
        now = self.clock()
        try:
            spec = PreviewRequest.model_validate(
                data, context={"min_interval_seconds": self.settings.min_interval_seconds}
            )
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        cursor = spec.after or now
        fires: list[datetime] = []
        while len(fires) < spec.count:
            fire = next_fire_after(spec.trigger, cursor)
            if fire is None:
                break
            fires.append(fire)
            cursor = fire
        body: dict[str, Any] = {"fires": [utc_text(f) for f in fires]}
        if spec.routine_id is not None or spec.jitter_seconds is not None:
            jitter = spec.jitter_seconds
            if jitter is None:
                jitter = self.service.get_routine(str(spec.routine_id)).jitter_seconds
            seed = spec.routine_id or ""  # no jitter without a routine id (the request rules)
            body["dispatch_at"] = [utc_text(f + jitter_offset(seed, f, jitter)) for f in fires]
        return Response(200, body)

    def health(self, request: Request) -> Response:
        try:
            self.store.ping()
        except RoutinesError as exc:
            # The error names accounts and endpoints: it goes to the log, not to an anonymous caller.
            log.warning("health: storage unavailable: %s", exc)
            return Response(503, {"status": "unavailable"})
        return Response(200, {"status": "ok"})
