"""The agent backend interface the dispatcher drives (README, Agents).

A backend starts one agent run for one action of one attempt and reports either a finished run or a
pending one with a small JSON ``handle`` the dispatcher stores and later passes to ``poll`` from a
delayed queue message (docs/guarantees.md #6: no compute spent waiting). Backends never retry on their own:
they raise ``AgentError`` with ``retriable`` and ``retry_after`` and the routine's retry policy decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from routines.errors import AgentError

__all__ = ["AgentBackend", "AgentCall", "AgentError", "AgentOutcome"]


@dataclass(frozen=True)
class AgentCall:
    """Everything a backend needs to start (or poll) one action of one attempt."""

    routine_id: str
    run_id: str
    idempotency_key: str
    scheduled_for: datetime
    attempt: int
    action_index: int
    action_type: Literal["invocation", "response"]
    input: str | dict[str, Any]
    agent_id: str | None = None
    agent_name: str | None = None
    agent_version: str | None = None
    thread_id: str | None = None  # response actions: the thread / conversation to continue
    max_thread_messages: int | None = None  # response actions: rotate to a fresh thread above this
    traceparent: str | None = None
    deadline: datetime | None = None  # the run's timeout: give up (cancel) after this instant

    @property
    def agent(self) -> str:
        return self.agent_id or self.agent_name or ""


@dataclass(frozen=True)
class AgentOutcome:
    """``done`` with the final ``output``, or pending with a ``handle`` to poll after ``poll_after`` s.

    ``thread_id`` is the thread / conversation the run used; when it differs from the call's
    ``thread_id`` (a new thread, or a rotation past ``max_thread_messages``) the dispatcher records it
    on the routine. ``handle`` must be JSON-serialisable, small (under 1 KiB) and hold no secrets.
    """

    done: bool
    output: str | None = None
    thread_id: str | None = None
    agent_run_id: str | None = None
    handle: dict[str, Any] | None = field(default=None)
    poll_after: float = 2.0


class AgentBackend(Protocol):
    def start(self, call: AgentCall) -> AgentOutcome:
        """Start the agent run for ``call``. Raises ``AgentError``."""
        ...

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        """Check a pending run started by ``start``. Raises ``AgentError`` when the run failed."""
        ...

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        """Best-effort cancel of a pending run (timeout). Never raises."""
        ...
