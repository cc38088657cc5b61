"""The client's pure parts: models to and from JSON, routine files, and apply's comparison."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from routines_client import (
    Routine,
    RoutineApprovalStep,
    RoutineInvocationAction,
    RoutineResponseAction,
    RoutineRetryPolicy,
    RoutineRun,
    RoutineScheduleTrigger,
    RoutineTimerTrigger,
    RoutineWebhookTrigger,
)
from routines_client._models import format_time
from routines_client.cli._apply import differences
from routines_client.cli._files import InputError, check_routine, load

AT = datetime(2026, 9, 30, 23, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(RoutineTimerTrigger(time="2026-09-30T23:59:00Z"), id="time_text"),
        pytest.param(RoutineTimerTrigger(at="2026-10-01T01:59:00+02:00"), id="at_text_with_offset"),
        pytest.param(RoutineTimerTrigger(at=AT), id="at_datetime"),
        pytest.param(
            RoutineTimerTrigger(time=AT.astimezone(timezone(timedelta(hours=-4)))), id="time_other_zone"
        ),
    ],
)
def test_timer_trigger_takes_time_or_at(trigger: RoutineTimerTrigger) -> None:
    assert trigger.at == AT
    assert trigger.to_dict() == {"type": "timer", "at": "2026-09-30T23:59:00Z"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({}, TypeError, id="neither"),
        pytest.param({"at": AT, "time": AT}, TypeError, id="both"),
        pytest.param({"at": "2026-09-30T23:59:00"}, ValueError, id="no_offset"),
        pytest.param({"time": datetime(2026, 9, 30)}, ValueError, id="naive_datetime"),
    ],
)
def test_timer_trigger_refuses(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RoutineTimerTrigger(**kwargs)


def test_naive_datetimes_are_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="time zone"):
        format_time(datetime(2026, 1, 1))


def test_a_routine_with_every_kind_of_step_round_trips_in_the_specs_shapes() -> None:
    routine = Routine(
        name="triage",
        trigger=RoutineWebhookTrigger(signature="github", secret_setting="HOOK_SECRET", debounce_seconds=5),
        actions=[
            RoutineInvocationAction(
                id="triage", agent_name="triager", agent_version="2", input="{{event.issue}}"
            ),
            RoutineApprovalStep(id="review", after=["triage"], timeout_seconds=3600, on_timeout="reject"),
            RoutineResponseAction(
                id="fix",
                after=["review"],
                agent_id="asst_1",
                thread_id="thread_1",
                input={"plan": "{{steps.triage.output}}"},
                when={"step": "triage", "path": "severity", "op": "eq", "value": "high"},
            ),
        ],
        retry_policy=RoutineRetryPolicy(max_attempts=6, backoff="exponential"),
    )
    body = routine.to_dict()
    assert body == {
        "name": "triage",
        "trigger": {
            "type": "webhook",
            "secret_setting": "HOOK_SECRET",
            "signature": "github",
            "debounce_seconds": 5,
        },
        "actions": [
            {
                "type": "invocation",
                "id": "triage",
                "agent_name": "triager",
                "agent_version": "2",
                "input": "{{event.issue}}",
            },
            {
                "type": "approval",
                "id": "review",
                "after": ["triage"],
                "timeout_seconds": 3600,
                "on_timeout": "reject",
            },
            {
                "type": "response",
                "id": "fix",
                "after": ["review"],
                "when": {"step": "triage", "path": "severity", "op": "eq", "value": "high"},
                "agent_id": "asst_1",
                "input": {"plan": "{{steps.triage.output}}"},
                "thread_id": "thread_1",
            },
        ],
        "retry_policy": {"max_attempts": 6, "backoff": "exponential"},
    }
    assert Routine.from_dict(body) == routine


def test_server_fields_are_read_but_never_sent_and_unknown_ones_are_kept() -> None:
    data = {
        "id": "rt_0f3c2a9d6b1e4c7a",
        "name": "scan",
        "trigger": {"type": "lunar", "phase": "full"},  # a trigger type this client does not know
        "actions": [{"type": "invocation", "agent_id": "echo", "input": "x"}],
        "state": "enabled",
        "next_fire_at": "2026-11-30T06:00:00Z",
        "created_at": "2026-11-29T20:00:00.250Z",
        "version": 3,
        "shiny_new_field": [1, 2],
    }
    routine = Routine.from_dict(data)
    assert routine.trigger == {"type": "lunar", "phase": "full"}
    assert routine.next_fire_at == datetime(2026, 11, 30, 6, tzinfo=UTC)
    assert routine.additional_properties == {"shiny_new_field": [1, 2]}
    assert (
        routine.to_dict()["shiny_new_field"] == [1, 2]
        and routine.to_dict()["created_at"] == data["created_at"]
    )
    assert routine.update_body() == {
        "name": "scan",
        "trigger": {"type": "lunar", "phase": "full"},
        "actions": [{"type": "invocation", "agent_id": "echo", "input": "x"}],
    }


def test_runs_read_their_steps_and_say_when_they_are_final() -> None:
    run = RoutineRun.from_dict(
        {
            "id": "run_1",
            "routine_id": "rt_1",
            "status": "waiting",
            "actions": [{"index": 0, "id": "review", "status": "waiting", "decided_at": None}],
            "scheduled_for": "2026-11-30T06:00:00Z",
        }
    )
    assert (
        not run.is_terminal
        and run.actions[0].id == "review"
        and run.scheduled_for == datetime(2026, 11, 30, 6, tzinfo=UTC)
    )
    assert RoutineRun(id="r", routine_id="rt", status="skipped").is_terminal


VALID = {
    "name": "scan",
    "trigger": {"type": "schedule", "cron_expression": "0 6 * * *"},
    "actions": [{"type": "invocation", "agent_id": "echo", "input": "x"}],
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param({}, None, id="valid"),
        pytest.param({"name": "Scan"}, "name:", id="upper_case_name"),
        pytest.param({"name": None}, "name:", id="no_name"),
        pytest.param({"colour": "red"}, "colour: unknown field", id="unknown_field"),
        pytest.param({"state": "completed"}, "state:", id="completed_state"),
        pytest.param({"trigger": "0 6 * * *"}, "trigger:", id="trigger_not_a_mapping"),
        pytest.param({"actions": []}, "actions: required", id="no_actions"),
        pytest.param({"actions": [{"type": "invocation", "input": "x"}]}, "exactly one of", id="no_agent"),
        pytest.param(
            {"actions": [{"type": "invocation", "agent_id": "a"}]}, "actions.0.input", id="no_input"
        ),
        pytest.param({"actions": [{"type": "approval", "id": "ok"}]}, None, id="approval_needs_no_agent"),
    ],
)
def test_check_routine(change: dict[str, Any], problem: str | None) -> None:
    found = check_routine({k: v for k, v in {**VALID, **change}.items() if v is not None})
    assert (found == []) if problem is None else any(problem in p for p in found), found


def test_load_reads_yaml_documents_lists_and_times(tmp_path: Path) -> None:
    (tmp_path / "two.yaml").write_text(
        "name: a\ntrigger: {type: timer, at: 2026-09-30T23:59:00Z}\n"
        "actions: [{type: invocation, agent_id: e, input: x}]\n"
        "---\n"
        "- name: b\n  trigger: {type: schedule, cron_expression: '0 6 * * *'}\n"
        "  actions: [{type: invocation, agent_id: e, input: x}]\n"
    )
    (tmp_path / "notes.txt").write_text("not a routine")
    docs = load([str(tmp_path)])
    assert [(d.name, d.source) for d in docs] == [
        ("a", f"{tmp_path}/two.yaml:1"),
        ("b", f"{tmp_path}/two.yaml:5"),
    ]
    assert docs[0].body["trigger"]["at"] == "2026-09-30T23:59:00Z"  # YAML's timestamp back to RFC 3339


def test_load_names_the_file_and_line_of_bad_yaml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: a\ntrigger: [\n")
    (tmp_path / "bad.json").write_text('{"name": "a",\n "x": }')
    with pytest.raises(InputError) as failed:
        load([str(tmp_path)])
    assert [p.split(": invalid")[0] for p in failed.value.problems] == [
        f"{tmp_path}/bad.json:2:7",
        f"{tmp_path}/bad.yaml:3:1",
    ]
    with pytest.raises(InputError, match="no such file"):
        load([str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    ("wanted", "actual", "diffs"),
    [
        pytest.param({"a": 1}, {"a": 1, "b": 2}, [], id="keys_left_out_are_not_managed"),
        pytest.param(
            {"t": {"cron": "x"}}, {"t": {"cron": "y", "tz": "UTC"}}, [("t.cron", "y", "x")], id="nested"
        ),
        pytest.param({"l": [1, 2]}, {"l": [1]}, [("l", [1], [1, 2])], id="lists_of_other_length_whole"),
        pytest.param({"l": [{"k": 1}]}, {"l": [{"k": 2, "d": 0}]}, [("l.0.k", 2, 1)], id="list_items"),
        pytest.param(
            {"at": "2026-10-01T01:59:00+02:00"}, {"at": "2026-09-30T23:59:00Z"}, [], id="same_instant"
        ),
        pytest.param({"j": True}, {"j": 1}, [("j", 1, True)], id="true_is_not_one"),
        pytest.param(
            {"d": "20260101"}, {"d": "2026-01-01"}, [("d", "2026-01-01", "20260101")], id="text_not_time"
        ),
    ],
)
def test_differences(wanted: Any, actual: Any, diffs: list[tuple[str, Any, Any]]) -> None:
    assert differences(wanted, actual) == diffs


def test_schedule_trigger_leaves_the_time_zone_to_the_server() -> None:
    assert RoutineScheduleTrigger(cron_expression="0 6 * * *").to_dict() == {
        "type": "schedule",
        "cron_expression": "0 6 * * *",
    }
