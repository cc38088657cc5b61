"""The step graph's pure rules (``routines.graph``): default ids and dependencies, order, and the
conditions that decide whether a ready step runs."""

from __future__ import annotations

from typing import Any

import pytest

from routines import graph
from routines.models import Condition, InvocationAction, StepStatus


def step(**fields: Any) -> InvocationAction:
    return InvocationAction.model_validate({"type": "invocation", "agent_id": "a", "input": "x", **fields})


def test_a_version_1_list_is_a_chain_with_positional_ids() -> None:
    actions = [step(), step(), step()]
    assert graph.step_ids(actions) == ["step1", "step2", "step3"]
    assert graph.dependencies(actions) == {"step1": (), "step2": ("step1",), "step3": ("step2",)}


def test_after_as_written_and_empty_after_starts_with_the_run() -> None:
    actions = [step(id="a"), step(id="b", after=[]), step(id="c", after=["a", "b"])]
    assert graph.dependencies(actions) == {"a": (), "b": (), "c": ("a", "b")}
    assert graph.ancestors(graph.dependencies(actions)) == {"a": set(), "b": set(), "c": {"a", "b"}}
    assert graph.order(graph.dependencies(actions)) == ["a", "b", "c"]


def cond(**fields: Any) -> Condition:
    return Condition.model_validate({"step": "s", **fields})


OUT = '{"severity": "high", "score": 7, "tags": ["a", "b"], "ok": true, "meta": {"k": 1}}'


@pytest.mark.parametrize(
    ("condition", "status", "output", "holds"),
    [
        pytest.param(cond(status="succeeded"), StepStatus.succeeded, None, True, id="status_succeeded"),
        pytest.param(cond(status="failed"), StepStatus.succeeded, None, False, id="status_mismatch"),
        pytest.param(cond(status="skipped"), StepStatus.skipped, None, True, id="status_skipped"),
        pytest.param(cond(path="severity", op="eq", value="high"), StepStatus.succeeded, OUT, True, id="eq"),
        pytest.param(cond(path="severity", op="ne", value="high"), StepStatus.succeeded, OUT, False, id="ne"),
        pytest.param(cond(path="score", op="gt", value=5), StepStatus.succeeded, OUT, True, id="gt"),
        pytest.param(cond(path="score", op="gte", value=7), StepStatus.succeeded, OUT, True, id="gte"),
        pytest.param(cond(path="score", op="lt", value=7), StepStatus.succeeded, OUT, False, id="lt"),
        pytest.param(
            cond(path="score", op="lte", value=7.0), StepStatus.succeeded, OUT, True, id="lte_float"
        ),
        pytest.param(
            cond(path="severity", op="gt", value=1), StepStatus.succeeded, OUT, False, id="gt_mixed_types"
        ),
        pytest.param(
            cond(path="severity", op="in", value=["high", "critical"]),
            StepStatus.succeeded,
            OUT,
            True,
            id="in",
        ),
        pytest.param(
            cond(path="tags", op="contains", value="b"), StepStatus.succeeded, OUT, True, id="contains_list"
        ),
        pytest.param(
            cond(path="severity", op="contains", value="ig"),
            StepStatus.succeeded,
            OUT,
            True,
            id="contains_text",
        ),
        pytest.param(
            cond(path="meta", op="contains", value="k"), StepStatus.succeeded, OUT, True, id="contains_key"
        ),
        pytest.param(cond(path="ok", op="eq", value=1), StepStatus.succeeded, OUT, False, id="true_is_not_1"),
        pytest.param(cond(path="meta.k", op="eq", value=1), StepStatus.succeeded, OUT, True, id="dot_path"),
        pytest.param(
            cond(path="tags.0", op="eq", value="a"), StepStatus.succeeded, OUT, True, id="array_index"
        ),
        pytest.param(cond(path="nope", op="exists"), StepStatus.succeeded, OUT, False, id="not_exists"),
        pytest.param(cond(path="meta.k", op="exists"), StepStatus.succeeded, OUT, True, id="exists"),
        pytest.param(
            cond(path="nope", op="ne", value=1), StepStatus.succeeded, OUT, False, id="missing_path_is_false"
        ),
        pytest.param(
            cond(op="contains", value="ERROR"), StepStatus.succeeded, "an ERROR here", True, id="whole_text"
        ),
        pytest.param(cond(op="eq", value=3), StepStatus.succeeded, "3", True, id="whole_output_as_json"),
        pytest.param(
            cond(path="severity", op="eq", value="high"),
            StepStatus.failed,
            OUT,
            False,
            id="failed_step_has_no_output",
        ),
        pytest.param(
            cond(status="succeeded", path="score", op="gt", value=1),
            StepStatus.succeeded,
            OUT,
            True,
            id="status_and_op",
        ),
    ],
)
def test_holds(condition: Condition, status: StepStatus, output: str | None, holds: bool) -> None:
    assert graph.holds(condition, status, output) is holds


@pytest.mark.parametrize(
    ("when", "dep", "runs"),
    [
        pytest.param(None, StepStatus.succeeded, True, id="plain_after_success"),
        pytest.param(None, StepStatus.failed, False, id="plain_after_failure_skips"),
        pytest.param(None, StepStatus.skipped, False, id="plain_after_skip_skips"),
        pytest.param(
            {"step": "s", "status": "failed"}, StepStatus.failed, True, id="handler_runs_on_failure"
        ),
        pytest.param(
            {"step": "s", "status": "failed"}, StepStatus.succeeded, False, id="handler_skipped_on_success"
        ),
        pytest.param(
            {"step": "s", "status": "skipped"}, StepStatus.skipped, True, id="runs_on_skip_when_asked"
        ),
    ],
)
def test_runs(when: dict[str, Any] | None, dep: StepStatus, runs: bool) -> None:
    action = step(id="t", after=["s"], when=when)
    assert graph.runs(action, ["s"], {"s": dep}, {"s": None}) is runs


def test_handlers_of() -> None:
    actions = [step(id="s"), step(id="h", when={"step": "s", "status": "failed"}), step(id="x", after=["s"])]
    assert graph.handlers_of(actions) == {"s": {"h"}}
