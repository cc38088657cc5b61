"""``routines apply``: make the deployment match routine files, matched by name.

1. Read and check every file (``_files.load``) and every schedule or timer trigger with the server's
   ``POST /api/preview``; any problem stops the run before anything changed.
2. Plan: what to create, update (the fields that differ, and ``state``), delete (``--prune``), print it.
3. Apply in order (creates, updates, deletes), updates with ``If-Match`` on the version read in step 1.
   If a write fails, the creates and updates already made by this run are undone (deletes come last;
   a failed delete stops the run), so one run of the command applies all of its changes or none.

What the files manage: the fields they write. A top-level field a file leaves out keeps its value on the
server (to reset one, write its default). An object that changed (``trigger``, ``retry_policy``) is sent
whole, so what the file leaves out of it returns to its default (and the plan says so); lists
(``actions``, ``delays_seconds``) are compared and sent whole.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from rich.markup import escape

from routines_client._client import RoutinesClient
from routines_client._errors import NotFoundError, RoutinesError
from routines_client._models import Routine
from routines_client.cli._files import InputError, RoutineDoc
from routines_client.cli._render import Output

_MISSING: Any = object()  # not on the server
_DEFAULT: Any = object()  # reset to the server's default
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


@dataclass
class Change:
    kind: str  # create | update | delete | unchanged
    name: str
    source: str
    body: dict[str, Any] = field(default_factory=dict)  # create: the routine; update: the merge patch
    current: Routine | None = None
    state: str | None = None  # update: enable or disable to this state
    diffs: list[tuple[str, Any, Any]] = field(default_factory=list)  # (path, old, new)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.kind, "name": self.name, "source": self.source}
        if self.current is not None:
            out["id"] = self.current.id
        if self.diffs:
            out["changes"] = [{"path": p, "old": _raw(o), "new": _raw(n)} for p, o, n in self.diffs]
        return out


def check_triggers(client: RoutinesClient, docs: list[RoutineDoc]) -> None:
    """The server's own verdict on each schedule and timer trigger (cron syntax, time zone, minimum
    interval), without changing anything. :raises InputError: listing every refusal."""
    problems = []
    for doc in docs:
        trigger = doc.body["trigger"]
        if trigger.get("type") not in ("schedule", "timer"):
            continue
        try:
            client.preview_fires(trigger, count=1)
        except RoutinesError as exc:
            if exc.status not in (400, 422):
                raise
            for error in exc.errors or []:
                problems.append(f"{doc.source}: trigger.{'.'.join(map(str, error.loc[1:]))}: {error.msg}")
            if not exc.errors:
                problems.append(f"{doc.source}: trigger: {exc.detail or exc.message}")
    if problems:
        raise InputError(problems)


def plan(docs: list[RoutineDoc], current: list[Routine], prune: bool) -> list[Change]:
    by_name = {r.name: r for r in current}
    changes: list[Change] = []
    for doc in docs:
        existing = by_name.get(doc.name)
        if existing is None:
            diffs = [(k, _MISSING, v) for k, v in doc.body.items() if k != "name"]
            changes.append(Change("create", doc.name, doc.source, dict(doc.body), diffs=diffs))
            continue
        actual = existing.to_dict()
        wanted = {k: v for k, v in doc.body.items() if k != "state"}
        diffs = differences(wanted, actual)
        patch = {key: wanted[key] for key in dict.fromkeys(p.split(".")[0] for p, _, _ in diffs)}
        for key, value in patch.items():
            # A changed object goes whole: what the file leaves out of it returns to its default
            # (a merge patch would keep it, and e.g. keep fixed delays beside backoff: exponential).
            old = actual.get(key)
            # (A trigger of another type replaces the old one whole on the server anyway.)
            if isinstance(value, dict) and isinstance(old, dict) and old.get("type") == value.get("type"):
                resets = [k for k in old if k not in value and old[k] is not None]
                patch[key] = {**dict.fromkeys(resets), **value}
                diffs.extend((f"{key}.{k}", old[k], _DEFAULT) for k in resets)
        state = doc.body.get("state")
        if state is None or existing.state not in ("enabled", "disabled") or state == existing.state:
            state = None
        else:
            diffs.append(("state", existing.state, state))
        kind = "update" if patch or state else "unchanged"
        changes.append(Change(kind, doc.name, doc.source, patch, existing, state, diffs))
    if prune:
        wanted_names = {doc.name for doc in docs}
        for routine in current:
            if routine.name not in wanted_names:
                changes.append(Change("delete", routine.name, "not in the files", current=routine))
    return changes


def differences(wanted: Any, actual: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where ``wanted`` (a file's value) differs from ``actual`` (the server's), looking only at the keys
    ``wanted`` has; lists of the same length item by item, else whole."""
    if isinstance(wanted, dict) and isinstance(actual, dict):
        out = []
        for key, value in wanted.items():
            out.extend(differences(value, actual.get(key, _MISSING), f"{path}.{key}" if path else key))
        return out
    if isinstance(wanted, list) and isinstance(actual, list) and len(wanted) == len(actual):
        out = []
        for index, (w, a) in enumerate(zip(wanted, actual, strict=True)):
            out.extend(differences(w, a, f"{path}.{index}"))
        return out
    return [] if _same(wanted, actual) else [(path, actual, wanted)]


