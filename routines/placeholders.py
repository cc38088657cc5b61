"""``{{...}}`` placeholders in step inputs (README "Steps"), as pure functions: find and check them when a
routine is written, substitute them before each agent call.

Namespaces: ``steps.<id>.output`` (``.output.<path>``: a dot path into the output parsed as JSON),
``run.<field>``, ``routine.<field>``, ``event.<path>`` (a dot path into a webhook delivery's JSON
body; ``event`` alone is the whole body) and ``event_headers.<name>`` (lower-cased header names).

Substitution: a placeholder that is a whole string keeps the JSON type of its value (an object, a
number, ``null``); one inside a longer string is replaced by its text (strings as they are, other
values as JSON, nothing for ``null``). A value that does not exist (a step that did not succeed, a
path the output does not have, no event) is ``null``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
RUN_FIELDS = frozenset({"id", "scheduled_for", "trigger", "attempt", "idempotency_key"})
ROUTINE_FIELDS = frozenset({"id", "name"})
_SEGMENT = re.compile(r"^[^.\s]+$")
_MISSING = object()


@dataclass(frozen=True)
class Context:
    """What placeholders resolve against. ``steps``: each step's output text (``None``: it has none,
    e.g. it was skipped); ``run`` and ``routine``: their fields; ``event``: a webhook delivery's
    parsed JSON body (``None``: not a webhook run) and ``event_headers`` its lower-cased headers."""

    steps: Mapping[str, str | None] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    routine: Mapping[str, Any] = field(default_factory=dict)
    event: Any = None
    event_headers: Mapping[str, str] | None = None


def strings(value: Any, loc: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string in ``value`` (object values and array items, not keys) with its location."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [(loc, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, dict):
            stack.extend(((*where, k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*where, i), v) for i, v in reversed(list(enumerate(item))))


def references(value: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every placeholder expression in ``value`` (``steps.a.output``), with the location of its string."""
    for where, text in strings(value):
        for match in PLACEHOLDER.finditer(text):
            yield where, match.group(1)


def problem(expression: str, ancestors: Set[str]) -> str | None:
    """Why ``expression`` is not a placeholder a step may use, or None. ``ancestors``: the ids of the
    steps it runs after (directly or not): only their outputs exist when it starts."""
    parts = expression.split(".")
    if not all(_SEGMENT.match(p) for p in parts):
        return f"{{{{{expression}}}}} is not a placeholder: use dot-separated names"
    head, rest = parts[0], parts[1:]
    if head == "steps":
        if len(rest) < 2 or rest[1] != "output":
            return (
                f"{{{{{expression}}}}}: write {{{{steps.<id>.output}}}} or {{{{steps.<id>.output.<path>}}}}"
            )
        if rest[0] not in ancestors:
            return f"{{{{{expression}}}}} names step {rest[0]!r}, which does not run before this step"
        return None
    if head == "run" and len(rest) == 1 and rest[0] in RUN_FIELDS:
        return None
    if head == "routine" and len(rest) == 1 and rest[0] in ROUTINE_FIELDS:
        return None
    if head == "event":
        return None
    if head == "event_headers" and len(rest) == 1:
        return None
    known = ", ".join(
        ["steps.<id>.output[.<path>]"]
        + [f"run.{f}" for f in sorted(RUN_FIELDS)]
        + [f"routine.{f}" for f in sorted(ROUTINE_FIELDS)]
        + ["event[.<path>]", "event_headers.<name>"]
    )
    return f"unknown placeholder {{{{{expression}}}}} (known: {known})"


def parsed(output: str | None) -> Any:
    """A step's output as JSON when it parses as JSON, else the text itself."""
    if output is None:
        return None
    try:
        return json.loads(output)
    except ValueError:
        return output


def lookup(value: Any, path: str | None) -> Any:
    """The value at dot path ``path`` in ``value`` (array items by index), or ``_MISSING``."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def found(value: Any) -> bool:
    return value is not _MISSING


def resolve(expression: str, context: Context) -> Any:
    """The value of one placeholder expression (``None`` for what does not exist)."""
    head, _, rest = expression.partition(".")
    value: Any = _MISSING
    if head == "steps":
        step, _, tail = rest.partition(".")
        path = tail.removeprefix("output").removeprefix(".")
        value = lookup(parsed(context.steps.get(step)), path)
    elif head in ("run", "routine"):
        value = (context.run if head == "run" else context.routine).get(rest, _MISSING)
    elif head == "event":
        value = lookup(context.event, rest)
    elif head == "event_headers":
        value = (context.event_headers or {}).get(rest.lower(), _MISSING)
    return None if value is _MISSING else value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _in_string(text: str, context: Context) -> Any:
    whole = PLACEHOLDER.fullmatch(text)
    if whole is not None:
        return resolve(whole.group(1), context)
    return PLACEHOLDER.sub(lambda m: _text(resolve(m.group(1), context)), text)


def substitute(value: Any, context: Context) -> Any:
    """``value`` with every placeholder replaced (a new value; ``value`` is not changed)."""
    if isinstance(value, str):
        return _in_string(value, context) if "{{" in value else value
    if isinstance(value, dict):
        return {k: substitute(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, context) for v in value]
    return value


def substitute_input(value: str | dict[str, Any], context: Context) -> str | dict[str, Any]:
    """A step's ``input`` substituted; it stays a string or an object (an input that is one
    placeholder of another type becomes its JSON text)."""
    result = substitute(value, context)
    return result if isinstance(result, str | dict) else _text(result)
