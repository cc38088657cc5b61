"""The client's errors, read from the API's ``application/problem+json`` answers.

Each is also the matching ``azure-core`` error (``NotFoundError`` is a ``ResourceNotFoundError``, every
one is an ``HttpResponseError``), so code written against other Azure SDKs catches them as it expects.
An endpoint that cannot be reached raises ``azure-core``'s ``ServiceRequestError`` as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)

__all__ = [
    "ConflictError",
    "FieldError",
    "NotFoundError",
    "PreconditionFailedError",
    "RoutinesError",
    "ValidationError",
    "error_from_response",
]


@dataclass(frozen=True)
class FieldError:
    """One entry of a problem's ``errors``: where (``loc``, e.g. ``["trigger", "cron_expression"]``)
    and what is wrong (``msg``)."""

    loc: list[str | int]
    msg: str

    @property
    def where(self) -> str:
        return ".".join(str(part) for part in self.loc) or "body"


class RoutinesError(HttpResponseError):
    """The API answered with an error. ``status`` is the HTTP status, ``title`` and ``detail`` come
    from the problem document (``problem``, the whole parsed body), ``errors`` lists field errors,
    ``response`` is the HTTP response."""

    def __init__(self, message: str | None = None, response: Any = None, **kwargs: Any) -> None:
        self.problem: dict[str, Any] = _problem(response)
        self.status: int | None = getattr(response, "status_code", None)
        self.title: str = str(self.problem.get("title") or getattr(response, "reason", None) or "Error")
        self.detail: str | None = _text(self.problem.get("detail"))
        self.errors: list[FieldError] = [
            FieldError(loc=list(e.get("loc") or []), msg=str(e.get("msg", "")))
            for e in self.problem.get("errors") or []
            if isinstance(e, dict)
        ]
        super().__init__(message=message or self._summary(), response=response, **kwargs)

    def __str__(self) -> str:
        # One line: the summary already says what the problem document says (azure-core's own
        # __str__ appends the raw body).
        return str(self.message)

    def _summary(self) -> str:
        text = f"{self.status} {self.title}" if self.status else self.title
        if self.detail:
            text += f": {self.detail}"
        more = len(self.errors) - 1 if self.detail and self.errors else len(self.errors)
        if more > 0:
            shown = self.errors[-more:]
            text += "; " + "; ".join(f"{e.where}: {e.msg}" for e in shown[:3])
            if more > 3:
                text += f" (and {more - 3} more)"
        return text


class NotFoundError(RoutinesError, ResourceNotFoundError):
    """``404``: no such routine, run or step."""


class ConflictError(RoutinesError, ResourceExistsError):
    """``409``: the name is taken, a completed timer cannot be enabled, the step is not waiting."""


class PreconditionFailedError(RoutinesError, ResourceModifiedError):
    """``412``: the routine changed since the ``etag`` was read (``If-Match`` did not match)."""


class ValidationError(RoutinesError):
    """``422`` (or ``400``): the request was refused as invalid; ``errors`` names each field (``loc``)."""


_BY_STATUS: dict[int, type[RoutinesError]] = {
    400: ValidationError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    422: ValidationError,
}


def error_from_response(response: Any) -> RoutinesError:
    """The error for a response with a status of 400 or more."""
    return _BY_STATUS.get(response.status_code, RoutinesError)(response=response)


def _problem(response: Any) -> dict[str, Any]:
    if response is None:
        return {}
    try:
        body = response.json()
    except Exception:  # not JSON (a proxy's HTML page, an empty body)
        text = _text(_safe_text(response))
        return {"detail": text[:300]} if text else {}
    return body if isinstance(body, dict) else {}


def _safe_text(response: Any) -> str | None:
    try:
        return str(response.text())
    except Exception:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None
