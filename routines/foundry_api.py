"""``/api/foundry``: the REST shape Foundry Routines' Python SDK speaks (``azure-ai-projects``
``project_client.beta.routines``), so code written against Foundry runs against Routines with only
its endpoint changed.

An HTTP adapter like ``routines.api``, over the same ``routines.service`` operations: routines are
addressed by name, bodies are translated by ``routines.foundry_translate``, and errors are
Azure-style ``{"error": {"code", "message"}}`` with the status the SDK turns into its own exception
(``ResourceNotFoundError`` for 404, ``ResourceExistsError`` for 409, ``HttpResponseError`` else).

Action routes (``{name}:enable``) arrive on the plain ``routines/{name}`` route: a colon is not a
route separator for the Functions host or the devhost, and routine names cannot contain one, so the
action is split off here (docs: the README's design notes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from routines import foundry_translate as translate
from routines import lifecycle
from routines.api import Api, ApiError, Request, Response
from routines.config import Settings
from routines.errors import (
    Conflict,
    Invalid,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
    ValidationError,
)
from routines.models import Routine, RoutineState
from routines.service import Service

API_VERSION = "v1"
_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    503: "service_unavailable",
}
_ACTIONS = ("enable", "disable", "dispatch_async")
# Set by App Service Authentication on the requests it authenticated; it strips a copy sent by
# the caller, so with the platform's authentication on, its presence means "validated".
_PRINCIPAL_HEADER = "x-ms-client-principal-id"


def error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> Response:
    body: dict[str, Any] = {"code": _CODES.get(status, "error"), "message": message}
    if details:
        body["param"] = body["target"] = details[0]["param"]  # OpenAI's name and OData's
        body["details"] = details
    return Response(status, {"error": body})


def _details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"code": "invalid_value", "message": e["msg"], "param": where, "target": where}
        for e in exc.errors
        for where in [".".join(str(p) for p in e["loc"])]
    ]


class FoundryApi:
    def __init__(self, service: Service, settings: Settings) -> None:
        self.service, self.settings = service, settings

    # --- plumbing ---------------------------------------------------------------------------
    def handle(self, handler: Callable[[Request], Response], request: Request) -> Response:
        """Check the gate, run one handler, and map every expected failure to an Azure-style error."""
        try:
            refused = self._refused(request)
            if refused:
                return refused
            version = request.query.get("api-version")
            if version not in (None, API_VERSION):
                raise ApiError(400, "", f"api-version {version!r} is not supported; use {API_VERSION}")
            return handler(request)
        except ApiError as exc:
            return error(exc.status, exc.detail)
        except NotFound as exc:
            return error(404, str(exc))
        except Conflict as exc:
            return error(409, str(exc))
        except PreconditionFailed as exc:
            return error(412, str(exc))
        except ValidationError as exc:  # Invalid included: this surface answers 400, not 422
            return error(400, str(exc), _details(exc))
        except StorageUnavailable as exc:
            return error(503, str(exc))

    def _refused(self, request: Request) -> Response | None:
        mode = self.settings.foundry_api
        if mode == "off":
            return error(404, "the Foundry Routines API is off (set ROUTINES_FOUNDRY_API to turn it on)")
        if mode == "entra":
            if not self.settings.app_service_auth:
                return error(
                    503,
                    "ROUTINES_FOUNDRY_API=entra needs App Service Authentication, which is off here; "
                    "refusing every request rather than serving them unauthenticated",
                )
            if not request.headers.get(_PRINCIPAL_HEADER):
                return error(401, "an Entra bearer token is required (App Service Authentication)")
        return None

    @staticmethod
    def _order(query: Mapping[str, str], *, only_desc: bool) -> None:
        order = query.get("order") or None
        if order is None:
            return
        if order not in ("asc", "desc"):
            raise ApiError(400, "", f"order must be asc or desc, not {order!r}")
        if only_desc and order == "asc":
            raise ApiError(400, "", "order=asc is not supported: runs come newest first (order=desc)")

    @staticmethod
    def _page(items: list[dict[str, Any]], continuation: str | None, path: str, limit: int) -> dict[str, Any]:
        """Foundry's list page. ``next_link`` is relative to the client's endpoint, as the SDK's own
        route templates are: the SDK joins it onto the endpoint it was given, whatever host, scheme
        or proxy sits in front of the app."""
        next_link = None
        if continuation:
            next_link = f"{path}?{urlencode({'after': continuation, 'limit': limit})}"
        return {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": next_link is not None,
            "next_link": next_link,
        }

    def _named(self, request: Request) -> tuple[str, str | None]:
        """The routine name and the action (``enable``...) of ``routines/{name}[:action]``."""
        raw = request.route_params["name"]
        name, colon, action = raw.rpartition(":")
        if not colon:
            return raw, None
        if action not in _ACTIONS:
            raise ApiError(404, "", f"unknown action {action!r}; the actions are {', '.join(_ACTIONS)}")
        return name, action

    # --- routes -----------------------------------------------------------------------------
    def list_routines(self, request: Request) -> Response:
        self._order(request.query, only_desc=False)  # accepted; routines come in a stable (id) order
        limit = Api._limit(request.query)
        page = self.service.list_routines(None, limit, request.query.get("after") or None)
        items = [translate.foundry_routine(r) for r in page.items]
        return Response(200, self._page(items, page.continuation, "/routines", limit))

    def routine(self, request: Request) -> Response:
        """``routines/{name}``: GET, PUT (create or update), DELETE; POST ``{name}:<action>``."""
        name, action = self._named(request)
        method = request.method.upper()
        if action is not None:
            if method != "POST":
                raise ApiError(405, "", f"{method} is not allowed on routines/{{name}}:{action}; use POST")
            return self._action(name, action, request)
        if method == "GET":
            return Response(200, translate.foundry_routine(self.service.get_routine_by_name(name)))
        if method == "PUT":
            return self._create_or_update(name, request)
        if method == "DELETE":
            self.service.delete_routine(self.service.get_routine_by_name(name).id)
            return Response(204)
        raise ApiError(405, "", f"{method} is not allowed on routines/{{name}}")

    def _create_or_update(self, name: str, request: Request) -> Response:
        spec = translate.routine_request(name, Api._json_body(request))
        try:
            routine = self._write(name, spec)
        except Invalid as exc:
            raise translate.relocated(exc, spec.trigger_key) from None
        # The definition first, then the state: a fire the new definition queued is dropped as
        # stale by a disable that follows (guarantee 4); an enable plans from the new trigger.
        if spec.enabled is True and routine.state is not RoutineState.enabled:
            routine = self.service.enable_routine(routine.id)
        elif spec.enabled is False and routine.state is RoutineState.enabled:
            routine = self.service.disable_routine(routine.id)
        return Response(200, translate.foundry_routine(routine))

    def _write(self, name: str, spec: translate.RoutineRequest) -> Routine:
        """Create the routine, or update the one of that name; a create that loses a race with
        another of the same name updates the winner instead."""
        try:
            current = self.service.get_routine_by_name(name)
        except NotFound:
            try:
                return self.service.create_routine(spec.create_fields(name))
            except Conflict:
                current = self.service.get_routine_by_name(name)
        if spec.enabled is True and spec.trigger is None:
            # The enable that follows the update must not fail after the update landed: the same
            # pure rule, checked first (a completed timer raises Conflict here, nothing written).
            lifecycle.enable(current, self.service.clock())
        patch = spec.patch(current)
        return self.service.update_routine(current.id, patch, None) if patch else current

    def _action(self, name: str, action: str, request: Request) -> Response:
        routine = self.service.get_routine_by_name(name)
        if action == "enable":
            return Response(200, translate.foundry_routine(self.service.enable_routine(routine.id)))
        if action == "disable":
            return Response(200, translate.foundry_routine(self.service.disable_routine(routine.id)))
        override = translate.dispatch_override(Api._json_body(request, optional=True))
        try:
            run = self.service.dispatch_routine(routine.id, override)
        except Invalid as exc:
            raise translate.relocated(exc, None, dispatch=True) from None
        return Response(200, {"dispatch_id": run.id, "action_correlation_id": None, "task_id": None})

    def list_runs(self, request: Request) -> Response:
        name = request.route_params["name"]
        if request.query.get("filter"):
            raise ApiError(
                400, "", "filter is not supported; /api/routines/{id}/runs?status= filters by status"
            )
        self._order(request.query, only_desc=True)
        limit = Api._limit(request.query)
        routine = self.service.get_routine_by_name(name)
        page = self.service.list_runs(routine.id, None, limit, request.query.get("after") or None)
        items = [translate.foundry_run(run) for run in page.items]
        return Response(200, self._page(items, page.continuation, f"/routines/{quote(name)}/runs", limit))
