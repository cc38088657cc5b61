"""The Foundry agent backend (SPEC section 7).

``FoundryBackend`` routes each call by its agent reference:

- ``agent_name`` (+ ``agent_version``): Foundry agents addressed by name, through the Responses API of
  the OpenAI client that ``azure-ai-projects`` hands out (``foundry_responses.NamedAgents``);
- ``agent_id`` starting ``asst_``: classic agents, threads and runs of ``azure-ai-agents``
  (``foundry_classic.ClassicAgents``).

Both start the agent in the background and return a pending outcome; the dispatcher polls later from a
delayed queue message. The SDKs' own retries are off: a create-run POST retried by the SDK could start
the agent twice, and the routine's retry policy with its idempotency key replaces them. This module also
holds the pure helpers both protocols share: run metadata, input encoding, error classification.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.pipeline.policies import HTTPPolicy, SansIOHTTPPolicy

from routines.agents.base import AgentBackend, AgentCall, AgentOutcome
from routines.errors import AgentError

__all__ = ["FoundryBackend", "credential_for"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
PipelinePolicy = HTTPPolicy[Any, Any] | SansIOHTTPPolicy[Any, Any]

POLL_INTERVAL_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 30.0
# The dispatcher keeps 4 KiB of the output; this only stops a runaway agent from handing it megabytes.
MAX_OUTPUT_BYTES = 32 * 1024

METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512

# Failure codes of a run or response that say "try again later" rather than "this input is wrong".
RETRIABLE_FAILURE_CODES = frozenset(
    {
        "server_error",
        "internal_error",
        "internal_server_error",
        "service_unavailable",
        "rate_limit_exceeded",
        "too_many_requests",
        "timeout",
        "vector_store_timeout",
    }
)


T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- pure helpers shared by both protocols -------------------------------------------------------


def run_metadata(call: AgentCall) -> dict[str, str]:
    """The metadata every thread, conversation, run and response of ``call`` carries.

    ``idempotency_key`` is the same for every attempt of a fire, so the agent side can recognise a retry.
    """
    return limit_metadata(
        {
            "idempotency_key": call.idempotency_key,
            "routine_id": call.routine_id,
            "run_id": call.run_id,
            "action_index": str(call.action_index),
            "attempt": str(call.attempt),
        }
    )


def limit_metadata(pairs: Mapping[str, str]) -> dict[str, str]:
    """Fit ``pairs`` into the service limits: 16 pairs, keys up to 64 and values up to 512 characters.

    Keys are ours, so an over-long or surplus key is a programming error (``ValueError``); values come
    from users and are truncated.
    """
    if len(pairs) > METADATA_MAX_PAIRS:
        raise ValueError(f"metadata holds {len(pairs)} pairs, at most {METADATA_MAX_PAIRS} are allowed")
    limited: dict[str, str] = {}
    for key, value in pairs.items():
        if not key or len(key) > METADATA_MAX_KEY_CHARS:
            raise ValueError(f"metadata key {key!r} must be 1 to {METADATA_MAX_KEY_CHARS} characters")
        limited[key] = value[:METADATA_MAX_VALUE_CHARS]
    return limited


def input_text(call: AgentCall) -> str:
    """The action's input as the user message text: a string as is, an object as compact JSON."""
    if isinstance(call.input, str):
        return call.input
    return json.dumps(call.input, ensure_ascii=False, separators=(",", ":"))


