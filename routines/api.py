"""The HTTP management API of SPEC section 4, independent of the Functions runtime.

``function_app.py`` turns each ``func.HttpRequest`` into a ``Request`` and calls one handler; the
handlers validate, talk to the store and the queue, and return a ``Response``. Errors are
``application/problem+json``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic

from routines import lifecycle, scheduler, telemetry
from routines.config import Settings
from routines.errors import (
    Conflict,
    NotFound,
    PreconditionFailed,
    RoutinesError,
    StorageUnavailable,
    ValidationError,
)
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    MUTABLE_FIELDS,
    Model,
    Routine,
    RoutineCreate,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    Trigger,
    _RoutineFields,
    json_integers,
    manual_run_id,
    new_routine_id,
    now_utc,
    rfc3339_input,
    utc_text,
)
from routines.schedule import next_fire_after
from routines.store import Store

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 256 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 50, 200
_TAGS = {"schedule", "timer", "invocation", "response"}
# The location parts pydantic adds for the members of a plain union (``str | dict[str, Any]``).
_UNION_MEMBER = re.compile(r"^(?:function-|union\[|(?:str|int|float|bool|none|dict|list)(?:\[.*\])?$)")
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


def _loc(loc: tuple[Any, ...]) -> list[Any]:
    """pydantic's location without discriminator or union-member tags:
    ``trigger.schedule.cron_expression`` -> ``["trigger", "cron_expression"]``,
    ``actions.0.input.dict[str,any]`` -> ``["actions", 0, "input"]``."""
    out: list[Any] = []
    for part in loc:
        if isinstance(part, str) and (part in _TAGS or _UNION_MEMBER.match(part)):
            continue
        out.append(part)
    return out


def validation_errors(exc: pydantic.ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """One error per location: a value that matches no member of a union (``input``: a string or an
    object) gets one error whose message lists what each member wanted."""
    errors: list[dict[str, Any]] = []
    by_loc: dict[str, dict[str, Any]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        loc = _loc(prefix + tuple(err["loc"]))
        key = json.dumps(loc)
        if key in by_loc:
            by_loc[key]["msg"] += f"; or {msg[:1].lower()}{msg[1:]}"
            continue
        by_loc[key] = {"loc": loc, "msg": msg}
        errors.append(by_loc[key])
    return errors


def _invalid(exc: pydantic.ValidationError, prefix: tuple[Any, ...] = ()) -> ApiError:
    errors = validation_errors(exc, prefix)
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return ApiError(422, "Invalid request", f"{where}: {first['msg']}", errors)


def _not_json(constant: str) -> Any:
    """``json.loads`` accepts ``NaN`` and ``Infinity``; JSON does not (and they could not be sent back)."""
    raise ValueError(f"{constant} is not a JSON value")


class PreviewRequest(Model):
    trigger: Trigger
    after: datetime | None = None
    count: int = pydantic.Field(default=10, ge=1, le=100)

    _integers = pydantic.field_validator("count", mode="before")(json_integers)

    @pydantic.field_validator("after", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return None if value is None else rfc3339_input(value)

    @pydantic.field_validator("after")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone offset (RFC 3339)")
        try:
            return None if value is None else value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range in UTC") from None


class DispatchRequest(Model):
    input: str | dict[str, Any] | None = None


class Api:
    def __init__(
        self, store: Store, queue: DispatchQueue, settings: Settings, clock: Callable[[], datetime] = now_utc
    ) -> None:
        self.store, self.queue, self.settings, self.clock = store, queue, settings, clock

    # --- plumbing ---------------------------------------------------------------------------
    def handle(self, handler: Callable[[Request], Response], request: Request) -> Response:
        """Run one handler, mapping every expected failure to its problem response."""
        try:
            return handler(request)
        except ApiError as exc:
            return problem(exc.status, exc.title, exc.detail, exc.errors)
        except NotFound as exc:
            return problem(404, "Not found", str(exc))
        except Conflict as exc:
            return problem(409, "Conflict", str(exc))
        except PreconditionFailed as exc:
            return problem(412, "Precondition failed", str(exc))
        except ValidationError as exc:
            return problem(400, "Bad request", str(exc), exc.errors)
        except StorageUnavailable as exc:
            return problem(503, "Storage unavailable", str(exc))

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

    @staticmethod
    def _routine_response(
        routine: Routine, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        return Response(status, routine.public(), {"ETag": f'"{routine.version}"', **(headers or {})})

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
        now = self.clock()
        data = self._object(self._json_body(request))
        try:
            spec = RoutineCreate.model_validate(data, context=self._context(now))
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        routine = Routine(
            **spec.model_dump(exclude={"state"}),
            id=new_routine_id(),
            state=spec.state,
            created_at=now,
            updated_at=now,
            version=1,
            schedule_version=1,
        )
        # Written first, with a watch of each near fire; enqueued after (guarantee 1).
        plan = scheduler.plan_immediately(routine, now) if routine.state is RoutineState.enabled else None
        routine = plan.routine if plan else routine
        self.store.create_routine(routine, plan.watches if plan else ())
        if plan:
            scheduler.send_immediate(self.queue, plan)
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
        page = self.store.list_routines(
            state, self._limit(request.query), request.query.get("continuation") or None
        )
        return Response(200, {"items": [r.public() for r in page.items], "continuation": page.continuation})

    def get_routine(self, request: Request) -> Response:
        routine, _ = self.store.get_routine(request.route_params["id"])
        return self._routine_response(routine)

    def delete_routine(self, request: Request) -> Response:
        self.store.delete_routine(request.route_params["id"])
        return Response(204)

    @staticmethod
    def _check_if_match(current: Routine, if_match: str | None) -> None:
        if if_match is not None and if_match.strip() not in (
            "*",
            f'"{current.version}"',
            f'W/"{current.version}"',
            str(current.version),
        ):
            raise PreconditionFailed(f"routine {current.id} is at version {current.version}, not {if_match}")

    def _update(
        self, routine_id: str, change: Callable[[Routine, datetime], Routine | scheduler.Immediate | None]
    ) -> Routine:
        """Read, change, write conditionally; on a lost race read again. ``change`` returns None
        for "nothing to do", or a routine with near fires to enqueue once it is written."""
        for _ in range(8):
            now = self.clock()
            current, etag = self.store.get_routine(routine_id)
            updated = change(current, now)
            if updated is None:
                return current
            plan = updated if isinstance(updated, scheduler.Immediate) else scheduler.Immediate(updated)
            try:
                self.store.replace_routine(plan.routine, etag, current, plan.watches)
            except PreconditionFailed:
                continue
            scheduler.send_immediate(self.queue, plan)
            return plan.routine
        raise StorageUnavailable(f"routine {routine_id} kept changing; try again")

    def patch_routine(self, request: Request) -> Response:
        patch = self._object(self._json_body(request))
        if_match = request.headers.get("if-match")
        unknown = [k for k in patch if k not in MUTABLE_FIELDS]
        if unknown:
            raise ApiError(
                422,
                "Invalid request",
                f"{unknown[0]}: cannot be changed with PATCH",
                [{"loc": [k], "msg": "unknown or read-only field"} for k in unknown],
            )

        def change(current: Routine, now: datetime) -> Routine | scheduler.Immediate | None:
            merged = merge_patch(current.model_dump(mode="json", include=set(MUTABLE_FIELDS)), patch)
            old_trigger = current.trigger.model_dump(mode="json")
            if (
                isinstance(patch.get("trigger"), dict)
                and patch["trigger"].get("type", old_trigger["type"]) != old_trigger["type"]
            ):
                merged["trigger"] = patch["trigger"]  # a new kind of trigger replaces the old one whole
            trigger_changed = merged.get("trigger") != old_trigger
            context = self._context(now) if trigger_changed else {"min_interval_seconds": 0}
            try:
                fields = _RoutineFields.model_validate(merged, context=context)
            except pydantic.ValidationError as exc:
                raise _invalid(exc) from None
            # After validation (an invalid patch is 422 whatever the version: retrying it on the
            # current version cannot help), before any side effect.
            self._check_if_match(current, if_match)
            values = fields.model_dump()
            if all(values[k] == current.model_dump()[k] for k in values):
                return None
            updated = current.model_copy(
                update={**dict(fields), "version": current.version + 1, "updated_at": now}
            )
            if trigger_changed:
                updated = lifecycle.reschedule(updated, now)
                if updated.state is RoutineState.enabled:
                    return scheduler.plan_immediately(updated, now)
            return updated

        routine = self._update(request.route_params["id"], change)
        return self._routine_response(routine)

    def disable_routine(self, request: Request) -> Response:
        return self._routine_response(self._update(request.route_params["id"], lifecycle.disable))

    def enable_routine(self, request: Request) -> Response:
        def change(current: Routine, now: datetime) -> scheduler.Immediate | None:
            enabled = lifecycle.enable(current, now)
            return scheduler.plan_immediately(enabled, now) if enabled else None

        return self._routine_response(self._update(request.route_params["id"], change))

    # --- runs -------------------------------------------------------------------------------
    def dispatch_routine(self, request: Request) -> Response:
        routine, _ = self.store.get_routine(request.route_params["id"])
        body = self._json_body(request, optional=True)
        try:
            override = DispatchRequest.model_validate(body or {}).input
            if override is not None:
                type(routine.actions[0]).model_validate(
                    {**routine.actions[0].model_dump(), "input": override}
                )
        except pydantic.ValidationError as exc:
            raise _invalid(exc) from None
        now = self.clock()
        run_id = manual_run_id(now)
        run = Run(
            id=run_id,
            routine_id=routine.id,
            trigger=RunTrigger.manual,
            scheduled_for=now,
            status=RunStatus.queued,
            max_attempts=routine.retry_policy.max_attempts,
            idempotency_key=f"{routine.id}:manual:{run_id}",
            progress=RunProgress(input_override=override, routine_version=routine.version),
        )
        message = DispatchMessage(
            kind="fire",
            routine_id=routine.id,
            scheduled_for=now,
            routine_version=routine.version,
            attempt=1,
            run_id=run_id,
            traceparent=telemetry.current_traceparent(),
        )
        # Watch, then the run, then its message: whichever step a failure stops at, nothing is left
        # queued for ever (the repair pass sends a watched run's message again, and drops a watch
        # whose run was never written).
        self.store.watch([scheduler.watch_for(message, "manual")])
        self.store.insert_run(run)
        try:
            self.queue.send(message)
        except StorageUnavailable as exc:
            log.warning("manual run %s accepted but not enqueued (%s); the repair pass sends it", run_id, exc)
        return Response(202, run.public(), {"Location": f"/api/routines/{routine.id}/runs/{run_id}"})

    def list_runs(self, request: Request) -> Response:
        routine_id = request.route_params["id"]
        raw = request.query.get("status") or None
        if raw is not None and raw not in RunStatus.__members__:
            raise ApiError(
                400,
                "Bad request",
                f"status must be one of {', '.join(RunStatus.__members__)}",
                [{"loc": ["query", "status"], "msg": "unknown status"}],
            )
        status = RunStatus(raw) if raw else None
        page = self.store.list_runs(
            routine_id, status, self._limit(request.query), request.query.get("continuation") or None
        )
        if not page.items and request.query.get("continuation") is None:
            self.store.get_routine(routine_id)  # 404 for an unknown routine; a deleted one keeps its runs
        return Response(200, {"items": [r.public() for r in page.items], "continuation": page.continuation})

    def get_run(self, request: Request) -> Response:
        run, _ = self.store.get_run(request.route_params["id"], request.route_params["run_id"])
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
        fires: list[str] = []
        while len(fires) < spec.count:
            fire = next_fire_after(spec.trigger, cursor)
            if fire is None:
                break
            fires.append(utc_text(fire))
            cursor = fire
        return Response(200, {"fires": fires})

    def health(self, request: Request) -> Response:
        try:
            self.store.ping()
        except RoutinesError as exc:
            return Response(503, {"status": "unavailable", "detail": str(exc)})
        return Response(200, {"status": "ok"})


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
