"""The step graph of a routine (README "Steps"), as pure functions: ids and dependencies, the rules a
routine's steps must follow (checked when it is written), and the rules that decide, when a step's
dependencies are done, whether it runs or is skipped.

A routine written as in version 1 (a plain list, no ``id`` or ``after``) is a chain: step ``n``
runs after step ``n - 1``, ids ``step1``, ``step2``, ... by position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from routines import placeholders
from routines.models import (
    MAX_STEPS,
    Action,
    ApprovalStep,
    Condition,
    RuleError,
    StepStatus,
)


class GraphError(RuleError):
    """A rule of the step graph broken at ``loc`` (within ``actions``)."""


def step_ids(actions: Sequence[Action]) -> list[str]:
    return [a.id or f"step{i + 1}" for i, a in enumerate(actions)]


def dependencies(actions: Sequence[Action]) -> dict[str, tuple[str, ...]]:
    """Each step's ``after``: as written, or the step before it (none for the first)."""
    ids = step_ids(actions)
    return {
        ids[i]: tuple(a.after) if a.after is not None else ((ids[i - 1],) if i else ())
        for i, a in enumerate(actions)
    }


def ancestors(deps: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """Every step's direct and indirect dependencies (the graph must be acyclic)."""
    out: dict[str, set[str]] = {}
    for step in order(deps):
        out[step] = set(deps[step]).union(*(out[d] for d in deps[step]))
    return out


def order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    """The steps in an order where each comes after its dependencies (Kahn); raises ``GraphError``
    naming a step of a cycle."""
    left = {s: set(d) for s, d in deps.items()}
    done: list[str] = []
    while left:
        ready = [s for s, d in left.items() if not d]
        if not ready:
            stuck = min(left)
            raise GraphError((), f"the steps form a cycle through {stuck!r}: {sorted(left)}")
        for s in ready:
            del left[s]
            done.append(s)
        for d in left.values():
            d.difference_update(ready)
    return done


def check(actions: Sequence[Action]) -> None:
    """Raise ``GraphError`` (with the location) for the first broken rule: duplicate ids, ``after``
    naming an unknown step or itself, a cycle, a ``when`` or placeholder naming a step that does not
    run before, an unknown placeholder."""
    if len(actions) > MAX_STEPS:
        raise GraphError((), f"at most {MAX_STEPS} steps")
    ids = step_ids(actions)
    seen: dict[str, int] = {}
    for i, step in enumerate(ids):
        if step in seen:
            raise GraphError((i, "id"), f"duplicate step id {step!r} (also step {seen[step] + 1})")
        seen[step] = i
    for i, action in enumerate(actions):
        for j, dep in enumerate(action.after or ()):
            if dep == ids[i]:
                raise GraphError((i, "after", j), f"step {dep!r} cannot run after itself")
            if dep not in seen:
                raise GraphError((i, "after", j), f"unknown step id {dep!r}")
    deps = dependencies(actions)
    try:
        before = ancestors(deps)
    except GraphError as exc:
        stuck = str(exc).split("'")[1]
        raise GraphError((seen[stuck], "after"), str(exc)) from None
    for i, action in enumerate(actions):
        earlier = before[ids[i]]
        for j, cond in enumerate(action.conditions):
            where: tuple[str | int, ...] = (i, "when", j) if isinstance(action.when, list) else (i, "when")
            if cond.step not in earlier:
                raise GraphError(
                    (*where, "step"),
                    f"step {cond.step!r} does not run before step {ids[i]!r} (add it to after)",
                )
        if isinstance(action, ApprovalStep):
            continue
        for loc, expression in placeholders.references(action.input):
            problem = placeholders.problem(expression, earlier)
            if problem:
                raise GraphError((i, "input", *loc), problem)


# --- running ------------------------------------------------------------------------------------


def holds(cond: Condition, status: StepStatus, output: str | None) -> bool:
    """Whether condition ``cond`` holds for a finished step with ``status`` and ``output``."""
    if cond.status is not None and status.value != cond.status:
        return False
    if cond.op is None:
        return True
    if status is not StepStatus.succeeded:
        return False
    value = placeholders.lookup(placeholders.parsed(output), cond.path)
    if cond.op == "exists":
        return placeholders.found(value)
    if not placeholders.found(value):
        return False
    return compare(cond.op, value, cond.value)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def compare(op: str, actual: Any, expected: Any) -> bool:
    if op == "eq":
        return _same(actual, expected)
    if op == "ne":
        return not _same(actual, expected)
    if op == "in":
        return isinstance(expected, list) and any(_same(actual, e) for e in expected)
    if op == "contains":
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        if isinstance(actual, list):
            return any(_same(a, expected) for a in actual)
        if isinstance(actual, dict):
            return isinstance(expected, str) and expected in actual
        return False
    both_numbers = _number(actual) and _number(expected)
    both_strings = isinstance(actual, str) and isinstance(expected, str)
    if not (both_numbers or both_strings):
        return False
    ordered: dict[str, bool] = {
        "gt": actual > expected,
        "gte": actual >= expected,
        "lt": actual < expected,
        "lte": actual <= expected,
    }
    return ordered[op]


def runs(
    action: Action, deps: Sequence[str], status: Mapping[str, StepStatus], outputs: Mapping[str, str | None]
) -> bool:
    """Whether a step whose dependencies are all finished runs (else it ends ``skipped``): each
    dependency that failed or was skipped must be named by a status condition of its ``when`` (a
    handler), and every condition must hold."""
    handled = {c.step for c in action.conditions if c.status in ("failed", "skipped")}
    for dep in deps:
        if (
            status[dep] in (StepStatus.failed, StepStatus.skipped, StepStatus.cancelled)
            and dep not in handled
        ):
            return False
    return all(holds(c, status[c.step], outputs.get(c.step)) for c in action.conditions)


def handlers_of(actions: Sequence[Action]) -> dict[str, set[str]]:
    """For each step, the steps whose ``when`` runs them on its failure."""
    ids = step_ids(actions)
    out: dict[str, set[str]] = {}
    for i, action in enumerate(actions):
        for cond in action.conditions:
            if cond.status == "failed":
                out.setdefault(cond.step, set()).add(ids[i])
    return out
