"""``when`` conditions on a delivery's body and the ``{{event.*}}`` placeholders, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from routines.models import EventCondition
from routines.placeholders import Context, substitute
from routines.webhooks.events import matches

BODY = {
    "action": "opened",
    "number": 7,
    "draft": False,
    "ratio": 0.5,
    "labels": ["bug", "p1"],
    "pull_request": {"title": "Fix the scheduler", "head": {"ref": "fix/tick"}},
    "commits": [{"id": "a1"}, {"id": "b2"}],
    "empty": None,
}


def cond(path: str | None, op: str, value: Any = None, *, given: bool = True) -> EventCondition:
    data: dict[str, Any] = {"op": op}
    if path is not None:
        data["path"] = path
    if given:
        data["value"] = value
    return EventCondition.model_validate(data)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        pytest.param(cond("action", "eq", "opened"), True, id="eq_string"),
        pytest.param(cond("action", "eq", "closed"), False, id="eq_other_string"),
        pytest.param(cond("number", "eq", 7.0), True, id="eq_int_and_float"),
        pytest.param(cond("number", "eq", "7"), False, id="eq_number_is_not_text"),
        pytest.param(cond("draft", "eq", 0), False, id="eq_false_is_not_zero"),
        pytest.param(cond("empty", "eq", None), True, id="eq_null"),
        pytest.param(cond("action", "ne", "closed"), True, id="ne"),
        pytest.param(cond("missing", "ne", "closed"), False, id="ne_on_a_missing_path"),
        pytest.param(cond("action", "in", ["opened", "reopened"]), True, id="in"),
        pytest.param(cond("action", "in", ["closed"]), False, id="not_in"),
        pytest.param(cond("labels", "contains", "bug"), True, id="list_contains"),
        pytest.param(cond("labels", "contains", "p2"), False, id="list_lacks"),
        pytest.param(cond("pull_request.title", "contains", "scheduler"), True, id="text_contains"),
        pytest.param(cond("pull_request", "contains", "head"), True, id="object_has_key"),
        pytest.param(cond("number", "contains", 7), False, id="number_contains_nothing"),
        pytest.param(cond("number", "gt", 5), True, id="gt"),
        pytest.param(cond("number", "gte", 7), True, id="gte"),
        pytest.param(cond("ratio", "lt", 1), True, id="lt_float"),
        pytest.param(cond("number", "lte", 6), False, id="lte"),
        pytest.param(cond("action", "gt", "a"), True, id="gt_strings"),
        pytest.param(cond("action", "gt", 1), False, id="gt_text_and_number"),
        pytest.param(cond("draft", "lt", 1), False, id="booleans_are_not_ordered"),
        pytest.param(cond("pull_request.head.ref", "eq", "fix/tick"), True, id="nested_path"),
        pytest.param(cond("commits.1.id", "eq", "b2"), True, id="list_index"),
        pytest.param(cond("commits.5.id", "exists", given=False), False, id="index_out_of_range"),
        pytest.param(cond("pull_request.title", "exists", given=False), True, id="exists"),
        pytest.param(cond("pull_request.body", "exists", False), True, id="exists_false"),
        pytest.param(cond("empty", "exists", given=False), True, id="null_exists"),
        pytest.param(cond(None, "contains", "number"), True, id="no_path_is_the_whole_body"),
    ],
)
def test_a_condition_on_the_body(condition: EventCondition, expected: bool) -> None:
    assert matches([condition], BODY) is expected


def test_conditions_all_hold_and_none_means_every_event() -> None:
    assert matches([], BODY) and matches([], "any JSON")
    assert matches([cond("action", "eq", "opened"), cond("number", "gt", 1)], BODY)
    assert not matches([cond("action", "eq", "opened"), cond("number", "gt", 10)], BODY)


def test_a_body_that_is_not_an_object_only_matches_by_value() -> None:
    assert matches([cond(None, "eq", [1, 2])], [1, 2])
    assert not matches([cond("a", "exists", given=False)], [1, 2])


NAMESPACES = Context(event=BODY, event_headers={"x-github-event": "pull_request"}, run={"id": "run_1"})


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("{{event.number}}", 7, id="whole_string_keeps_the_number"),
        pytest.param("{{ event.labels }}", ["bug", "p1"], id="whole_string_keeps_the_list"),
        pytest.param("{{event.draft}}", False, id="whole_string_keeps_false"),
        pytest.param("{{event}}", BODY, id="the_whole_body"),
        pytest.param(
            "PR #{{event.number}}: {{event.pull_request.title}}", "PR #7: Fix the scheduler", id="in_text"
        ),
        pytest.param("labels={{event.labels}}", 'labels=["bug","p1"]', id="list_in_text_is_json"),
        pytest.param("{{event.nothing}}", None, id="missing_whole_is_null"),
        pytest.param("[{{event.nothing}}]", "[]", id="missing_in_text_is_empty"),
        pytest.param("{{event_headers.x-github-event}}", "pull_request", id="header"),
        pytest.param("{{run.id}} {{event.action}}", "run_1 opened", id="mixed_namespaces"),
        pytest.param("no placeholders", "no placeholders", id="plain_text"),
    ],
)
def test_event_placeholders(template: str, expected: Any) -> None:
    assert substitute(template, NAMESPACES) == expected


def test_placeholders_are_filled_through_objects_and_lists_and_not_in_keys() -> None:
    value = {"{{event.action}}": ["{{event.number}}", {"t": "{{event.pull_request.head.ref}}"}], "n": 3}
    assert substitute(value, NAMESPACES) == {"{{event.action}}": [7, {"t": "fix/tick"}], "n": 3}


def test_without_an_event_its_placeholders_are_null() -> None:
    assert substitute("{{event.number}}", Context()) is None
