"""The validation rules of docs/api.md on the models themselves, as tables, and the JSON they
produce (timestamps with ``Z``, optional fields left out)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest

from routines.models import (
    MAX_INPUT_BYTES,
    MAX_INPUT_DEPTH,
    ActionResult,
    InvocationAction,
    ResponseAction,
    RetryPolicy,
    Routine,
    RoutineCreate,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    ScheduleTrigger,
    StepProgress,
    StepStatus,
    TimerTrigger,
    idempotency_key,
    manual_run_id,
    new_routine_id,
    run_id_for,
    scheduled_run_id,
    utc_text,
)
from tests.helpers import make_routine

NOW = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


def create_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "daily-scan",
        "trigger": {"type": "schedule", "cron_expression": "0 6 * * *"},
        "actions": [{"type": "invocation", "agent_id": "asst_abc123", "input": "go"}],
    }
    body.update(changes)
    return body


def nested(depth: int) -> dict[str, Any]:
    """An object whose objects nest ``depth`` levels deep."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def error_locs(exc: pydantic.ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("a", id="one-letter"),
        pytest.param("7", id="one-digit"),
        pytest.param("daily-compliance-scan", id="hyphens"),
        pytest.param("0-leading-digit", id="leading-digit"),
        pytest.param("trailing-", id="trailing-hyphen"),
        pytest.param("a" * 63, id="63-chars"),
        pytest.param("a--b", id="double-hyphen"),
    ],
)
def test_valid_names(name: str) -> None:
    assert RoutineCreate.model_validate(create_body(name=name)).name == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 64, id="64-chars"),
        pytest.param("Daily", id="uppercase"),
        pytest.param("-daily", id="leading-hyphen"),
        pytest.param("daily_scan", id="underscore"),
        pytest.param("daily scan", id="space"),
        pytest.param("daily.scan", id="dot"),
        pytest.param("caf\u00e9", id="non-ascii"),
        pytest.param("daily\n", id="trailing-newline"),
        pytest.param("a/b", id="slash"),
        pytest.param("'or'1'eq'1", id="odata"),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(name=name))
    assert error_locs(caught.value) == [("name",)]


