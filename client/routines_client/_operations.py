"""What each call sends and how its answer is read, shared by the sync and the async client.

A builder returns an ``azure.core.rest.HttpRequest`` with a path under ``/api``; a reader turns a
successful response into models. Neither does I/O, so both clients are thin: send, check, read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.rest import HttpRequest

from routines_client._errors import error_from_response
from routines_client._models import Routine, RoutineRun, parse_time, to_json

# The keyword fields of create_routine / update_routine, as the API names them.
ROUTINE_FIELDS = (
    "name",
    "description",
    "trigger",
    "actions",
    "retry_policy",
    "overlap_policy",
    "catchup_window_seconds",
    "timeout_seconds",
    "concurrency",
    "rate_limit",
    "jitter_seconds",
    "start_at",
    "end_at",
    "max_fires",
    "pause_after_failures",
)


def _seg(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an id must be a non-empty string, not {value!r}")
    return quote(value, safe="")


def _json_request(
    method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> HttpRequest:
    request_headers = {"Accept": "application/json", **(headers or {})}
    if body is None:
        return HttpRequest(method, path, headers=request_headers)
    return HttpRequest(method, path, json=to_json(body), headers=request_headers)


def routine_body(routine: Routine | Mapping[str, Any] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a create: a ``Routine``, a JSON mapping, or keyword fields (which override)."""
    if routine is None:
        body: dict[str, Any] = {}
    elif isinstance(routine, Routine):
        body = routine.to_dict(writable_only=True)
    elif isinstance(routine, Mapping):
        body = dict(routine)
    else:
        raise TypeError(f"routine must be a Routine or a mapping, not {type(routine).__name__}")
    body.update({k: v for k, v in fields.items() if v is not None})
    return to_json(body)  # type: ignore[no-any-return]


def if_match(etag: str | None, match_condition: MatchConditions | None) -> dict[str, str]:
    """The ``If-Match`` header of an update.

    No ``match_condition``: conditional on ``etag`` when one is given, else unconditional.
    ``IfNotModified`` needs an etag (fails with ``PreconditionFailedError`` when the routine changed
    since); ``IfPresent`` only needs the routine to exist; ``Unconditionally`` sends no condition.
    """
    if match_condition is None:
        match_condition = MatchConditions.IfNotModified if etag else MatchConditions.Unconditionally
    if match_condition is MatchConditions.Unconditionally:
        return {}
    if match_condition is MatchConditions.IfPresent:
        return {"If-Match": "*"}
    if match_condition is MatchConditions.IfNotModified:
        if not etag:
            raise ValueError(
                "match_condition=IfNotModified needs an etag (or a Routine read from the server)"
            )
        return {"If-Match": etag if etag.startswith(("W/", '"')) or etag == "*" else f'"{etag}"'}
    raise ValueError(f"{match_condition} is not supported by update_routine")


