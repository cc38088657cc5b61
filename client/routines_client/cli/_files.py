"""Routines as code: reading YAML and JSON routine files, and checking them before anything changes.

A file holds one routine (a mapping), a list of routines, or (YAML) several documents of either. The
routine is written as the API's JSON (``name``, ``trigger``, ``actions``, policies, and optionally
``state: enabled|disabled``). Every problem is reported with its file and line, all of them at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from routines_client._operations import ROUTINE_FIELDS

SUFFIXES = (".yaml", ".yml", ".json")
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
FILE_FIELDS = frozenset(ROUTINE_FIELDS) | {"state"}
_AGENT_STEPS = ("invocation", "response")


class InputError(Exception):
    """Routine files that cannot be used; ``problems`` lists each one as ``file:line: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RoutineDoc:
    """One routine read from a file: its JSON body and where it was written."""

    body: dict[str, Any]
    source: str  # "path:line" (YAML), "path[index]" or "path" (JSON)

    @property
    def name(self) -> str:
        return str(self.body["name"])


def collect(paths: list[str]) -> list[Path]:
    """The files named, and the ``.yaml`` / ``.yml`` / ``.json`` files of the directories named (not
    recursive), sorted, each once."""
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(f"{raw}: no such file or directory")
    if missing:
        raise InputError(missing)
    if not files:
        raise InputError([f"{', '.join(paths)}: no .yaml, .yml or .json files"])
    return list(dict.fromkeys(files))


def load(paths: list[str]) -> list[RoutineDoc]:
    """Every routine of the files, checked; :raises InputError: listing every problem found."""
    problems: list[str] = []
    docs: list[RoutineDoc] = []
    for path in collect(paths):
        try:
            items = _read(path)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        for value, place in items:
            where = f"{path}{place}"
            found = check_routine(value)
            if found:
                problems.extend(f"{where}: {p}" for p in found)
            else:
                docs.append(RoutineDoc(_plain(value), where))
    seen: dict[str, str] = {}
    for doc in docs:
        if doc.name in seen:
            problems.append(f"{doc.source}: name {doc.name!r} is already used at {seen[doc.name]}")
        seen.setdefault(doc.name, doc.source)
    if problems:
        raise InputError(problems)
    return docs


def _read(path: Path) -> list[tuple[Any, str]]:
    """(value, where in the file: ``:<line>`` in YAML, ``[<index>]`` in a JSON list) of each routine
    written in ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([f"{path}: cannot read: {exc}"]) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
        if isinstance(data, list):
            return [(item, f"[{index}]") for index, item in enumerate(data)]
        return [(data, "")]
    out: list[tuple[Any, str]] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            value = loader.construct_document(node)
            if isinstance(node, yaml.SequenceNode):
                out.extend((v, f":{n.start_mark.line + 1}") for v, n in zip(value, node.value, strict=True))
            elif value is not None:
                out.append((value, f":{node.start_mark.line + 1}"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise InputError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise InputError([f"{path}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return out


def check_routine(value: Any) -> list[str]:
    """What is wrong with one routine as written, before the server sees it: the shape the CLI relies
    on (a name to match by, a trigger, agent steps naming their agent). The server checks the rest."""
    if not isinstance(value, dict):
        return [f"a routine must be a mapping, not {type(value).__name__}"]
    problems: list[str] = []
    name = value.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(
            "name: required, 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
        )
    problems.extend(f"{key}: unknown field" for key in value if key not in FILE_FIELDS)
    if value.get("state") not in (None, "enabled", "disabled"):
        problems.append("state: must be enabled or disabled")
    trigger = value.get("trigger")
    if not isinstance(trigger, dict) or not isinstance(trigger.get("type"), str):
        problems.append("trigger: required, a mapping with a type (schedule, timer, webhook)")
    actions = value.get("actions")
    if not isinstance(actions, list) or not actions:
        problems.append("actions: required, a non-empty list")
        return problems
    for index, action in enumerate(actions):
        if not isinstance(action, dict) or not isinstance(action.get("type"), str):
            problems.append(
                f"actions.{index}: must be a mapping with a type (invocation, response, approval)"
            )
            continue
        if action["type"] in _AGENT_STEPS:
            if ("agent_id" in action) == ("agent_name" in action):
                problems.append(f"actions.{index}: give exactly one of agent_id or agent_name")
            if "input" not in action:
                problems.append(f"actions.{index}.input: required")
    return problems


def _plain(value: Any) -> Any:
    """YAML's dates and times as the RFC 3339 text the API takes."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