# --- retry policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param({}, {"max_attempts": 4, "delays_seconds": [60, 300, 900]}, id="default"),
        pytest.param(
            {"max_attempts": 3, "delays_seconds": [5, 10]},
            {"max_attempts": 3, "delays_seconds": [5, 10]},
            id="fixed",
        ),
        pytest.param(
            {"max_attempts": 1, "delays_seconds": []},
            {"max_attempts": 1, "delays_seconds": []},
            id="no-retries",
        ),
        pytest.param(
            {"backoff": "fixed", "delays_seconds": [1]},
            {"max_attempts": 4, "delays_seconds": [1], "backoff": "fixed"},
            id="explicit-fixed",
        ),
        pytest.param(
            {"max_attempts": 6, "backoff": "exponential"},
            {
                "max_attempts": 6,
                "backoff": "exponential",
                "initial_delay_seconds": 30,
                "max_delay_seconds": 3600,
                "jitter": True,
            },
            id="exponential-defaults",
        ),
        pytest.param(
            {
                "max_attempts": 6,
                "backoff": "exponential",
                "initial_delay_seconds": 5,
                "max_delay_seconds": 60,
                "jitter": False,
                "max_age_seconds": 600,
            },
            {
                "max_attempts": 6,
                "backoff": "exponential",
                "initial_delay_seconds": 5,
                "max_delay_seconds": 60,
                "jitter": False,
                "max_age_seconds": 600,
            },
            id="exponential-full",
        ),
        pytest.param(
            {"max_age_seconds": 3600},
            {"max_attempts": 4, "delays_seconds": [60, 300, 900], "max_age_seconds": 3600},
            id="fixed-max-age",
        ),
    ],
)
def test_valid_retry_policies(given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert RetryPolicy.model_validate(given).model_dump(mode="json") == expected


@pytest.mark.parametrize(
    "given",
    [
        pytest.param({"backoff": "exponential", "delays_seconds": [60]}, id="exponential-with-delays"),
        pytest.param({"initial_delay_seconds": 30}, id="initial-delay-without-exponential"),
        pytest.param({"max_delay_seconds": 30}, id="max-delay-without-exponential"),
        pytest.param({"jitter": True}, id="jitter-without-exponential"),
        pytest.param({"backoff": "fixed", "jitter": False}, id="jitter-with-fixed"),
        pytest.param({"backoff": "linear"}, id="unknown-backoff"),
        pytest.param({"max_attempts": 0}, id="max-attempts-0"),
        pytest.param({"max_attempts": 51}, id="max-attempts-51"),
        pytest.param({"max_attempts": 3, "delays_seconds": []}, id="retries-without-delays"),
        pytest.param({"delays_seconds": [-1]}, id="negative-delay"),
        pytest.param({"delays_seconds": [8 * 86400]}, id="delay-over-a-week"),
        pytest.param({"max_age_seconds": 0}, id="max-age-0"),
        pytest.param({"backoff": "exponential", "initial_delay_seconds": -5}, id="negative-initial"),
        pytest.param({"backoff": "exponential", "max_delay_seconds": 0}, id="max-delay-0"),
        pytest.param({"retries": 3}, id="unknown-field"),
    ],
)
def test_invalid_retry_policies(given: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy.model_validate(given)
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(retry_policy=given))
    assert all(loc[0] == "retry_policy" for loc in error_locs(caught.value))


# --- overlap, windows, timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["skip", "buffer_one", "allow_all"])
def test_valid_overlap_policies(value: str) -> None:
    assert RoutineCreate.model_validate(create_body(overlap_policy=value)).overlap_policy.value == value


@pytest.mark.parametrize("value", ["SKIP", "buffer", "none", "", None, 1])
def test_invalid_overlap_policies(value: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(overlap_policy=value))
    assert error_locs(caught.value) == [("overlap_policy",)]


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        pytest.param("timeout_seconds", 1, True, id="timeout-1"),
        pytest.param("timeout_seconds", 86400, True, id="timeout-day"),
        pytest.param("timeout_seconds", 0, False, id="timeout-0"),
        pytest.param("timeout_seconds", 86401, False, id="timeout-over-a-day"),
        pytest.param("timeout_seconds", 1.5, False, id="timeout-fraction"),
        pytest.param("catchup_window_seconds", 0, True, id="catchup-0"),
        pytest.param("catchup_window_seconds", 30 * 86400, True, id="catchup-30-days"),
        pytest.param("catchup_window_seconds", -1, False, id="catchup-negative"),
        pytest.param("catchup_window_seconds", 30 * 86400 + 1, False, id="catchup-over-30-days"),
    ],
)
def test_window_and_timeout_bounds(field: str, value: Any, valid: bool) -> None:
    if valid:
        assert getattr(RoutineCreate.model_validate(create_body(**{field: value})), field) == value
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(**{field: value}))
    assert error_locs(caught.value) == [(field,)]


def test_defaults_are_filled() -> None:
    spec = RoutineCreate.model_validate(create_body())
    assert spec.model_dump(mode="json") == {
        "name": "daily-scan",
        "description": "",
        "trigger": {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "UTC"},
        "actions": [{"type": "invocation", "agent_id": "asst_abc123", "input": "go"}],
        "retry_policy": {"max_attempts": 4, "delays_seconds": [60, 300, 900]},
        "overlap_policy": "skip",
        "catchup_window_seconds": 3600,
        "timeout_seconds": 600,
        "concurrency": None,
        "rate_limit": None,
        "jitter_seconds": 0,
        "start_at": None,
        "end_at": None,
        "max_fires": None,
        "pause_after_failures": 0,
        "state": "enabled",
    }


@pytest.mark.parametrize(
    ("state", "valid"), [("enabled", True), ("disabled", True), ("completed", False), ("on", False)]
)
def test_create_state(state: str, valid: bool) -> None:
    if valid:
        assert RoutineCreate.model_validate(create_body(state=state)).state == RoutineState(state)
    else:
        with pytest.raises(pydantic.ValidationError):
            RoutineCreate.model_validate(create_body(state=state))


