"""Foundry Routines' REST shapes (``azure-ai-projects`` ``beta.routines``, api-version ``v1``) and
Routines' own models, both ways. Pure: no I/O, no clock.

Foundry -> Routines checks only what is Foundry's shape (one trigger, known trigger and action types,
known fields) and raises ``ValidationError`` naming the Foundry field; everything else (cron syntax,
time zones, the minimum interval, input size) is left to the domain's own validation, whose errors
``relocated`` moves onto the Foundry field names with the same wording.

Routines -> Foundry renders a ``Routine`` as Foundry's ``Routine`` and a ``Run`` as ``RoutineRun``
(timestamps as Unix seconds, which is how that SDK reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from routines.errors import Invalid, ValidationError
from routines.models import ResponseAction, Routine, RoutineState, Run, ScheduleTrigger, TimerTrigger

RESPONSES_API = "invoke_agent_responses_api"
INVOCATIONS_API = "invoke_agent_invocations_api"
_BODY_FIELDS = {"name", "description", "enabled", "triggers", "action", "authorization"}
_READ_ONLY = {"id", "created_at", "updated_at"}  # a routine read and sent back: ignored
_ACTION_FIELDS = {"type", "agent_name", "agent_endpoint_id", "input", "conversation"}

# Routines' run status -> Foundry's run phase (queued, dispatching, completed, failed).
_PHASES = {
    "queued": "queued",
    "retrying": "queued",
    "running": "dispatching",
    "waiting": "dispatching",
    "succeeded": "completed",
    "skipped": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "missed": "failed",
}
_ATTEMPT_SOURCES = {
    "schedule": "schedule_delivery",
    "timer": "timer_delivery",
    "manual": "manual_dispatch",
    "webhook": "event_fire",
}


def bad(loc: list[Any], msg: str) -> ValidationError:
    """A ``ValidationError`` naming one Foundry field, ``triggers.daily.type: ...``."""
    where = ".".join(str(part) for part in loc) or "body"
    return ValidationError(f"{where}: {msg}", [{"loc": loc, "msg": msg}])


@dataclass(frozen=True)
class RoutineRequest:
    """A ``create_or_update`` body in Routines' terms: only the fields the body gave (``None`` =
    not given). ``trigger`` and ``actions`` are JSON for the domain models to validate."""

    trigger_key: str | None = None
    trigger: dict[str, Any] | None = None
    actions: list[dict[str, Any]] | None = None
    description: str | None = None
    enabled: bool | None = None

    def create_fields(self, name: str) -> dict[str, Any]:
        """The fields of a new routine. Raises ``ValidationError`` when the trigger or action is
        missing (an update may leave them out; a create cannot)."""
        if self.trigger is None:
            raise bad(["triggers"], "a new routine needs exactly one trigger")
        if self.actions is None:
            raise bad(["action"], "a new routine needs an action")
        return {
            "name": name,
            "description": self.description or "",
            "trigger": self.trigger,
            "actions": self.actions,
            "state": RoutineState.disabled.value if self.enabled is False else RoutineState.enabled.value,
        }

    def patch(self, current: Routine) -> dict[str, Any]:
        """A JSON merge patch of ``current`` that replaces what the body gave, whole: a trigger
        field the body left out returns to its default rather than keeping its old value."""
        patch: dict[str, Any] = {}
        if self.description is not None:
            patch["description"] = self.description
        if self.trigger is not None:
            old = current.trigger.model_dump(mode="json")
            # Another kind of trigger replaces the old one whole already (``Service.update_routine``).
            cleared = {key: None for key in old} if self.trigger.get("type") == old["type"] else {}
            patch["trigger"] = {**cleared, **self.trigger}
        if self.actions is not None:
            patch["actions"] = self.actions  # a list: merge patch replaces it whole
        return patch


def routine_request(name: str, body: Any) -> RoutineRequest:
    """Read a ``create_or_update`` body. Raises ``ValidationError`` for what Routines does not
    take: more than one trigger, GitHub or custom triggers, the invocations API, unknown fields."""
    if not isinstance(body, dict):
        raise bad([], "the body must be a JSON object")
    for key in body:
        if key not in _BODY_FIELDS | _READ_ONLY:
            raise bad([key], "unknown field")
    if body.get("name") is not None and body["name"] != name:
        raise bad(["name"], f"is {body['name']!r} but the route names {name!r}; rename through /api/routines")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise bad(["description"], "must be a string")
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise bad(["enabled"], "must be true or false")
    _check_authorization(body.get("authorization"))
    key, trigger = _trigger(body.get("triggers"))
    action = body.get("action")
    return RoutineRequest(
        trigger_key=key,
        trigger=trigger,
        actions=None if action is None else [_action(action)],
        description=description,
        enabled=enabled,
    )


def _check_authorization(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - {"identity"}:
        raise bad(["authorization"], 'only {"identity": "agent"} is accepted')
    if value.get("identity") not in (None, "agent"):
        raise bad(
            ["authorization", "identity"],
            f"{value['identity']!r} is not supported: Routines calls agents with its own identity (agent)",
        )


def _trigger(triggers: Any) -> tuple[str | None, dict[str, Any] | None]:
    if triggers is None:
        return None, None
    if not isinstance(triggers, dict):
        raise bad(["triggers"], "must be an object of named triggers")
    if len(triggers) != 1:
        raise bad(["triggers"], f"exactly one trigger per routine is supported, not {len(triggers)}")
    ((key, trigger),) = triggers.items()
    if not isinstance(trigger, dict):
        raise bad(["triggers", key], "must be an object")
    kind = trigger.get("type")
    if kind in ("github_issue", "custom"):
        raise bad(
            ["triggers", key, "type"],
            f"{kind} triggers are not supported; Routines fires on schedule and timer triggers",
        )
    if kind not in ("schedule", "timer"):
        raise bad(["triggers", key, "type"], f"unknown trigger type {kind!r}; use schedule or timer")
    out = dict(trigger)
    at = out.get("at")
    if kind == "timer" and isinstance(at, int | float) and not isinstance(at, bool):
        try:
            out["at"] = _rfc3339(datetime.fromtimestamp(at, UTC))
        except (OverflowError, OSError, ValueError):
            raise bad(["triggers", key, "at"], "is not a valid Unix timestamp") from None
    return str(key), out


def _action(action: Any) -> dict[str, Any]:
    if not isinstance(action, dict):
        raise bad(["action"], "must be an object")
    kind = action.get("type")
    if kind == INVOCATIONS_API:
        raise bad(["action", "type"], f"{INVOCATIONS_API} is not supported; use {RESPONSES_API}")
    if kind != RESPONSES_API:
        raise bad(["action", "type"], f"unknown action type {kind!r}; use {RESPONSES_API}")
    for key in action:
        if key not in _ACTION_FIELDS:
            raise bad(["action", key], "unknown field")
    if action.get("agent_endpoint_id") is not None:
        raise bad(["action", "agent_endpoint_id"], "is not supported; address the agent by agent_name")
    out: dict[str, Any] = {"type": "invocation", "agent_name": action.get("agent_name")}
    if "input" in action:
        out["input"] = action["input"]
    if action.get("conversation") is not None:
        out.update(type="response", thread_id=action["conversation"])
    return out


def dispatch_override(body: Any) -> str | dict[str, Any] | None:
    """The input override of a ``dispatch`` body (``{"payload": {"type", "input"}}``, or none).
    Raises ``ValidationError`` for a payload type other than the responses API."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise bad([], "the body must be a JSON object")
    for key in body:
        if key != "payload":
            raise bad([key], "unknown field")
    payload = body.get("payload")
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise bad(["payload"], "must be an object")
    kind = payload.get("type")
    if kind != RESPONSES_API:
        raise bad(["payload", "type"], f"payload type {kind!r} is not supported; use {RESPONSES_API}")
    for key in payload:
        if key not in ("type", "input"):
            raise bad(["payload", key], "unknown field")
    value = payload.get("input")
    if not isinstance(value, str | dict):
        raise bad(["payload", "input"], "must be a string or a JSON object")
    return value