def _same(wanted: Any, actual: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return wanted is actual
    if wanted == actual:
        return True
    if isinstance(wanted, str) and isinstance(actual, str) and _TIME.match(wanted) and _TIME.match(actual):
        try:  # the same instant written another way
            return datetime.fromisoformat(wanted) == datetime.fromisoformat(actual)
        except ValueError:
            return False
    return False


def show_plan(out: Output, changes: list[Change]) -> None:
    marks = {"create": ("+", "green"), "update": ("~", "yellow"), "delete": ("-", "red")}
    for change in changes:
        if change.kind == "unchanged":
            continue
        mark, style = marks[change.kind]
        ident = f" {change.current.id}" if change.current is not None else ""
        title = escape(f"{mark} {change.kind} {change.name}{ident}")
        out.markup(f"[{style}]{title}[/]  [dim]({escape(change.source)})[/]")
        for path, old, new in change.diffs:
            if change.kind == "create":
                out.line(f"    {path}: {_shown(new)}")
            else:
                out.line(f"    {path}: {_shown(old)} -> {_shown(new)}")


class ApplyFailed(Exception):
    """A write failed part-way; ``cause`` is the error, ``rolled_back`` says what became of earlier writes."""

    def __init__(self, cause: Exception, rolled_back: str) -> None:
        super().__init__(f"{rolled_back}: {cause}")
        self.cause, self.rolled_back = cause, rolled_back


def execute(
    client: RoutinesClient, changes: list[Change], log: Callable[[str], None]
) -> dict[str, list[str]]:
    """Apply the planned changes in order: creates, updates, deletes. :raises ApplyFailed: a write
    failed; this run's creates and updates were undone (unless a delete had already been made)."""
    done: dict[str, list[str]] = {"created": [], "updated": [], "deleted": []}
    undo: list[Callable[[], None]] = []
    order = {"create": 0, "update": 1, "delete": 2}
    try:
        for change in sorted((c for c in changes if c.kind in order), key=lambda c: order[c.kind]):
            if change.kind == "create":
                created = client.create_routine(change.body)
                undo.append(functools.partial(client.delete_routine, str(created.id)))
                done["created"].append(change.name)
                log(f"created {change.name} ({created.id})")
            elif change.kind == "update":
                undo.append(_update(client, change))
                done["updated"].append(change.name)
                log(f"updated {change.name} ({change.current.id if change.current else ''})")
            else:
                assert change.current is not None and change.current.id is not None
                with contextlib.suppress(NotFoundError):  # already gone: the wanted end state
                    client.delete_routine(change.current.id)
                undo.clear()  # a delete cannot be undone, so what came before it stays
                done["deleted"].append(change.name)
                log(f"deleted {change.name} ({change.current.id})")
    except Exception as exc:
        made = sum(len(v) for v in done.values())
        if not made:
            raise ApplyFailed(exc, "nothing was changed") from exc
        if not undo:
            raise ApplyFailed(exc, f"{made} change(s) were made and kept: {done}") from exc
        failures = 0
        for step in reversed(undo):
            try:
                step()
            except Exception as undo_exc:
                failures += 1
                log(f"could not undo a change: {undo_exc}")
        kept = made - len(undo) + failures
        note = "this run's changes were undone" if not kept else f"{kept} change(s) could not be undone"
        raise ApplyFailed(exc, note) from exc
    return done


def _update(client: RoutinesClient, change: Change) -> Callable[[], None]:
    """Apply one update; returns how to undo it."""
    current = change.current
    assert current is not None and current.id is not None
    routine_id = current.id
    before = current.to_dict()
    if change.body:
        client.update_routine(
            routine_id, change.body, etag=current.etag, match_condition=MatchConditions.IfNotModified
        )
    if change.state == "enabled":
        client.enable_routine(routine_id)
    elif change.state == "disabled":
        client.disable_routine(routine_id)

    def undo() -> None:
        if change.state == "enabled":
            client.disable_routine(routine_id)
        elif change.state == "disabled":
            client.enable_routine(routine_id)
        if change.body:
            restore = {key: before.get(key) for key in change.body}
            client.update_routine(routine_id, restore)

    return undo


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    if value is _DEFAULT:
        return "(default)"
    return json.dumps(value, ensure_ascii=False)


def _raw(value: Any) -> Any:
    return None if value is _MISSING or value is _DEFAULT else value