def cap_output(text: str, max_bytes: int = MAX_OUTPUT_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def retry_after_seconds(headers: Mapping[str, str], now: datetime) -> float | None:
    """The server's back-off hint in seconds: ``retry-after-ms``, else ``Retry-After`` (seconds or date)."""
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = headers.get(name)
        if raw:
            try:
                return max(0.0, float(raw) / 1000.0)
            except ValueError:
                pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def is_retriable_status(status: int | None) -> bool:
    """408, 429 and 5xx are worth another attempt; so is no status at all (connection error, timeout)."""
    return status is None or status in (408, 429) or status >= 500


def http_error(
    what: str, status: int | None, detail: str, *, code: str | None = None, retry_after: float | None = None
) -> AgentError:
    """The ``AgentError`` for a failed HTTP call ``what`` (``status`` None: no answer at all)."""
    answer = f"HTTP {status}" if status is not None else "no answer"
    code_part = f" ({code})" if code else ""
    return AgentError(
        f"{what} failed: {answer}{code_part}: {detail}",
        retriable=is_retriable_status(status),
        retry_after=retry_after,
    )


def run_failure(what: str, code: str | None, message: str | None) -> AgentError:
    """The ``AgentError`` for an agent run that ended ``failed`` with the error ``code``.

    Server and rate-limit codes are retriable; so is a failure without any code, since a rejected input
    always comes with one. Every other code (``invalid_prompt``, content filters...) is the input's fault.
    """
    retriable = code is None or code.lower() in RETRIABLE_FAILURE_CODES
    return AgentError(
        f"{what} failed: {code or 'no error code'}: {message or 'no message'}",
        retriable=retriable,
    )


def poll_delay(call: AgentCall, now: datetime, interval: float) -> float:
    """Seconds to wait before the next poll: ``interval``, but never past the call's deadline."""
    if call.deadline is None:
        return interval
    remaining = (call.deadline - now).total_seconds()
    return max(0.0, min(interval, remaining))


def poll_again(
    call: AgentCall,
    handle: dict[str, Any],
    error: AgentError,
    *,
    now: datetime,
    interval: float,
    thread_id: str,
    agent_run_id: str,
) -> AgentOutcome:
    """The outcome of a poll whose request failed for a passing reason (5xx, 429, no answer).

    The run itself is most likely still going, so look again later (after ``Retry-After`` when given)
    instead of failing the attempt: a new attempt would start a second run of the agent.
    """
    wait = max(interval, error.retry_after or 0.0)
    return AgentOutcome(
        done=False,
        thread_id=thread_id,
        agent_run_id=agent_run_id,
        handle=handle,
        poll_after=poll_delay(call, now, wait),
    )


def is_past_deadline(call: AgentCall, now: datetime) -> bool:
    return call.deadline is not None and now >= call.deadline


def timed_out(what: str, call: AgentCall) -> AgentError:
    deadline = call.deadline.isoformat() if call.deadline else "?"
    return AgentError(f"{what} timed out: not finished by the deadline {deadline}", retriable=True)


class PollingProtocol:
    """What both Foundry protocols share: checking a started run against the call's deadline."""

    _clock: Clock
    _poll_interval: float

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        raise NotImplementedError

    def _translate_errors(self, what: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _poll_run(
        self,
        call: AgentCall,
        handle: dict[str, Any],
        what: str,
        read: Callable[[], T],
        settle: Callable[[T], AgentOutcome],
        *,
        thread_id: str,
        agent_run_id: str,
    ) -> AgentOutcome:
        """``read`` the run's state and ``settle`` it into an outcome. A read that fails for a passing
        reason polls again (the run is most likely still going); past the deadline the run is
        cancelled and the attempt times out (retriable)."""
        try:
            with self._translate_errors(what):
                state = read()
        except AgentError as exc:
            if not exc.retriable:
                raise
            if is_past_deadline(call, self._clock()):
                self.cancel(call, handle)
                raise timed_out(what, call) from exc
            log.warning("%s; polling again", exc)
            return poll_again(
                call,
                handle,
                exc,
                now=self._clock(),
                interval=self._poll_interval,
                thread_id=thread_id,
                agent_run_id=agent_run_id,
            )
        outcome = settle(state)
        if not outcome.done and is_past_deadline(call, self._clock()):
            self.cancel(call, handle)
            raise timed_out(what, call)
        return outcome


def handle_str(handle: Mapping[str, Any], key: str) -> str:
    """A required string field of a poll handle; a malformed handle is not worth retrying."""
    value = handle.get(key)
    if not isinstance(value, str) or not value:
        raise AgentError(f"poll handle {dict(handle)!r} has no {key!r}", retriable=False)
    return value


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
        # Imported here: both modules import the helpers above from this one.
        from routines.agents.foundry_classic import ClassicAgents
        from routines.agents.foundry_responses import NamedAgents

        policies = list(per_call_policies or [])
        self.named: NamedAgents = NamedAgents(
            endpoint,
            credential,
            per_call_policies=policies,
            timeout=timeout,
            poll_interval=poll_interval,
            clock=clock,
        )
        self.classic: ClassicAgents = ClassicAgents(
            endpoint,
            credential,
            per_call_policies=policies,
            timeout=timeout,
            poll_interval=poll_interval,
            clock=clock,
        )

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
