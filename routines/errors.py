"""The small error tree every layer raises; adapters translate SDK errors into it.

Every error Routines raises on purpose is a ``RoutinesError``; what an error carries is in attributes,
never in ``args``. Errors raised by other modules (``ScheduleError``, ``SettingsError``, ``SlotTaken``,
``PoisonMessage``, ``DevHostError``) subclass it there, next to the code that raises them.
"""

from __future__ import annotations

from typing import Any


class RoutinesError(Exception):
    """Root of every error Routines raises on purpose."""


class Refused(RoutinesError):
    """Storage refused an operation on the state it found. ``op``: the index of the failing operation
    when it came from a write plan of several (a transaction), else None."""

    def __init__(self, message: str, op: int | None = None) -> None:
        super().__init__(message)
        self.op = op


class NotFound(Refused):
    """The routine or run does not exist."""


class Conflict(Refused):
    """The write conflicts with existing state (a name taken, a row already present)."""


class PreconditionFailed(Refused):
    """A conditional write lost: the entity changed since it was read (ETag or If-Match mismatch)."""


class ValidationError(RoutinesError):
    """Input is invalid. ``errors`` holds ``{"loc": [...], "msg": "..."}`` items."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class Invalid(ValidationError):
    """A resource as given breaks a rule of the model (the API answers ``422``)."""


class Unauthorized(RoutinesError):
    """The request does not authenticate (a webhook delivery whose signature does not verify)."""


class TooLarge(RoutinesError):
    """The request is over a size limit."""


class StorageUnavailable(RoutinesError):
    """Storage could not be reached or answered with a server error.

    ``retried``: the store already tried the request again for its own retry budget, so a caller
    trying the same call again would only multiply the attempts (docs/architecture.md, retries).
    """

    def __init__(self, message: str, *, retried: bool = False) -> None:
        super().__init__(message)
        self.retried = retried


class AgentError(RoutinesError):
    """An agent call failed.

    ``retriable`` says whether the retry policy may try again; ``retry_after`` (seconds) is the
    agent's own back-off hint (``Retry-After``), honoured as a lower bound of the next delay.
    """

    def __init__(self, message: str, *, retriable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after = retry_after
