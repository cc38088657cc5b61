"""The event of a webhook run: ``when`` conditions on it, and its ``{{event.*}}`` placeholders.

Pure functions. ``context(run)`` is the mapping a placeholder engine takes (``event``: the JSON body,
``event_headers``: the stored headers). ``substitute`` fills only the ``event`` and ``event_headers``
namespaces and leaves every other ``{{...}}`` as it is, so a general engine can take over the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from routines.models import EventCondition, Run

_MISSING = object()
_PLACEHOLDER = re.compile(r"\{\{\s*(event|event_headers)((?:\.[^.{}\s]+)+)?\s*\}\}")


def lookup(document: Any, path: str | None) -> Any:
    """The value at dot path ``path`` (list items by index), ``_MISSING`` when there is none."""
    if path is None:
        return document
    value = document
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1 and "1" is not 1."""
    if _number(a) and _number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def holds(condition: EventCondition, body: Any) -> bool:
    """Whether ``condition`` holds for the delivery's JSON ``body``. Order (``gt``...) compares two
    numbers or two strings; anything else is false, never an error."""
    found = lookup(body, condition.path)
    op, value = condition.op, condition.value
    if op == "exists":
        return (found is not _MISSING) == (value is not False)
    if found is _MISSING:
        return False
    if op == "eq":
        return _same(found, value)
    if op == "ne":
        return not _same(found, value)
    if op == "in":
        return any(_same(found, item) for item in value)
    if op == "contains":
        if isinstance(found, str):
            return isinstance(value, str) and value in found
        if isinstance(found, list):
            return any(_same(item, value) for item in found)
        if isinstance(found, dict):
            return isinstance(value, str) and value in found
        return False
    comparable = (_number(found) and _number(value)) or (isinstance(found, str) and isinstance(value, str))
    if not comparable:
        return False
    outcomes = {"gt": found > value, "gte": found >= value, "lt": found < value, "lte": found <= value}
    return bool(outcomes[op])


def matches(conditions: Sequence[EventCondition], body: Any) -> bool:
    """All of ``conditions`` hold (an empty list: every event)."""
    return all(holds(c, body) for c in conditions)


def context(run: Run) -> Mapping[str, Any]:
    """The placeholder namespaces of a run: ``event`` and ``event_headers`` for a webhook run, none
    for any other."""
    if run.event is None:
        return {}
    return {"event": run.event.body, "event_headers": run.event.headers}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def substitute(value: Any, namespaces: Mapping[str, Any]) -> Any:
    """``value`` (an action input: text or JSON) with its event placeholders filled. A placeholder
    that is a whole string keeps the JSON type of what it names; inside text it becomes text (JSON for
    objects and lists). A path the event does not have gives ``null`` (whole string) or nothing."""
    if not namespaces:
        return value
    if isinstance(value, dict):
        return {key: substitute(item, namespaces) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, namespaces) for item in value]
    if not isinstance(value, str) or "{{" not in value:
        return value

    def resolve(match: re.Match[str]) -> Any:
        found = lookup(namespaces.get(match.group(1)), (match.group(2) or "")[1:] or None)
        return None if found is _MISSING else found

    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return resolve(whole)
    return _PLACEHOLDER.sub(lambda m: "" if (found := resolve(m)) is None else _text(found), value)
