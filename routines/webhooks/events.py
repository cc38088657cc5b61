"""The ``when`` conditions of a webhook trigger on a delivery's JSON body, as pure functions. Its
``{{event.*}}`` placeholders are filled in by ``routines.placeholders`` with the steps' ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from routines import graph, placeholders
from routines.models import EventCondition


def holds(condition: EventCondition, body: Any) -> bool:
    """Whether ``condition`` holds for the delivery's JSON ``body``, with the steps' path lookup and
    comparisons (``graph.compare``): order compares two numbers or two strings; anything else is
    false, never an error. A path the body lacks makes every ``op`` false but ``exists``."""
    found = placeholders.lookup(body, condition.path)
    if condition.op == "exists":
        return placeholders.found(found) == (condition.value is not False)
    return placeholders.found(found) and graph.compare(condition.op, found, condition.value)


def matches(conditions: Sequence[EventCondition], body: Any) -> bool:
    """All of ``conditions`` hold (an empty list: every event)."""
    return all(holds(c, body) for c in conditions)
