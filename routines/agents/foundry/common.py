"""What both Foundry protocols share: run metadata, input encoding, error classification, and
polling a started run against the call's deadline (``PollingProtocol``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar

from azure.core.pipeline.policies import HTTPPolicy, SansIOHTTPPolicy

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.wire import cap_utf8, is_retriable_status
from routines.errors import AgentError

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


def cap_output(text: str) -> str:
    return cap_utf8(text, MAX_OUTPUT_BYTES)


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