def split_fields(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Routine fields given as keywords, apart from azure-core's per-call options."""
    fields = {k: kwargs[k] for k in ROUTINE_FIELDS if k in kwargs}
    return fields, {k: v for k, v in kwargs.items() if k not in fields}


def update_args(
    routine: Routine | str,
    patch: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    etag: str | None,
    match_condition: MatchConditions | None,
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(routine id, merge-patch body, headers) of an update. A ``Routine``'s own etag is used only
    with ``match_condition=IfNotModified``; an explicit ``etag`` alone makes the update conditional."""
    if isinstance(routine, Routine):
        if not routine.id:
            raise ValueError("this Routine has no id; read it with get_routine, or pass the id")
        routine_id, body = routine.id, routine.update_body()
        if etag is None and match_condition is MatchConditions.IfNotModified:
            etag = routine.etag
    elif isinstance(routine, str):
        routine_id, body = routine, {}
    else:
        raise TypeError(f"routine must be a Routine or an id, not {type(routine).__name__}")
    body.update(to_json(dict(patch or {})))
    body.update(to_json(dict(fields)))
    if not body:
        raise ValueError("nothing to update: pass a Routine, a patch or keyword fields")
    return routine_id, body, if_match(etag, match_condition)


# --- builders -------------------------------------------------------------------------------------


def create_routine(body: Mapping[str, Any]) -> HttpRequest:
    return _json_request("POST", "/api/routines", body)


def list_routines(state: str | None, limit: int | None, continuation: str | None) -> HttpRequest:
    params = {"state": state, "limit": limit, "continuation": continuation}
    return HttpRequest(
        "GET",
        "/api/routines",
        params={k: str(v) for k, v in params.items() if v is not None},
        headers={"Accept": "application/json"},
    )


def get_routine(routine_id: str) -> HttpRequest:
    return _json_request("GET", f"/api/routines/{_seg(routine_id)}")


def update_routine(routine_id: str, patch: Mapping[str, Any], headers: Mapping[str, str]) -> HttpRequest:
    return _json_request("PATCH", f"/api/routines/{_seg(routine_id)}", dict(patch), headers)


def delete_routine(routine_id: str) -> HttpRequest:
    return _json_request("DELETE", f"/api/routines/{_seg(routine_id)}")


def set_state(routine_id: str, verb: str) -> HttpRequest:
    return _json_request("POST", f"/api/routines/{_seg(routine_id)}/{verb}")


def dispatch_routine(routine_id: str, input: Any) -> HttpRequest:
    body = None if input is None else {"input": input}
    return _json_request("POST", f"/api/routines/{_seg(routine_id)}/dispatch", body)


def list_routine_runs(
    routine_id: str, status: str | None, limit: int | None, continuation: str | None
) -> HttpRequest:
    params = {"status": status, "limit": limit, "continuation": continuation}
    return HttpRequest(
        "GET",
        f"/api/routines/{_seg(routine_id)}/runs",
        params={k: str(v) for k, v in params.items() if v is not None},
        headers={"Accept": "application/json"},
    )


def get_routine_run(routine_id: str, run_id: str) -> HttpRequest:
    return _json_request("GET", f"/api/routines/{_seg(routine_id)}/runs/{_seg(run_id)}")


def decide_step(routine_id: str, run_id: str, step_id: str, verb: str, comment: str | None) -> HttpRequest:
    path = f"/api/routines/{_seg(routine_id)}/runs/{_seg(run_id)}/steps/{_seg(step_id)}/{verb}"
    return _json_request("POST", path, {} if comment is None else {"comment": comment})


def preview_fires(trigger: Any, after: datetime | str | None, count: int | None) -> HttpRequest:
    body: dict[str, Any] = {"trigger": trigger}
    if after is not None:
        body["after"] = after
    if count is not None:
        body["count"] = count
    return _json_request("POST", "/api/preview", body)


# --- readers --------------------------------------------------------------------------------------


def check(response: Any) -> Any:
    """The response itself when it succeeded; the matching ``RoutinesError`` otherwise."""
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def read_routine(response: Any) -> Routine:
    routine = Routine.from_dict(response.json())
    routine.etag = response.headers.get("ETag") or _version_etag(routine)
    return routine


def read_run(response: Any) -> RoutineRun:
    return RoutineRun.from_dict(response.json())


def read_fires(response: Any) -> list[datetime]:
    return [t for t in (parse_time(v) for v in response.json().get("fires", [])) if t is not None]


def routine_page(response: Any) -> tuple[str | None, Iterator[Routine]]:
    body = response.json()
    routines = [Routine.from_dict(item) for item in body.get("items", [])]
    for routine in routines:
        routine.etag = _version_etag(routine)
    return body.get("continuation") or None, iter(routines)


def run_page(response: Any) -> tuple[str | None, Iterator[RoutineRun]]:
    body = response.json()
    return body.get("continuation") or None, iter(RoutineRun.from_dict(i) for i in body.get("items", []))


def _version_etag(routine: Routine) -> str | None:
    # The API's ETag is the version in quotes (list items carry no header of their own).
    return None if routine.version is None else f'"{routine.version}"'
