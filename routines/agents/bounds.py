"""What every backend's answer goes through before the dispatcher acts on it.

* A total deadline: the dispatcher waits for ``start`` / ``poll`` no longer than the call's deadline
  (plus ``GRACE`` for the backend to raise its own timeout). Per-read socket timeouts alone let an agent
  that trickles its answer hold a call open past the attempt's lease, and a redelivery would then start
  the agent a second time. A call given up on keeps its thread until the backend's own timeouts end it;
  its result is dropped (the retry carries the same idempotency key).
* Bounds on agent-supplied values: ids the routine or the run row could not store, and handles larger
  than a queue message should carry, fail the attempt with a clear error instead of breaking reads later;
  the output is cut to what a run keeps (``OUTPUT_LIMIT_BYTES``).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import json
from collections.abc import Callable
from datetime import datetime

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.wire import cap_utf8
from routines.errors import AgentError
from routines.models import OUTPUT_LIMIT_BYTES

__all__ = ["checked", "within_deadline"]

GRACE = 2.0  # seconds past the deadline a backend may take to raise its own timeout
MAX_THREAD_ID_CHARS = 128  # what a response action's ``thread_id`` may hold
MAX_RUN_ID_CHARS = 256
MAX_HANDLE_BYTES = 1024
CALL_THREADS = 64  # calls in flight at once, abandoned ones included

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="agent-call")


def within_deadline(
    fn: Callable[[], AgentOutcome], call: AgentCall, clock: Callable[[], datetime]
) -> AgentOutcome:
    """``fn()``, or a retriable ``AgentError`` once ``call.deadline`` (+ ``GRACE``) has passed.

    Runs ``fn`` on a worker thread in the caller's context (its span stays the parent of the call's)."""
    if call.deadline is None:
        return fn()
    seconds = (call.deadline - clock()).total_seconds() + GRACE
    future = _pool.submit(contextvars.copy_context().run, fn)
    try:
        return future.result(timeout=max(0.0, seconds))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise AgentError(
            f"agent {call.agent!r} did not answer by the call's deadline {call.deadline.isoformat()}",
            retriable=True,
        ) from None


def checked(outcome: AgentOutcome, call: AgentCall) -> AgentOutcome:
    """``outcome`` with its output cut to what a run keeps, if every agent-supplied value fits where it
    will be stored; else a non-retriable ``AgentError`` that says which value and why."""
    _check_id(call, "thread_id", outcome.thread_id, MAX_THREAD_ID_CHARS)
    _check_id(call, "run id", outcome.agent_run_id, MAX_RUN_ID_CHARS)
    if outcome.handle is not None:
        try:
            size = len(json.dumps(outcome.handle, ensure_ascii=False, allow_nan=False).encode())
        except (TypeError, ValueError):
            raise AgentError(f"agent {call.agent!r}: the run handle is not JSON", retriable=False) from None
        if size > MAX_HANDLE_BYTES:
            raise AgentError(
                f"agent {call.agent!r}: the run handle is {size} bytes; at most {MAX_HANDLE_BYTES} are kept",
                retriable=False,
            )
    if outcome.output is not None:
        outcome = dataclasses.replace(outcome, output=cap_utf8(outcome.output, OUTPUT_LIMIT_BYTES))
    return outcome


def _check_id(call: AgentCall, what: str, value: str | None, limit: int) -> None:
    if value is None:
        return
    if len(value) > limit:
        raise AgentError(
            f"agent {call.agent!r} returned a {what} of {len(value)} characters; at most {limit} are allowed",
            retriable=False,
        )
    if not value.isprintable():
        raise AgentError(f"agent {call.agent!r} returned a {what} with control characters", retriable=False)
