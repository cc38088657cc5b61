"""``GET /api/openapi.json``: the OpenAPI 3.1 document, with schemas generated from the models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from routines.api import DecisionRequest, DispatchRequest, PreviewRequest
from routines.models import Routine, RoutineCreate, Run, RunStatus, _RoutineFields

_REF = "#/components/schemas/{model}"


class _SchemaGenerator(GenerateJsonSchema):
    """``CompactModel``'s wrap serializer (it drops ``None`` fields) returns ``Any``, which pydantic
    documents as an empty schema ``{}``; document the model's fields instead."""

    def ser_schema(
        self,
        schema: core_schema.SerSchema | core_schema.IncExSeqSerSchema | core_schema.IncExDictSerSchema,
    ) -> JsonSchemaValue | None:
        returned: Any = schema.get("return_schema") or {}
        if schema.get("type") == "function-wrap" and returned.get("type") == "any":
            return None
        return super().ser_schema(schema)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _page(name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "continuation"],
        "properties": {
            "items": {"type": "array", "items": _ref(name)},
            "continuation": {"type": ["string", "null"]},
        },
    }


_PROBLEM = {"description": "Problem", "content": {"application/problem+json": {"schema": _ref("Problem")}}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_STEP_ID = {"name": "step_id", "in": "path", "required": True, "schema": {"type": "string"}}
# An empty query parameter (``?limit=``) counts as absent, so the empty string is part of each schema.
_EMPTY = {"type": "string", "maxLength": 0}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "description": "page size, default 50; empty: the default",
    "schema": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 200}, _EMPTY]},
}
_CONT = {
    "name": "continuation",
    "in": "query",
    "description": "the token of the previous page (opaque); empty: the first page",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"},
}
_ETAG = {"ETag": {"description": 'the routine\'s version, quoted: "<version>"', "schema": {"type": "string"}}}
_LOCATION = {"Location": {"description": "the created resource", "schema": {"type": "string"}}}


def _filter(name: str, values: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": "empty: no filter",
        "schema": {"type": "string", "enum": [*values, ""]},
    }