# --- actions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"agent_id": "asst_abc123"}, id="agent-id"),
        pytest.param({"agent_id": "my-http-agent"}, id="agent-id-http-name"),
        pytest.param({"agent_name": "weekly-summary"}, id="agent-name"),
        pytest.param({"agent_name": "weekly-summary", "agent_version": "3"}, id="agent-name-version"),
    ],
)
@pytest.mark.parametrize(("kind", "model"), [("invocation", InvocationAction), ("response", ResponseAction)])
def test_valid_agent_references(
    kind: str, model: type[InvocationAction | ResponseAction], fields: dict[str, str]
) -> None:
    action = model.model_validate({"type": kind, "input": "x", **fields})
    assert action.agent == fields.get("agent_id", fields.get("agent_name"))
    assert (action.agent_id, action.agent_name, action.agent_version) == (
        fields.get("agent_id"),
        fields.get("agent_name"),
        fields.get("agent_version"),
    )


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        pytest.param({}, (), id="neither"),
        pytest.param({"agent_id": "asst_1", "agent_name": "n"}, (), id="both"),
        pytest.param({"agent_id": "asst_1", "agent_version": "1"}, (), id="version-with-id"),
        pytest.param({"agent_version": "1"}, (), id="version-alone"),
        pytest.param({"agent_id": ""}, ("agent_id",), id="empty-id"),
        pytest.param({"agent_id": "asst 1"}, ("agent_id",), id="id-with-space"),
        pytest.param({"agent_id": "-asst"}, ("agent_id",), id="id-leading-hyphen"),
        pytest.param({"agent_id": "a/b"}, ("agent_id",), id="id-with-slash"),
        pytest.param({"agent_id": "a" * 129}, ("agent_id",), id="id-too-long"),
        pytest.param({"agent_name": "n", "agent_version": ""}, ("agent_version",), id="empty-version"),
        pytest.param({"agent_name": "n'or'1"}, ("agent_name",), id="name-with-quote"),
    ],
)
def test_invalid_agent_references(fields: dict[str, str], loc: tuple[str, ...]) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        InvocationAction.model_validate({"type": "invocation", "input": "x", **fields})
    assert loc in error_locs(caught.value)


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        pytest.param({}, True, id="no-thread"),
        pytest.param({"thread_id": "conv_abc"}, True, id="thread"),
        pytest.param({"thread_id": "t" * 128}, True, id="thread-128"),
        pytest.param({"thread_id": ""}, False, id="thread-empty"),
        pytest.param({"thread_id": "t" * 129}, False, id="thread-129"),
        pytest.param({"max_thread_messages": 2}, True, id="max-2"),
        pytest.param({"max_thread_messages": 100_000}, True, id="max-100000"),
        pytest.param({"max_thread_messages": 1}, False, id="max-1"),
        pytest.param({"max_thread_messages": 100_001}, False, id="max-100001"),
        pytest.param({"max_thread_messages": None}, False, id="max-null"),
    ],
)
def test_response_action_thread_fields(fields: dict[str, Any], valid: bool) -> None:
    data = {"type": "response", "agent_name": "weekly", "input": "x", **fields}
    if not valid:
        with pytest.raises(pydantic.ValidationError) as caught:
            ResponseAction.model_validate(data)
        assert error_locs(caught.value) == [(next(iter(fields)),)]
        return
    action = ResponseAction.model_validate(data)
    assert action.thread_id == fields.get("thread_id")
    assert action.max_thread_messages == fields.get("max_thread_messages", 200)


