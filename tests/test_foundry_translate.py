"""The Foundry <-> Routines translation (``routines.foundry_translate``), both ways, as tables.

The Foundry side is checked against the SDK's own models: what the translation renders must read
back through ``azure.ai.projects.models`` with the values it was given.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from azure.ai.projects import models as foundry

from routines import foundry_translate as translate
from routines.errors import Invalid, ValidationError
from routines.models import ActionResult, ResponseAction, Routine, Run, RunStatus, RunTrigger
from tests.helpers import make_routine

T0 = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
T0_UNIX = int(T0.timestamp())
RESPONSES = "invoke_agent_responses_api"


def routine(**fields: Any) -> Routine:
    data: dict[str, Any] = {
        "id": "rt_0f3c2a9d6b1e4c7a",
        "description": "Scan logs",
        "trigger": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "Europe/Paris"},
        "actions": [{"type": "invocation", "agent_name": "echo", "input": {"say": "hi"}}],
    }
    return make_routine(now=T0, **{**data, **fields})


# --- Foundry -> Routines -------------------------------------------------------------------------

SCHEDULE = {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "Europe/Paris"}
ACTION = {"type": RESPONSES, "agent_name": "echo", "input": {"say": "hi"}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"triggers": {"daily": SCHEDULE}, "action": ACTION},
            translate.RoutineRequest(
                trigger_key="daily",
                trigger=SCHEDULE,
                actions=[{"type": "invocation", "agent_name": "echo", "input": {"say": "hi"}}],
            ),
            id="schedule_invocation",
        ),
        pytest.param(
            {"triggers": {"once": {"type": "timer", "at": T0_UNIX}}, "action": {**ACTION, "input": "go"}},
            translate.RoutineRequest(
                trigger_key="once",
                trigger={"type": "timer", "at": "2026-11-30T06:00:00Z"},
                actions=[{"type": "invocation", "agent_name": "echo", "input": "go"}],
            ),
            id="timer_unix_seconds",
        ),
        pytest.param(
            {"action": {**ACTION, "conversation": "conv_1"}, "description": "d", "enabled": False},
            translate.RoutineRequest(
                actions=[
                    {"type": "response", "agent_name": "echo", "input": {"say": "hi"}, "thread_id": "conv_1"}
                ],
                description="d",
                enabled=False,
            ),
            id="conversation_makes_a_response_step",
        ),
        pytest.param(
            {"enabled": True, "authorization": {"identity": "agent"}},
            translate.RoutineRequest(enabled=True),
            id="state_only_agent_identity",
        ),
        pytest.param(
            {"name": "daily-scan", "id": "rt_x", "created_at": 1, "updated_at": 2, "enabled": True},
            translate.RoutineRequest(enabled=True),
            id="a_routine_read_and_sent_back",
        ),
    ],
)
def test_routine_request_reads_foundry_bodies(
    body: dict[str, Any], expected: translate.RoutineRequest
) -> None:
    assert translate.routine_request("daily-scan", body) == expected


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({"triggers": {"a": SCHEDULE, "b": SCHEDULE}}, "triggers", id="two_triggers"),
        pytest.param({"triggers": {}}, "triggers", id="no_trigger"),
        pytest.param(
            {"triggers": {"gh": {"type": "github_issue", "owner": "o"}}}, "triggers.gh.type", id="github"
        ),
        pytest.param(
            {"triggers": {"c": {"type": "custom", "provider": "p"}}}, "triggers.c.type", id="custom"
        ),
        pytest.param({"triggers": {"x": {"type": "cron"}}}, "triggers.x.type", id="unknown_trigger_type"),
        pytest.param(
            {"triggers": {"t": {"type": "timer", "at": 10**20}}}, "triggers.t.at", id="timer_overflow"
        ),
        pytest.param(
            {"action": {**ACTION, "type": "invoke_agent_invocations_api"}}, "action.type", id="invocations"
        ),
        pytest.param(
            {"action": {**ACTION, "agent_endpoint_id": "e1"}}, "action.agent_endpoint_id", id="endpoint_id"
        ),
        pytest.param(
            {"action": {**ACTION, "agent_id": "asst_1"}}, "action.agent_id", id="unknown_action_field"
        ),
        pytest.param(
            {"authorization": {"identity": "creator"}}, "authorization.identity", id="creator_identity"
        ),
        pytest.param({"enabled": "yes"}, "enabled", id="enabled_not_bool"),
        pytest.param({"name": "other"}, "name", id="name_differs_from_route"),
        pytest.param({"retry_policy": {}}, "retry_policy", id="unknown_field"),
    ],
)
def test_routine_request_rejects_what_routines_does_not_take(body: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as caught:
        translate.routine_request("daily-scan", body)
    assert str(caught.value).startswith(f"{where}: ")
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors] == [where]


def test_create_fields_need_a_trigger_and_an_action_and_default_to_enabled() -> None:
    request = translate.routine_request("daily-scan", {"triggers": {"daily": SCHEDULE}, "action": ACTION})
    assert request.create_fields("daily-scan") == {
        "name": "daily-scan",
        "description": "",
        "trigger": SCHEDULE,
        "actions": [{"type": "invocation", "agent_name": "echo", "input": {"say": "hi"}}],
        "state": "enabled",
    }
    for body, where in (({"action": ACTION}, "triggers"), ({"triggers": {"d": SCHEDULE}}, "action")):
        with pytest.raises(ValidationError, match=f"^{where}: "):
            translate.routine_request("daily-scan", body).create_fields("daily-scan")


def test_patch_replaces_the_trigger_whole_and_leaves_out_what_the_body_left_out() -> None:
    request = translate.routine_request(
        "daily-scan", {"triggers": {"d": {"type": "schedule", "cron_expression": "0 7 * * *"}}}
    )
    # time_zone: null removes it in the merge patch, so it returns to its default instead of
    # keeping Europe/Paris; description and actions are not in the patch at all.
    assert request.patch(routine()) == {
        "trigger": {"type": "schedule", "cron_expression": "0 7 * * *", "time_zone": None}
    }
    assert translate.routine_request("daily-scan", {"enabled": False}).patch(routine()) == {}
    timer = {"type": "timer", "at": "2030-01-01T00:00:00Z"}
    assert translate.routine_request("daily-scan", {"triggers": {"t": timer}}).patch(routine()) == {
        "trigger": timer  # another kind: sent as it is, the domain replaces the trigger whole
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(None, None, id="no_body"),
        pytest.param({}, None, id="no_payload"),
        pytest.param({"payload": {"type": RESPONSES, "input": "now"}}, "now", id="text"),
        pytest.param({"payload": {"type": RESPONSES, "input": {"a": 1}}}, {"a": 1}, id="object"),
    ],
)
def test_dispatch_override(body: Any, expected: Any) -> None:
    assert translate.dispatch_override(body) == expected


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param(
            {"payload": {"type": "invoke_agent_invocations_api", "input": {}}},
            "payload.type",
            id="invocations",
        ),
        pytest.param({"payload": {"type": RESPONSES, "input": [1, 2]}}, "payload.input", id="array_input"),
        pytest.param(
            {"payload": {"type": RESPONSES, "input": "x", "extra": 1}}, "payload.extra", id="unknown"
        ),
        pytest.param({"input": "x"}, "input", id="our_shape_not_foundrys"),
    ],
)
def test_dispatch_override_rejects(body: Any, where: str) -> None:
    with pytest.raises(ValidationError, match=f"^{where}: "):
        translate.dispatch_override(body)


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (["trigger", "cron_expression"], ["triggers", "daily", "cron_expression"]),
        (["trigger"], ["triggers", "daily"]),
        (["actions", 0, "input"], ["action", "input"]),
        (["actions", 0, "thread_id"], ["action", "conversation"]),
        (["actions", 0], ["action"]),
        (["name"], ["name"]),
    ],
)
def test_domain_error_locations_move_onto_foundry_fields(loc: list[Any], expected: list[Any]) -> None:
    exc = Invalid("x", [{"loc": loc, "msg": "the domain's words"}])
    moved = translate.relocated(exc, "daily")
    assert moved.errors == [{"loc": expected, "msg": "the domain's words"}]
    assert str(moved) == f"{'.'.join(map(str, expected))}: the domain's words"


# --- Routines -> Foundry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "triggers", "action", "enabled"),
    [
        pytest.param(
            {},
            {"schedule": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "Europe/Paris"}},
            {"type": RESPONSES, "agent_name": "echo", "input": {"say": "hi"}},
            True,
            id="schedule",
        ),
        pytest.param(
            {"trigger": {"type": "timer", "at": "2026-12-31T23:59:00Z"}, "state": "completed"},
            {"timer": {"type": "timer", "at": int(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp())}},
            {"type": RESPONSES, "agent_name": "echo", "input": {"say": "hi"}},
            False,
            id="completed_timer_is_not_enabled",
        ),
        pytest.param(
            {
                "actions": [
                    {"type": "response", "agent_id": "asst_1", "input": "go", "thread_id": "conv_9"},
                    {"type": "invocation", "agent_name": "second", "input": "x"},
                ],
                "state": "disabled",
            },
            {"schedule": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "Europe/Paris"}},
            {"type": RESPONSES, "agent_name": "asst_1", "input": "go", "conversation": "conv_9"},
            False,
            id="first_of_several_steps_with_its_conversation",
        ),
    ],
)
def test_foundry_routine_reads_back_through_the_sdk_model(
    fields: dict[str, Any], triggers: dict[str, Any], action: dict[str, Any], enabled: bool
) -> None:
    rendered = translate.foundry_routine(routine(**fields))
    assert rendered["triggers"] == triggers and rendered["action"] == action
    assert rendered["enabled"] is enabled and rendered["created_at"] == T0_UNIX
    model = foundry.Routine(rendered)
    assert model.name == "daily-scan" and model.enabled is enabled and model.created_at == T0
    assert model.triggers is not None
    (trigger,) = model.triggers.values()
    assert isinstance(trigger, foundry.ScheduleRoutineTrigger | foundry.TimerRoutineTrigger)
    assert isinstance(model.action, foundry.InvokeAgentResponsesApiRoutineAction)


def test_foundry_routine_then_back_is_the_same_routine() -> None:
    original = routine(actions=[{"type": "response", "agent_name": "echo", "input": "go", "thread_id": "c1"}])
    rendered = translate.foundry_routine(original)
    request = translate.routine_request(original.name, rendered)
    fields = request.create_fields(original.name)
    assert fields["trigger"] == original.trigger.model_dump(mode="json")
    assert [ResponseAction.model_validate(a) for a in fields["actions"]] == original.actions
    assert (fields["description"], fields["state"]) == (original.description, "enabled")


def run(**fields: Any) -> Run:
    data: dict[str, Any] = {
        "id": "run_8203_abc",
        "routine_id": "rt_0f3c2a9d6b1e4c7a",
        "trigger": "schedule",
        "scheduled_for": T0,
        "status": "succeeded",
        "idempotency_key": "k",
    }
    return Run.model_validate({**data, **fields})


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("queued", "queued"),
        ("retrying", "queued"),
        ("running", "dispatching"),
        ("succeeded", "completed"),
        ("skipped", "completed"),
        ("failed", "failed"),
        ("cancelled", "failed"),
        ("missed", "failed"),
    ],
)
def test_run_phase(status: str, phase: str) -> None:
    assert translate.foundry_run(run(status=status))["phase"] == phase


def test_every_run_status_has_a_phase() -> None:
    assert {s.value for s in RunStatus} <= set(translate._PHASES)


@pytest.mark.parametrize(
    ("trigger", "source", "trigger_type", "scheduled"),
    [
        (RunTrigger.schedule, "schedule_delivery", "schedule", T0_UNIX),
        (RunTrigger.timer, "timer_delivery", "timer", T0_UNIX),
        (RunTrigger.manual, "manual_dispatch", None, None),
    ],
)
def test_run_source(
    trigger: RunTrigger, source: str, trigger_type: str | None, scheduled: int | None
) -> None:
    rendered = translate.foundry_run(run(trigger=trigger))
    assert (rendered["attempt_source"], rendered["trigger_type"]) == (source, trigger_type)
    assert rendered["trigger_name"] == trigger_type  # the key foundry_routine gives the trigger
    assert rendered["scheduled_fire_at"] == scheduled and rendered["triggered_at"] == T0_UNIX
    assert rendered["dispatch_id"] == ("run_8203_abc" if trigger is RunTrigger.manual else None)


def test_run_reads_back_through_the_sdk_model() -> None:
    failed = run(
        status="failed",
        started_at=T0,
        ended_at=datetime(2026, 11, 30, 6, 1, 5, tzinfo=UTC),
        actions=[
            ActionResult(index=0, status=RunStatus.succeeded, agent_run_id="resp_1", thread_id="conv_1"),
            ActionResult(
                index=1, status=RunStatus.failed, thread_id="conv_2", error_message="agent said 400"
            ),
        ],
    )
    model = foundry.RoutineRun(translate.foundry_run(failed))
    assert (model.id, model.status, model.phase) == ("run_8203_abc", "failed", "failed")
    assert model.started_at == T0 and model.ended_at == datetime(2026, 11, 30, 6, 1, 5, tzinfo=UTC)
    assert model.scheduled_fire_at == T0 and model.trigger_type == "schedule"
    # The latest step that has them; the failing step's message when the run has none of its own.
    assert (model.conversation_id, model.response_id) == ("conv_2", "resp_1")
    assert model.error_message == "agent said 400"