# Rules between fields that the models enforce in validators, stated in JSON Schema so the document
# tells the whole truth about what a request may hold.
_ONE_AGENT = {
    "description": "exactly one of agent_id or agent_name; agent_version goes with agent_name",
    "anyOf": [
        {
            "required": ["agent_id"],
            "properties": {
                "agent_id": {"type": "string"},
                "agent_name": {"type": "null"},
                "agent_version": {"type": "null"},
            },
        },
        {
            "required": ["agent_name"],
            "properties": {"agent_name": {"type": "string"}, "agent_id": {"type": "null"}},
        },
    ],
}
_EXPONENTIAL = {"required": ["backoff"], "properties": {"backoff": {"const": "exponential"}}}
_RETRY_FORMS = [
    {
        "if": _EXPONENTIAL,
        "then": {"properties": {"delays_seconds": {"type": "null"}}},
        "else": {
            "properties": {
                "initial_delay_seconds": {"type": "null"},
                "max_delay_seconds": {"type": "null"},
                "jitter": {"type": "null"},
            }
        },
    },
    {
        # Fixed delays with retries need at least one delay (absent or null: the default ones).
        "if": {
            "anyOf": [
                _EXPONENTIAL,
                {"required": ["max_attempts"], "properties": {"max_attempts": {"const": 1}}},
            ]
        },
        "then": {},
        "else": {"properties": {"delays_seconds": {"anyOf": [{"type": "null"}, {"minItems": 1}]}}},
    },
]
# A webhook condition's value: a boolean (or absent) for ``exists``, required for the other ops, a list
# for ``in``.
_CONDITION_VALUE = [
    {
        "if": {"properties": {"op": {"const": "exists"}}},
        "then": {"properties": {"value": {"type": ["boolean", "null"]}}},
        "else": {"required": ["value"]},
    },
    {"if": {"properties": {"op": {"const": "in"}}}, "then": {"properties": {"value": {"type": "array"}}}},
]
# The fields of a routine that have a default: ``null`` in a merge patch puts the default back.
_DEFAULTED = (
    "description",
    "retry_policy",
    "overlap_policy",
    "catchup_window_seconds",
    "timeout_seconds",
    "jitter_seconds",
    "pause_after_failures",
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if {"type": "null"} in schema.get("anyOf", []):
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _trigger_patch(trigger: dict[str, Any], nullable: tuple[str, ...]) -> dict[str, Any]:
    """A trigger in a merge patch: any of its members (``type`` included: without it the routine's
    trigger type is kept); a new ``type`` replaces the trigger whole, which the merge then checks."""
    properties = {
        name: (_nullable(schema) if name in nullable else schema)
        for name, schema in trigger["properties"].items()
    }
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _routine_patch(fields: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 merge patch of a routine's fields: every member optional, ``null`` restores the
    default of a defaulted field, and the trigger is itself merged member by member."""
    properties = dict(fields["properties"])
    for name in _DEFAULTED:
        properties[name] = _nullable(properties[name])
    schedule = components["ScheduleTrigger"]
    timer = components.get("TimerTrigger-Input") or components["TimerTrigger"]
    webhook = components.get("WebhookTrigger-Input") or components["WebhookTrigger"]
    properties["trigger"] = {
        "anyOf": [
            _trigger_patch(schedule, ("time_zone",)),
            _trigger_patch(timer, ()),
            _trigger_patch(webhook, ("when", "debounce_seconds")),
        ]
    }
    # Inside a patched retry policy, null removes a member too (its default comes back).
    retry = components["RetryPolicy"]
    properties["retry_policy"] = {
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: _nullable(schema) for name, schema in retry["properties"].items()},
            },
            {"type": "null"},
        ]
    }
    return {
        "title": "RoutinePatch",
        "description": "JSON merge patch (RFC 7396) of the routine's fields; the merged routine is then "
        "validated as a whole (422), so rules between fields apply to the result, not the patch.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def _op(
    summary: str,
    ok: int,
    body: dict[str, Any] | None,
    errors: tuple[int, ...],
    request: str | None = None,
    params: tuple[dict[str, Any], ...] = (),
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(ok): {"description": summary, **(_json(body) if body else {})}}
    if headers:
        responses[str(ok)]["headers"] = headers
    for status in errors:
        responses[str(status)] = _PROBLEM
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if request:
        optional = request in ("DispatchRequest", "DecisionRequest")
        op["requestBody"] = {"required": not optional, **_json(_ref(request))}
    return op


@functools.cache
def document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (m, "validation")
            for m in (RoutineCreate, PreviewRequest, DispatchRequest, DecisionRequest, _RoutineFields)
        ]
        + [(m, "serialization") for m in (Routine, Run)],
        ref_template=_REF,
        schema_generator=_SchemaGenerator,
    )
    components: dict[str, Any] = dict(schemas.get("$defs", {}))
    for action in ("InvocationAction", "ResponseAction"):
        components[action] = {**components[action], "allOf": [_ONE_AGENT]}
    components["RetryPolicy"] = {**components["RetryPolicy"], "allOf": _RETRY_FORMS}
    components["EventCondition"] = {**components["EventCondition"], "allOf": _CONDITION_VALUE}
    # Generated in the same batch as the others, so its $refs use the same (-Input/-Output) names.
    components["RoutinePatch"] = _routine_patch(components.pop(_RoutineFields.__name__), components)
    components["Problem"] = {
        "type": "object",
        "required": ["title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "msg": {"type": "string"},
                    },
                },
            },
        },
    }
    state = _filter("state", ["enabled", "disabled", "completed"])
    status = _filter("status", [s.value for s in RunStatus])
    routine = _ref("Routine")
    paths = {
        "/api/routines": {
            "post": _op(
                "Create a routine",
                201,
                routine,
                (400, 409, 413, 415, 422),
                "RoutineCreate",
                headers={**_LOCATION, **_ETAG},
            ),
            "get": _op("List routines", 200, _page("Routine"), (400,), params=(state, _LIMIT, _CONT)),
        },
        "/api/routines/{id}": {
            "get": _op("Get a routine", 200, routine, (404,), params=(_ID,), headers=_ETAG),
            "patch": _op(
                "Change a routine (JSON merge patch)",
                200,
                routine,
                (400, 404, 409, 412, 413, 415, 422),
                "RoutinePatch",
                (_ID, {"name": "If-Match", "in": "header", "schema": {"type": "string"}}),
                _ETAG,
            ),
            "delete": {
                "summary": "Delete a routine",
                "parameters": [_ID],
                "responses": {"204": {"description": "Deleted"}, "404": _PROBLEM},
            },
        },
        "/api/routines/{id}/enable": {
            "post": _op("Enable", 200, routine, (404, 409), params=(_ID,), headers=_ETAG)
        },
        "/api/routines/{id}/disable": {
            "post": _op("Disable", 200, routine, (404,), params=(_ID,), headers=_ETAG)
        },
        "/api/routines/{id}/dispatch": {
            "post": _op(
                "Run now",
                202,
                _ref("Run"),
                (400, 404, 413, 415, 422),
                "DispatchRequest",
                (_ID,),
                _LOCATION,
            )
        },
        "/api/routines/{id}/runs": {
            "get": _op(
                "List runs, newest first", 200, _page("Run"), (400, 404), params=(_ID, status, _LIMIT, _CONT)
            )
        },
        "/api/routines/{id}/runs/{run_id}": {
            "get": _op("Get a run", 200, _ref("Run"), (404,), params=(_ID, _RUN_ID))
        },
        "/api/hooks/{key}": {
            "post": {
                "summary": "Deliver a webhook event (anonymous: the signature authenticates it)",
                "security": [],
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "the routine's id or name",
                    },
                    *(
                        {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
                        for name in (
                            "webhook-id",
                            "webhook-timestamp",
                            "webhook-signature",
                            "X-Hub-Signature-256",
                            "X-GitHub-Delivery",
                        )
                    ),
                ],
                "requestBody": {"required": True, **_json({})},
                "responses": {
                    "202": {
                        "description": "A run started (or, debounced, took this event)",
                        **_json(_ref("Run")),
                        "headers": _LOCATION,
                    },
                    "200": {
                        "description": "A redelivery: the run this delivery id started",
                        **_json({"anyOf": [_ref("Run"), {"type": "object"}]}),
                    },
                    "204": {"description": "Filtered out by the trigger's when: no run"},
                    **{str(code): _PROBLEM for code in (400, 401, 404, 409, 413, 503)},
                },
            }
        },
        **{
            f"/api/routines/{{id}}/runs/{{run_id}}/steps/{{step_id}}/{verb}": {
                "post": _op(
                    summary,
                    200,
                    _ref("Run"),
                    (400, 404, 409, 413, 415, 422),
                    "DecisionRequest",
                    (_ID, _RUN_ID, _STEP_ID),
                )
            }
            for verb, summary in (
                ("approve", "Approve a waiting approval step"),
                ("reject", "Reject a waiting approval step (the step fails)"),
            )
        },
        "/api/preview": {
            "post": _op(
                "Preview the next fires of a trigger",
                200,
                {
                    "type": "object",
                    "required": ["fires"],
                    "properties": {
                        "fires": {"type": "array", "items": {"type": "string", "format": "date-time"}},
                        "dispatch_at": {"type": "array", "items": {"type": "string", "format": "date-time"}},
                    },
                },
                (400, 404, 413, 415, 422),
                "PreviewRequest",
            )
        },
        "/api/health": {
            "get": {
                "summary": "Storage health",
                "responses": {
                    "200": {"description": "ok", **_json({"type": "object"})},
                    "503": {"description": "storage unavailable", **_json({"type": "object"})},
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Routines",
            "version": "1.0.0",
            "description": "Agent scheduler: cron, timer and webhook triggers bound to agent invocations.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"functionKey": {"type": "apiKey", "in": "header", "name": "x-functions-key"}},
        },
    }
