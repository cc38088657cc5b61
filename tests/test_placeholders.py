"""``{{...}}`` placeholders (``routines.placeholders``): checks at write time, substitution before a
call. Pure: tables of inputs and expected outputs."""

from __future__ import annotations

from typing import Any

import pytest

from routines import placeholders
from routines.placeholders import Context

CONTEXT = Context(
    steps={
        "triage": '{"severity": "high", "count": 3, "regions": ["us", "eu"], "meta": {"ok": true}}',
        "scan": "plain text, not JSON",
        "empty": None,
    },
    run={"id": "run_1", "scheduled_for": "2026-11-30T06:00:00Z", "attempt": 2},
    routine={"id": "rt_1", "name": "nightly"},
    event={"repo": {"name": "routines"}, "commits": [{"id": "abc"}]},
    event_headers={"x-github-event": "push"},
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("{{steps.triage.output.severity}}", "high", id="whole_string_path"),
        pytest.param("{{steps.triage.output.count}}", 3, id="whole_string_keeps_a_number"),
        pytest.param(
            "{{ steps.triage.output.meta }}", {"ok": True}, id="whole_string_keeps_an_object_spaces"
        ),
        pytest.param("{{steps.triage.output.regions.1}}", "eu", id="array_index"),
        pytest.param("{{steps.scan.output}}", "plain text, not JSON", id="text_output_stays_text"),
        pytest.param(
            "{{steps.triage.output}}",
            {"severity": "high", "count": 3, "regions": ["us", "eu"], "meta": {"ok": True}},
            id="json_output_parsed",
        ),
        pytest.param("{{steps.triage.output.nope}}", None, id="missing_path_is_null"),
        pytest.param("{{steps.empty.output}}", None, id="step_without_output_is_null"),
        pytest.param("{{steps.skipped.output.x}}", None, id="unknown_step_at_run_time_is_null"),
        pytest.param(
            "sev={{steps.triage.output.severity}} n={{steps.triage.output.count}}",
            "sev=high n=3",
            id="in_text",
        ),
        pytest.param("r={{steps.triage.output.regions}}", 'r=["us","eu"]', id="in_text_json"),
        pytest.param("[{{steps.empty.output}}]", "[]", id="in_text_null_is_empty"),
        pytest.param("{{run.id}} at {{run.scheduled_for}}", "run_1 at 2026-11-30T06:00:00Z", id="run_fields"),
        pytest.param("{{run.attempt}}", 2, id="run_attempt_number"),
        pytest.param("{{routine.name}}", "nightly", id="routine_name"),
        pytest.param("{{event.repo.name}}/{{event.commits.0.id}}", "routines/abc", id="event_paths"),
        pytest.param("{{event_headers.X-GitHub-Event}}", "push", id="event_header_any_case"),
        pytest.param("no placeholders {here}", "no placeholders {here}", id="untouched"),
        pytest.param(
            {"a": ["{{routine.name}}", {"b": "{{steps.triage.output.count}}"}], "c": 1},
            {"a": ["nightly", {"b": 3}], "c": 1},
            id="nested_object",
        ),
    ],
)
def test_substitute(value: Any, expected: Any) -> None:
    assert placeholders.substitute(value, CONTEXT) == expected


def test_substitute_does_not_change_its_input() -> None:
    value = {"a": "{{routine.name}}"}
    placeholders.substitute(value, CONTEXT)
    assert value == {"a": "{{routine.name}}"}


def test_without_an_event_event_placeholders_are_null() -> None:
    bare = Context(routine={"name": "x"})
    assert placeholders.substitute({"e": "{{event.repo}}", "t": "h={{event_headers.x}}"}, bare) == {
        "e": None,
        "t": "h=",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("{{steps.triage.output.count}}", "3", id="number_becomes_text"),
        pytest.param("{{steps.empty.output}}", "", id="null_becomes_empty_text"),
        pytest.param("{{steps.triage.output.meta}}", {"ok": True}, id="object_stays_object"),
    ],
)
def test_a_whole_input_stays_a_string_or_an_object(value: str, expected: Any) -> None:
    assert placeholders.substitute_input(value, CONTEXT) == expected


@pytest.mark.parametrize(
    ("expression", "ancestors", "problem"),
    [
        pytest.param("steps.a.output", {"a"}, None, id="ancestor_output"),
        pytest.param("steps.a.output.x.0", {"a"}, None, id="ancestor_output_path"),
        pytest.param("steps.b.output", {"a"}, "does not run before this step", id="not_an_ancestor"),
        pytest.param("steps.a.status", {"a"}, "write {{steps.<id>.output}}", id="not_output"),
        pytest.param("steps.a", {"a"}, "write {{steps.<id>.output}}", id="no_output"),
        pytest.param("run.id", set(), None, id="run_id"),
        pytest.param("run.scheduled_for", set(), None, id="run_scheduled_for"),
        pytest.param("run.secret", set(), "unknown placeholder", id="unknown_run_field"),
        pytest.param("routine.name", set(), None, id="routine_name"),
        pytest.param("event", set(), None, id="whole_event"),
        pytest.param("event.a.b", set(), None, id="event_path"),
        pytest.param("event_headers.x-sig", set(), None, id="event_header"),
        pytest.param("event_headers", set(), "unknown placeholder", id="event_headers_without_name"),
        pytest.param("env.HOME", set(), "unknown placeholder", id="unknown_namespace"),
        pytest.param("", set(), "not a placeholder", id="empty"),
        pytest.param("steps..output", {"a"}, "not a placeholder", id="empty_segment"),
    ],
)
def test_problem(expression: str, ancestors: set[str], problem: str | None) -> None:
    found = placeholders.problem(expression, ancestors)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_references_name_where_each_placeholder_is() -> None:
    value = {"a": "x {{run.id}} {{routine.name}}", "b": ["ok", {"c": "{{steps.s.output}}"}]}
    assert sorted(placeholders.references(value), key=str) == sorted(
        [(("a",), "run.id"), (("a",), "routine.name"), (("b", 1, "c"), "steps.s.output")], key=str
    )
