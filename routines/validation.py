"""pydantic's validation errors as the API's error items: ``{"loc": [...], "msg": "..."}``."""

from __future__ import annotations

import json
import re
from typing import Any

import pydantic

from routines.errors import Invalid
from routines.models import RuleError

_TAGS = {"schedule", "timer", "invocation", "response", "approval", "Condition"}
# The location parts pydantic adds for the members of a plain union (``str | dict[str, Any]``).
_UNION_MEMBER = re.compile(r"^(?:function-|union\[|(?:str|int|float|bool|none|dict|list)(?:\[.*\])?$)")


def _loc(loc: tuple[Any, ...]) -> list[Any]:
    """pydantic's location without discriminator or union-member tags:
    ``trigger.schedule.cron_expression`` -> ``["trigger", "cron_expression"]``,
    ``actions.0.input.dict[str,any]`` -> ``["actions", 0, "input"]``."""
    out: list[Any] = []
    for part in loc:
        if isinstance(part, str) and (part in _TAGS or _UNION_MEMBER.match(part)):
            continue
        out.append(part)
    return out


def validation_errors(exc: pydantic.ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """One error per location: a value that matches no member of a union (``input``: a string or an
    object) gets one error whose message lists what each member wanted."""
    errors: list[dict[str, Any]] = []
    by_loc: dict[str, dict[str, Any]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        loc = _loc(prefix + tuple(err["loc"]))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleError):  # a rule between fields (or steps): the field it names
            loc = [*loc, *cause.loc]
        key = json.dumps(loc)
        if key in by_loc:
            by_loc[key]["msg"] += f"; or {msg[:1].lower()}{msg[1:]}"
            continue
        by_loc[key] = {"loc": loc, "msg": msg}
        errors.append(by_loc[key])
    return errors


def invalid(exc: pydantic.ValidationError, prefix: tuple[Any, ...] = ()) -> Invalid:
    """``exc`` as the domain's ``Invalid``, its message naming the first field."""
    errors = validation_errors(exc, prefix)
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return Invalid(f"{where}: {first['msg']}", errors)