def relocated(exc: Invalid, trigger_key: str | None, *, dispatch: bool = False) -> ValidationError:
    """A domain ``Invalid`` with its locations on Foundry's field names and its messages kept word
    for word: ``trigger.cron_expression`` -> ``triggers.<key>.cron_expression``, ``actions.0.x`` ->
    ``action.x`` (``payload.input`` for a dispatch override)."""
    errors = [
        {"loc": foundry_loc(e["loc"], trigger_key, dispatch=dispatch), "msg": e["msg"]} for e in exc.errors
    ]
    if not errors:
        return ValidationError(str(exc))
    first = errors[0]
    return ValidationError(f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}", errors)


def foundry_loc(loc: list[Any], trigger_key: str | None, *, dispatch: bool = False) -> list[Any]:
    if dispatch:
        return ["payload", "input"]
    if loc[:1] == ["trigger"]:
        return ["triggers", trigger_key or "trigger", *loc[1:]]
    if loc[:1] == ["actions"]:
        rest = [("conversation" if part == "thread_id" else part) for part in loc[2:]]
        return ["action", *rest]
    return list(loc)


# --- Routines -> Foundry ----------------------------------------------------------------------------


def unix(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def foundry_routine(routine: Routine) -> dict[str, Any]:
    """A routine as Foundry's ``Routine``. Its trigger is keyed by its type (Routines does not keep
    Foundry's trigger names); a routine of several steps shows its first."""
    trigger = routine.trigger
    rendered: dict[str, Any]
    if isinstance(trigger, ScheduleTrigger):
        rendered = {
            "type": "schedule",
            "cron_expression": trigger.cron_expression,
            "time_zone": trigger.time_zone,
        }
    elif isinstance(trigger, TimerTrigger):
        rendered = {"type": "timer", "at": unix(trigger.at)}
    else:  # a trigger kind Foundry has no model for: as /api/routines shows it
        rendered = trigger.model_dump(mode="json")
    return {
        "id": routine.id,
        "name": routine.name,
        "description": routine.description,
        "enabled": routine.state is RoutineState.enabled,
        "triggers": {rendered["type"]: rendered},
        "action": foundry_action(routine.actions[0]),
        "created_at": unix(routine.created_at),
        "updated_at": unix(routine.updated_at),
    }


def foundry_action(action: Any) -> dict[str, Any]:
    agent = getattr(action, "agent_name", None) or getattr(action, "agent_id", None)
    out: dict[str, Any] = {"type": RESPONSES_API, "agent_name": agent}
    if hasattr(action, "input"):
        out["input"] = action.input
    if isinstance(action, ResponseAction) and action.thread_id:
        out["conversation"] = action.thread_id
    return out


def foundry_run(run: Run) -> dict[str, Any]:
    """A run as Foundry's ``RoutineRun``; only runs a schedule or timer made have a
    ``trigger_type`` and a ``scheduled_fire_at``."""
    source = run.trigger.value
    fired_by_trigger = source in ("schedule", "timer")
    conversation = response = None
    for result in run.actions:  # the latest step that has them
        conversation = result.thread_id or conversation
        response = result.agent_run_id or response
    error = run.error_message or next((a.error_message for a in run.actions if a.error_message), None)
    return {
        "id": run.id,
        "status": run.status.value,
        "phase": _PHASES.get(run.status.value, "dispatching"),
        "trigger_type": source if fired_by_trigger else None,
        "trigger_name": source if fired_by_trigger else None,  # the key reads show the trigger under
        "attempt_source": _ATTEMPT_SOURCES.get(source),
        "action_type": RESPONSES_API,
        "scheduled_fire_at": unix(run.scheduled_for) if fired_by_trigger else None,
        "triggered_at": unix(run.scheduled_for),
        "started_at": unix(run.started_at),
        "ended_at": unix(run.ended_at),
        "dispatch_id": run.id if source == "manual" else None,
        "conversation_id": conversation,
        "response_id": response,
        "error_type": None,
        "error_message": error,
        "error_status_code": None,
    }
