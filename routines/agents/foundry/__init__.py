"""The Foundry agent backend.

``FoundryBackend`` routes each call by its agent reference:

- ``agent_name`` (+ ``agent_version``): Foundry agents addressed by name, through the Responses API of
  the OpenAI client that ``azure-ai-projects`` hands out (``responses.NamedAgents``);
- ``agent_id`` starting ``asst_``: classic agents, threads and runs of ``azure-ai-agents``
  (``classic.ClassicAgents``).

Both start the agent in the background and return a pending outcome; the dispatcher polls later from a
delayed queue message. The SDKs' own retries are off: a create-run POST retried by the SDK could start
the agent twice, and the routine's retry policy with its idempotency key replaces them. What both
protocols share is in ``common``. This package imports the Foundry SDKs: the app imports it only when
``ROUTINES_AGENT_BACKEND`` is ``foundry``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.credentials import TokenCredential

from routines.agents.base import AgentBackend, AgentCall, AgentOutcome
from routines.agents.foundry.classic import ClassicAgents
from routines.agents.foundry.common import (
    POLL_INTERVAL_SECONDS,
    REQUEST_TIMEOUT_SECONDS,
    Clock,
    PipelinePolicy,
    utc_now,
)
from routines.agents.foundry.responses import NamedAgents
from routines.errors import AgentError

__all__ = ["FoundryBackend", "credential_for"]

log = logging.getLogger(__name__)

# --- credential ----------------------------------------------------------------------------------

_credentials: dict[str | None, TokenCredential] = {}
_credentials_lock = threading.Lock()


def credential_for(client_id: str | None) -> TokenCredential:
    """The process-wide ``DefaultAzureCredential`` for the managed identity ``client_id``.

    Created once per process and client id: every credential has its own token cache, so creating
    one per dispatch would fetch a token per dispatch. ``None`` means the system-assigned identity (or
    whatever ``DefaultAzureCredential`` finds first locally, such as an ``az login``).
    """
    with _credentials_lock:
        credential = _credentials.get(client_id)
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=client_id)
            _credentials[client_id] = credential
        return credential


# --- the backend ---------------------------------------------------------------------------------


class FoundryBackend:
    """``AgentBackend`` for a Foundry project: agents by name (Responses API) and classic agents.

    Clients are created once, here, and shared by concurrent dispatches (the OpenAI and azure-core
    clients are safe to share between threads). ``per_call_policies`` go into the azure-core
    pipeline of the classic client (tests pass one that allows plain-http loopback); ``timeout`` bounds
    every HTTP request; ``poll_interval`` is the suggested delay before a poll; ``clock`` is read for
    deadlines and ``Retry-After`` dates.
    """

    def __init__(
        self,
        endpoint: str,
        credential: TokenCredential,
        *,
        per_call_policies: Sequence[PipelinePolicy] | None = None,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        clock: Clock = utc_now,
    ) -> None:
        options: dict[str, Any] = {
            "per_call_policies": list(per_call_policies or []),
            "timeout": timeout,
            "poll_interval": poll_interval,
            "clock": clock,
        }
        self.named: NamedAgents = NamedAgents(endpoint, credential, **options)
        self.classic: ClassicAgents = ClassicAgents(endpoint, credential, **options)

    def start(self, call: AgentCall) -> AgentOutcome:
        """Start the agent run for ``call``; pending with a handle (or done). Raises ``AgentError``."""
        return self._backend_for_call(call).start(call)

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        """Check the run ``handle`` names; past ``call.deadline`` cancel it and raise a retriable timeout."""
        return self._backend_for_handle(handle).poll(call, handle)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        """Best-effort cancel of the run ``handle`` names. Never raises."""
        try:
            backend = self._backend_for_handle(handle)
        except AgentError:
            log.warning("cannot cancel: unknown handle %r", handle)
            return
        backend.cancel(call, handle)

    def close(self) -> None:
        """Release the HTTP connections of both clients."""
        self.named.close()
        self.classic.close()

    def _backend_for_call(self, call: AgentCall) -> AgentBackend:
        if call.agent_name:
            return self.named
        if call.agent_id and call.agent_id.startswith("asst_"):
            return self.classic
        raise AgentError(
            f"routine {call.routine_id} action {call.action_index}: agent_id {call.agent_id!r} is not a "
            "classic Foundry agent id (asst_...); address Foundry agents by name with agent_name",
            retriable=False,
        )

    def _backend_for_handle(self, handle: Mapping[str, Any]) -> AgentBackend:
        kind = handle.get("kind")
        if kind == "response":
            return self.named
        if kind == "thread_run":
            return self.classic
        raise AgentError(f"poll handle {dict(handle)!r} is not a Foundry handle", retriable=False)