@pytest.mark.parametrize("field", ["thread_id", "max_thread_messages"])
def test_invocation_action_has_no_thread_fields(field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        InvocationAction.model_validate({"type": "invocation", "agent_id": "a", "input": "x", field: "t"})
    assert error_locs(caught.value) == [(field,)]


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        pytest.param("plain text", True, id="string"),
        pytest.param({"instructions": "x", "context": {"n": [1, 2]}}, True, id="object"),
        pytest.param("x" * (MAX_INPUT_BYTES - 2), True, id="string-at-limit"),
        pytest.param("x" * (MAX_INPUT_BYTES - 1), False, id="string-one-over"),
        pytest.param("\u00e9" * ((MAX_INPUT_BYTES - 2) // 2), True, id="utf8-at-limit"),
        pytest.param("\u00e9" * ((MAX_INPUT_BYTES - 2) // 2 + 1), False, id="utf8-one-over"),
        pytest.param({"k": "x" * MAX_INPUT_BYTES}, False, id="object-over"),
        pytest.param("", True, id="empty-string"),
        pytest.param(["a"], False, id="list"),
        pytest.param(5, False, id="number"),
        pytest.param(None, False, id="null"),
        pytest.param(nested(MAX_INPUT_DEPTH), True, id="nested-at-limit"),
        pytest.param(nested(MAX_INPUT_DEPTH + 1), False, id="nested-over-limit"),
        pytest.param({"a": [[{"b": [1]}]]}, True, id="nested-lists"),
        pytest.param(nested(900), False, id="nested-900"),
    ],
)
def test_action_input(value: Any, valid: bool) -> None:
    data = {"type": "invocation", "agent_id": "a", "input": value}
    if valid:
        assert InvocationAction.model_validate(data).input == value
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        InvocationAction.model_validate(data)
    assert all(loc[0] == "input" for loc in error_locs(caught.value))


@pytest.mark.parametrize(("count", "valid"), [(0, False), (1, True), (20, True), (21, False)])  # at most 20
def test_action_count(count: int, valid: bool) -> None:
    actions = [{"type": "invocation", "agent_id": f"a{i}", "input": "x"} for i in range(count)]
    if valid:
        assert len(RoutineCreate.model_validate(create_body(actions=actions)).actions) == count
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(actions=actions))
    assert error_locs(caught.value) == [("actions",)]


# --- triggers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "loc"),
    [
        pytest.param({"type": "schedule", "cron_expression": "0 6 * *"}, "cron_expression", id="four-fields"),
        pytest.param({"type": "schedule", "cron_expression": "0 25 * * *"}, "cron_expression", id="hour-25"),
        pytest.param({"type": "schedule", "cron_expression": "0 0 30 2 *"}, "cron_expression", id="never"),
        pytest.param({"type": "schedule", "cron_expression": ""}, "cron_expression", id="empty"),
        pytest.param({"type": "schedule", "cron_expression": "@reboot"}, "cron_expression", id="reboot"),
        pytest.param(
            {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": "Mars/Olympus"},
            "time_zone",
            id="zone",
        ),
        pytest.param(
            {"type": "schedule", "cron_expression": "0 6 * * *", "time_zone": ""},
            "time_zone",
            id="zone-empty",
        ),
        pytest.param({"type": "timer", "at": "2026-12-01T00:00:00"}, "at", id="timer-naive"),
        pytest.param({"type": "timer", "at": "not a time"}, "at", id="timer-text"),
        pytest.param({"type": "timer"}, "at", id="timer-missing-at"),
        pytest.param(
            {"type": "timer", "at": "9999-12-31T23:00:00-05:00"}, "at", id="timer-beyond-year-9999-utc"
        ),
    ],
)
def test_invalid_triggers(trigger: dict[str, Any], loc: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(create_body(trigger=trigger))
    assert ("trigger", trigger["type"], loc) in error_locs(caught.value)


@pytest.mark.parametrize(
    ("expression", "minimum", "valid"),
    [
        pytest.param("* * * * *", 60, True, id="every-minute-at-60"),
        pytest.param("*/30 * * * * *", 60, False, id="30s-at-60"),
        pytest.param("*/30 * * * * *", 30, True, id="30s-at-30"),
        pytest.param("* * * * * *", 1, True, id="every-second-at-1"),
        pytest.param("*/5 * * * *", 600, False, id="5min-at-600"),
        pytest.param("0,1 * * * *", 120, False, id="uneven-list"),
    ],
)
def test_min_interval_comes_from_the_context(expression: str, minimum: int, valid: bool) -> None:
    data = create_body(trigger={"type": "schedule", "cron_expression": expression})
    context = {"min_interval_seconds": minimum, "now": NOW}
    if valid:
        RoutineCreate.model_validate(data, context=context)
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(data, context=context)
    assert error_locs(caught.value) == [("trigger", "schedule", "cron_expression")]
    RoutineCreate.model_validate(data)  # without a context (stored routines) it is not re-checked


@pytest.mark.parametrize(
    ("at", "valid"),
    [
        pytest.param(NOW + timedelta(seconds=1), True, id="one-second-ahead"),
        pytest.param(NOW + timedelta(seconds=1, milliseconds=500), True, id="fraction-past-a-second-ahead"),
        pytest.param(NOW + timedelta(milliseconds=500), False, id="fires-at-now-when-truncated"),
        pytest.param(NOW, False, id="now"),
        pytest.param(NOW - timedelta(days=1), False, id="past"),
    ],
)
def test_timer_must_lie_in_the_future(at: datetime, valid: bool) -> None:
    data = create_body(trigger={"type": "timer", "at": at.isoformat()})
    if valid:
        RoutineCreate.model_validate(data, context={"now": NOW})
        return
    with pytest.raises(pydantic.ValidationError) as caught:
        RoutineCreate.model_validate(data, context={"now": NOW})
    assert error_locs(caught.value) == [("trigger", "timer", "at")]


def test_timer_is_normalised_to_utc() -> None:
    trigger = TimerTrigger.model_validate({"type": "timer", "at": "2026-12-01T08:00:00+02:00"})
    assert trigger.at == datetime(2026, 12, 1, 6, tzinfo=UTC)
    assert trigger.at.utcoffset() == timedelta(0)
    assert trigger.model_dump(mode="json") == {"type": "timer", "at": "2026-12-01T06:00:00Z"}


def test_schedule_time_zone_defaults_to_utc() -> None:
    assert (
        ScheduleTrigger.model_validate({"type": "schedule", "cron_expression": "0 6 * * *"}).time_zone
        == "UTC"
    )


# --- JSON output shape ----------------------------------------------------------------------------------


def a_routine(**changes: Any) -> Routine:
    data: dict[str, Any] = {
        **create_body(),
        "id": "rt_0f3c2a9d6b1e4c7a",
        "next_fire_at": datetime(2026, 11, 30, 7, 0, tzinfo=timezone(timedelta(hours=1))),
        "created_at": NOW,
        "updated_at": NOW + timedelta(milliseconds=250),
    }
    return make_routine(**{**data, **changes})


def test_routine_timestamps_are_rfc3339_utc_with_z() -> None:
    body = a_routine().public()
    assert body["next_fire_at"] == "2026-11-30T06:00:00Z"
    assert body["created_at"] == "2026-11-29T20:00:00Z"
    assert body["updated_at"] == "2026-11-29T20:00:00.250Z"
    for key in ("next_fire_at", "created_at", "updated_at"):
        assert RFC3339_Z.match(body[key]), body[key]


def test_routine_public_json_hides_internal_fields() -> None:
    body = a_routine(schedule_version=3, due_at=NOW).public()
    assert "schedule_version" not in body and "due_at" not in body
    assert body["next_fire_at"] is not None
    assert a_routine(next_fire_at=None).public()["next_fire_at"] is None


def test_actions_omit_unset_agent_fields() -> None:
    body = a_routine(
        actions=[
            {"type": "invocation", "agent_id": "asst_abc123", "input": "go"},
            {"type": "response", "agent_name": "weekly", "input": {"k": 1}},
            {
                "type": "response",
                "agent_name": "weekly",
                "agent_version": "2",
                "thread_id": "conv_1",
                "input": "x",
            },
        ]
    ).public()
    assert body["actions"] == [
        {"type": "invocation", "agent_id": "asst_abc123", "input": "go"},
        {"type": "response", "agent_name": "weekly", "input": {"k": 1}, "max_thread_messages": 200},
        {
            "type": "response",
            "agent_name": "weekly",
            "agent_version": "2",
            "thread_id": "conv_1",
            "input": "x",
            "max_thread_messages": 200,
        },
    ]


def test_retry_policy_json_omits_the_other_forms_fields() -> None:
    fixed = a_routine().public()["retry_policy"]
    assert fixed == {"max_attempts": 4, "delays_seconds": [60, 300, 900]}
    exponential = a_routine(retry_policy={"max_attempts": 6, "backoff": "exponential"}).public()[
        "retry_policy"
    ]
    assert "delays_seconds" not in exponential
    assert exponential == {
        "max_attempts": 6,
        "backoff": "exponential",
        "initial_delay_seconds": 30,
        "max_delay_seconds": 3600,
        "jitter": True,
    }


def test_routine_json_matches_the_spec_example_shape() -> None:
    body = a_routine().public()
    assert list(body) == [
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
        "id",
        "state",
        "next_fire_at",
        "created_at",
        "updated_at",
        "version",
        "fire_count",
        "disabled_reason",
        "next_dispatch_at",
    ]
    assert json.loads(json.dumps(body)) == body


def test_run_json_shape() -> None:
    scheduled = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    run = Run(
        id=run_id_for(scheduled, "abcdef0123"),
        routine_id="rt_0f3c2a9d6b1e4c7a",
        trigger=RunTrigger.schedule,
        scheduled_for=scheduled,
        status=RunStatus.succeeded,
        attempt=2,
        max_attempts=4,
        started_at=scheduled + timedelta(seconds=1, microseconds=500_000),
        ended_at=scheduled + timedelta(minutes=1, seconds=5),
        idempotency_key=idempotency_key("rt_0f3c2a9d6b1e4c7a", scheduled),
        actions=[
            ActionResult(
                index=0,
                id="step1",
                status=StepStatus.succeeded,
                attempt=2,
                started_at=scheduled + timedelta(seconds=1, microseconds=500_000),
                ended_at=scheduled + timedelta(minutes=1, seconds=5),
                agent_run_id="run_abc",
                output="done",
            )
        ],
        progress=RunProgress(steps={"step1": StepProgress(lease_owner="me")}, holds_slot=True),
    )
    body = run.public()
    assert "progress" not in body
    assert body["scheduled_for"] == "2026-11-30T06:00:00Z"
    assert body["started_at"] == "2026-11-30T06:00:01.500Z"
    assert body["next_attempt_at"] is None
    assert body["idempotency_key"] == "rt_0f3c2a9d6b1e4c7a:2026-11-30T06:00:00Z"
    assert body["actions"] == [
        {
            "index": 0,
            "id": "step1",
            "status": "succeeded",
            "attempt": 2,
            "started_at": "2026-11-30T06:00:01.500Z",
            "ended_at": "2026-11-30T06:01:05Z",
            "next_attempt_at": None,
            "agent_run_id": "run_abc",
            "thread_id": None,
            "output": "done",
            "error_message": None,
            "comment": None,
            "decided_at": None,
        }
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z", id="whole-second"),
        pytest.param(
            datetime(2026, 1, 2, 3, 4, 5, 120_000, tzinfo=UTC), "2026-01-02T03:04:05.120Z", id="millis"
        ),
        pytest.param(
            datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            "2026-01-02T03:04:05Z",
            id="offset",
        ),
        pytest.param(
            datetime(2026, 1, 1, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
            "2026-01-02T04:00:00Z",
            id="date-rolls",
        ),
    ],
)
def test_utc_text(value: datetime, text: str) -> None:
    assert utc_text(value) == text


# --- ids ----------------------------------------------------------------------------------------------


def test_routine_ids_are_prefixed_and_unique() -> None:
    ids = {new_routine_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"rt_[0-9a-f]{16}", i) for i in ids)


def test_run_ids_sort_newest_first() -> None:
    times = [NOW + timedelta(minutes=m) for m in (0, 1, 60, 60 * 24 * 365)]
    ids = [run_id_for(t, "0000000000") for t in times]
    assert sorted(ids) == list(reversed(ids))
    assert manual_run_id(NOW + timedelta(seconds=1)) < manual_run_id(NOW)


def test_scheduled_run_id_is_deterministic_per_fire() -> None:
    routine_id = "rt_0f3c2a9d6b1e4c7a"
    assert scheduled_run_id(routine_id, NOW) == scheduled_run_id(routine_id, NOW)
    assert scheduled_run_id(routine_id, NOW) != scheduled_run_id(routine_id, NOW + timedelta(minutes=1))
    assert scheduled_run_id(routine_id, NOW) != scheduled_run_id("rt_0000000000000000", NOW)
