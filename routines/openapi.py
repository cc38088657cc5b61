"""``GET /api/openapi.json``: the OpenAPI 3.1 document, with schemas generated from the models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from routines.api import DispatchRequest, PreviewRequest
from routines.models import Routine, RoutineCreate, Run, _RoutineFields

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
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}}
_CONT = {"name": "continuation", "in": "query", "schema": {"type": "string"}}


def _op(
    summary: str,
    ok: int,
    body: dict[str, Any] | None,
    errors: tuple[int, ...],
    request: str | None = None,
    params: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(ok): {"description": summary, **(_json(body) if body else {})}}
    for status in errors:
        responses[str(status)] = _PROBLEM
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if request:
        op["requestBody"] = {"required": request != "DispatchRequest", **_json(_ref(request))}
    return op


@functools.cache
def document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in (RoutineCreate, PreviewRequest, DispatchRequest, _RoutineFields)]
        + [(m, "serialization") for m in (Routine, Run)],
        ref_template=_REF,
        schema_generator=_SchemaGenerator,
    )
    components: dict[str, Any] = dict(schemas.get("$defs", {}))
    # Generated in the same batch as the others, so its $refs use the same (-Input/-Output) names.
    patch_schema = dict(components.pop(_RoutineFields.__name__))
    patch_schema.pop("required", None)
    patch_schema["title"] = "RoutinePatch"
    components["RoutinePatch"] = patch_schema
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
    state = {
        "name": "state",
        "in": "query",
        "schema": {"type": "string", "enum": ["enabled", "disabled", "completed"]},
    }
    status = {
        "name": "status",
        "in": "query",
        "schema": {
            "type": "string",
            "enum": [
                "queued",
                "running",
                "retrying",
                "succeeded",
                "failed",
                "skipped",
                "missed",
                "cancelled",
            ],
        },
    }
    routine = _ref("Routine")
    paths = {
        "/api/routines": {
            "post": _op("Create a routine", 201, routine, (400, 409, 413, 415, 422), "RoutineCreate"),
            "get": _op("List routines", 200, _page("Routine"), (400,), params=(state, _LIMIT, _CONT)),
        },
        "/api/routines/{id}": {
            "get": _op("Get a routine", 200, routine, (404,), params=(_ID,)),
            "patch": _op(
                "Change a routine (JSON merge patch)",
                200,
                routine,
                (400, 404, 409, 412, 413, 415, 422),
                "RoutinePatch",
                (_ID, {"name": "If-Match", "in": "header", "schema": {"type": "string"}}),
            ),
            "delete": {
                "summary": "Delete a routine",
                "parameters": [_ID],
                "responses": {"204": {"description": "Deleted"}, "404": _PROBLEM},
            },
        },
        "/api/routines/{id}/enable": {"post": _op("Enable", 200, routine, (404, 409), params=(_ID,))},
        "/api/routines/{id}/disable": {"post": _op("Disable", 200, routine, (404,), params=(_ID,))},
        "/api/routines/{id}/dispatch": {
            "post": _op("Run now", 202, _ref("Run"), (400, 404, 413, 415, 422), "DispatchRequest", (_ID,))
        },
        "/api/routines/{id}/runs": {
            "get": _op(
                "List runs, newest first", 200, _page("Run"), (400, 404), params=(_ID, status, _LIMIT, _CONT)
            )
        },
        "/api/routines/{id}/runs/{run_id}": {
            "get": _op("Get a run", 200, _ref("Run"), (404,), params=(_ID, _RUN_ID))
        },
        "/api/preview": {
            "post": _op(
                "Preview the next fires of a trigger",
                200,
                {
                    "type": "object",
                    "required": ["fires"],
                    "properties": {
                        "fires": {"type": "array", "items": {"type": "string", "format": "date-time"}}
                    },
                },
                (400, 413, 415, 422),
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
            "description": "Agent scheduler: cron and timer triggers bound to agent invocations.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"functionKey": {"type": "apiKey", "in": "header", "name": "x-functions-key"}},
        },
    }
