"""``/api/foundry`` in process (``routines.foundry_api`` on the memory store): the gate that keeps it
off or behind App Service Authentication, the route and parameter edges the SDK never sends, and
the auth level of its routes in ``function_app.py``. The SDK itself drives it in test_foundry_sdk.py.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from routines.api import Request, Response
from routines.config import Settings, StorageTarget
from routines.errors import NotFound
from routines.foundry_api import FoundryApi
from routines.messages import MemoryQueue
from routines.models import RoutineState
from routines.service import Service
from routines.store.memory import MemoryStore
from tests.helpers import Clock

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
BODY = {
    "triggers": {"daily": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "UTC"}},
    "action": {"type": "invoke_agent_responses_api", "agent_name": "echo", "input": "hi"},
}


class Foundry:
    def __init__(self, **settings: Any) -> None:
        self.store, self.queue = MemoryStore(), MemoryQueue()
        base = Settings(storage=StorageTarget(connection_string="UseDevelopmentStorage=true"))
        self.settings = replace(base, **{"foundry_api": "open", **settings})
        self.api = FoundryApi(Service(self.store, self.queue, self.settings, Clock(NOW)), self.settings)

    def call(
        self, route: str, method: str, params: dict[str, str] | None = None, body: Any = None, **kw: Any
    ) -> Response:
        handler = {"list": self.api.list_routines, "item": self.api.routine, "runs": self.api.list_runs}[
            route
        ]
        request = Request(
            method=method,
            route_params=params or {},
            query=kw.get("query", {"api-version": "v1"}),
            headers={"content-type": "application/json", **kw.get("headers", {})},
            body=b"" if body is None else json.dumps(body).encode(),
        )
        return self.api.handle(handler, request)


def error_of(response: Response) -> dict[str, Any]:
    assert set(response.body) == {"error"}, response.body
    error: dict[str, Any] = response.body["error"]
    return error


def test_off_by_default_answers_404_and_touches_nothing() -> None:
    foundry = Foundry(foundry_api="off")
    assert Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}).foundry_api == "off"
    response = foundry.call("item", "PUT", {"name": "daily"}, BODY)
    assert response.status == 404 and "ROUTINES_FOUNDRY_API" in error_of(response)["message"]
    assert foundry.store.list_routines(None, 10, None).items == []


def test_entra_mode_refuses_everything_while_app_service_authentication_is_off() -> None:
    foundry = Foundry(foundry_api="entra", app_service_auth=False)
    # Even a request carrying the principal header: without the platform's authentication
    # nothing strips a forged one.
    response = foundry.call(
        "item", "PUT", {"name": "daily"}, BODY, headers={"x-ms-client-principal-id": "forged"}
    )
    assert response.status == 503 and "App Service Authentication" in error_of(response)["message"]
    assert foundry.store.list_routines(None, 10, None).items == []


def test_entra_mode_needs_the_principal_app_service_authentication_sets() -> None:
    foundry = Foundry(foundry_api="entra", app_service_auth=True)
    anonymous = foundry.call("item", "PUT", {"name": "daily"}, BODY)
    assert anonymous.status == 401 and error_of(anonymous)["code"] == "unauthorized"
    assert foundry.store.list_routines(None, 10, None).items == []
    signed_in = foundry.call(
        "item", "PUT", {"name": "daily"}, BODY, headers={"x-ms-client-principal-id": "oid-1"}
    )
    assert signed_in.status == 200 and signed_in.body["name"] == "daily"


@pytest.mark.parametrize(
    ("env", "mode", "auth"),
    [
        ({}, "off", False),
        ({"ROUTINES_FOUNDRY_API": "entra", "WEBSITE_AUTH_ENABLED": "True"}, "entra", True),
        ({"ROUTINES_FOUNDRY_API": "open", "WEBSITE_AUTH_ENABLED": "false"}, "open", False),
    ],
)
def test_settings(env: dict[str, str], mode: str, auth: bool) -> None:
    settings = Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true", **env})
    assert (settings.foundry_api, settings.app_service_auth) == (mode, auth)


@pytest.mark.parametrize(
    ("route", "method", "params", "query", "status", "words"),
    [
        pytest.param("item", "POST", {"name": "daily:pause"}, {}, 404, "unknown action", id="unknown_action"),
        pytest.param("item", "GET", {"name": "daily:enable"}, {}, 405, "use POST", id="action_with_get"),
        pytest.param("item", "POST", {"name": "daily"}, {}, 405, "not allowed", id="post_without_action"),
        pytest.param("list", "GET", {}, {"api-version": "2025-01-01"}, 400, "api-version", id="api_version"),
        pytest.param("list", "GET", {}, {"limit": "0"}, 400, "limit", id="limit"),
        pytest.param("list", "GET", {}, {"order": "sideways"}, 400, "order", id="order"),
        pytest.param("runs", "GET", {"name": "daily"}, {"order": "asc"}, 400, "newest first", id="runs_asc"),
        pytest.param("runs", "GET", {"name": "daily"}, {"filter": "x = 1"}, 400, "filter", id="runs_filter"),
        pytest.param("list", "GET", {}, {"after": "not-a-token"}, 400, "", id="bad_continuation"),
    ],
)
def test_edges_are_azure_style_errors(
    route: str, method: str, params: dict[str, str], query: dict[str, str], status: int, words: str
) -> None:
    foundry = Foundry()
    assert foundry.call("item", "PUT", {"name": "daily"}, BODY).status == 200
    response = foundry.call(route, method, params, query=query)
    assert response.status == status and words in error_of(response)["message"], response.body


def test_bad_json_and_missing_body_are_400() -> None:
    foundry = Foundry()
    request = Request(
        method="PUT", route_params={"name": "daily"}, headers={"content-type": "application/json"}, body=b"{"
    )
    assert foundry.api.handle(foundry.api.routine, request).status == 400
    assert foundry.call("item", "PUT", {"name": "daily"}).status == 400
    assert foundry.store.list_routines(None, 10, None).items == []


def test_a_name_routines_cannot_take_is_400_naming_name() -> None:
    response = Foundry().call("item", "PUT", {"name": "Daily_Scan"}, BODY)
    assert response.status == 400 and error_of(response)["param"] == "name"


def test_next_link_is_relative_to_the_endpoint_and_carries_the_token() -> None:
    foundry = Foundry()
    for index in range(3):
        assert foundry.call("item", "PUT", {"name": f"r{index}"}, BODY).status == 200
    page = foundry.call("list", "GET", query={"limit": "2"}).body
    assert len(page["data"]) == 2 and page["has_more"] is True
    assert page["next_link"].startswith("/routines?after=") and page["next_link"].endswith("&limit=2")
    assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][1]["id"])
    token = page["next_link"].split("after=")[1].split("&")[0]
    last = foundry.call("list", "GET", query={"limit": "2", "after": unquote(token)}).body
    assert len(last["data"]) == 1 and last["has_more"] is False and last["next_link"] is None


def foundry_routes() -> dict[str, ast.Call]:
    """``@app.route(...)`` decorators of function_app.py by route."""
    tree = ast.parse((ROOT / "function_app.py").read_text(encoding="utf-8"))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "app.route":
                    keywords = {k.arg: k.value for k in decorator.keywords}
                    found[ast.literal_eval(keywords["route"])] = decorator
    return found


def test_foundry_routes_are_anonymous_at_the_functions_level_and_the_rest_is_not() -> None:
    # The SDK sends a bearer token, never a function key: a function-level route would refuse it.
    routes = foundry_routes()
    assert {r for r in routes if r.startswith("foundry/")} == {
        "foundry/routines",
        "foundry/routines/{name}",
        "foundry/routines/{name}/runs",
    }
    for route, decorator in routes.items():
        level = next((ast.unparse(k.value) for k in decorator.keywords if k.arg == "auth_level"), None)
        if route.startswith("foundry/"):
            assert level == "func.AuthLevel.ANONYMOUS", route
        elif route.startswith("routines"):
            assert level is None, f"{route} should keep the app's function-level default"


def test_a_create_that_loses_the_race_for_its_name_updates_the_winner() -> None:
    foundry = Foundry()
    assert foundry.call("item", "PUT", {"name": "daily"}, BODY).status == 200
    lookups = foundry.store.get_routine_by_name

    def first_lookup_misses(name: str) -> Any:  # as if the other create landed just after it
        foundry.store.get_routine_by_name = lookups  # type: ignore[method-assign]
        raise NotFound(name)

    foundry.store.get_routine_by_name = first_lookup_misses  # type: ignore[method-assign]
    response = foundry.call("item", "PUT", {"name": "daily"}, {**BODY, "description": "second writer"})
    assert response.status == 200 and response.body["description"] == "second writer"
    assert len(foundry.store.list_routines(None, 10, None).items) == 1


def test_enabling_a_completed_timer_with_other_changes_is_409_and_changes_nothing() -> None:
    foundry = Foundry()
    timer = {"once": {"type": "timer", "at": int(NOW.timestamp()) + 3600}}
    assert foundry.call("item", "PUT", {"name": "once"}, {**BODY, "triggers": timer}).status == 200
    current, etag = foundry.store.get_routine_by_name("once")
    completed = current.model_copy(
        update={"state": RoutineState.completed, "next_fire_at": None, "due_at": None}
    )
    foundry.store.replace_routine(completed, etag, current)
    response = foundry.call("item", "PUT", {"name": "once"}, {"description": "changed", "enabled": True})
    assert response.status == 409 and error_of(response)["code"] == "conflict"
    assert foundry.store.get_routine_by_name("once")[0] == completed
