"""Classic Foundry agents (``asst_...``): threads and runs through ``azure-ai-agents``.

invocation: ``POST /threads/runs`` (a new thread with the input as its first message, and a run).
response: ``POST /threads/{id}/messages`` then ``POST /threads/{id}/runs`` on the call's thread, or a
new thread when there is none, the thread is gone, or it holds more than ``max_thread_messages``.
Polling is ours (``GET /threads/{id}/runs/{run}``); the SDK's ``*_process_run`` helpers poll with no
deadline and are not used. Microsoft retires this API on 2027-03-31.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from azure.ai.agents import AgentsClient
from azure.ai.agents.models import (
    AgentThreadCreationOptions,
    ListSortOrder,
    MessageRole,
    MessageTextContent,
    RunStatus,
    ThreadMessage,
    ThreadMessageOptions,
    ThreadRun,
)
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.foundry.common import (
    Clock,
    PipelinePolicy,
    PollingProtocol,
    cap_output,
    handle_str,
    http_error,
    input_text,
    poll_delay,
    run_failure,
    run_metadata,
)
from routines.agents.wire import retry_after_seconds
from routines.errors import AgentError

log = logging.getLogger(__name__)

PENDING_STATUSES = frozenset({"queued", "in_progress", "cancelling"})
MAX_PAGE_SIZE = 100  # the service's largest page of messages


class ClassicAgents(PollingProtocol):
    """``AgentBackend`` for classic agents. Handle: ``{"kind": "thread_run", "thread_id", "run_id"}``."""

    def __init__(
        self,
        endpoint: str,
        credential: TokenCredential,
        *,
        per_call_policies: Sequence[PipelinePolicy],
        timeout: float,
        poll_interval: float,
        clock: Clock,
    ) -> None:
        self._client = AgentsClient(
            endpoint,
            credential,
            retry_total=0,  # azure-core would retry a create-run POST on 500/503/504
            per_call_policies=list(per_call_policies),
            connection_timeout=timeout,
            read_timeout=timeout,
        )
        self._poll_interval = poll_interval
        self._clock = clock

    def close(self) -> None:
        self._client.close()

    def start(self, call: AgentCall) -> AgentOutcome:
        """Start a run of ``call.agent_id``; returns the run pending (or settled). Raises ``AgentError``."""
        agent_id = call.agent_id or ""
        metadata = run_metadata(call)
        text = input_text(call)
        thread_id = call.thread_id if call.action_type == "response" else None
        with self._translate_errors(f"classic agent {agent_id}"):
            if thread_id is not None and self._thread_has_room(thread_id, call.max_thread_messages):
                self._client.messages.create(
                    thread_id, role=MessageRole.USER, content=text, metadata=metadata
                )
                run = self._client.runs.create(thread_id, agent_id=agent_id, metadata=metadata)
            else:
                thread = AgentThreadCreationOptions(
                    messages=[ThreadMessageOptions(role=MessageRole.USER, content=text, metadata=metadata)],
                    metadata=metadata,
                )
                run = self._client.create_thread_and_run(agent_id=agent_id, thread=thread, metadata=metadata)
            return self._settle(call, run, self._output_of(run))

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        """``GET`` the run: done, still pending, or ``AgentError`` (failed, or timed out and cancelled)."""
        thread_id = handle_str(handle, "thread_id")
        run_id = handle_str(handle, "run_id")
        what = f"classic agent {call.agent_id} run {run_id}"

        def read() -> tuple[ThreadRun, str | None]:
            run = self._client.runs.get(thread_id, run_id)
            return run, self._output_of(run)

        return self._poll_run(
            call,
            handle,
            what,
            read,
            lambda state: self._settle(call, *state),
            thread_id=thread_id,
            agent_run_id=run_id,
        )

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        """``POST .../cancel``, best effort. Never raises."""
        try:
            self._client.runs.cancel(handle["thread_id"], handle["run_id"])
        except Exception as exc:  # cancel is a courtesy: the run stays failed or timed out either way
            log.warning("could not cancel classic run %r: %s", handle, exc)

    def _output_of(self, run: ThreadRun) -> str | None:
        """The final text of a completed ``run``; None while it is not completed."""
        return self._final_text(run) if _status(run) == "completed" else None

    def _settle(self, call: AgentCall, run: ThreadRun, output: str | None) -> AgentOutcome:
        """The outcome for ``run`` with its final ``output``: done, pending, or ``AgentError``."""
        status = _status(run)
        what = f"classic agent {call.agent_id} run {run.id} on thread {run.thread_id}"
        if status == "completed":
            return AgentOutcome(
                done=True,
                output=output or "",
                thread_id=run.thread_id,
                agent_run_id=run.id,
            )
        if status == "failed":
            error = run.last_error
            raise run_failure(what, error.code if error else None, error.message if error else None)
        if status == "requires_action":
            # A tool call Routines cannot answer; the run would wait for it until it expires.
            handle = {"kind": "thread_run", "thread_id": run.thread_id, "run_id": run.id}
            self.cancel(call, handle)
            raise AgentError(
                f"{what} requires action (a client-side function tool call), which Routines cannot "
                "answer; give the agent only server-side tools. The run was cancelled",
                retriable=False,
            )
        if status == "expired":
            raise AgentError(f"{what} expired before it finished", retriable=True)
        if status == "cancelled":
            raise AgentError(f"{what} was cancelled", retriable=False)
        if status not in PENDING_STATUSES:
            log.warning("%s has unknown status %r; polling on", what, status)
        return AgentOutcome(
            done=False,
            thread_id=run.thread_id,
            agent_run_id=run.id,
            handle={"kind": "thread_run", "thread_id": run.thread_id, "run_id": run.id},
            poll_after=poll_delay(call, self._clock(), self._poll_interval),
        )

    def _final_text(self, run: ThreadRun) -> str:
        """The text of the newest assistant message ``run`` wrote (empty when it wrote none)."""
        messages = self._client.messages.list(
            run.thread_id, run_id=run.id, order=ListSortOrder.DESCENDING, limit=20
        )
        first_page: Iterator[ThreadMessage] = next(messages.by_page(), iter(()))
        for message in first_page:
            if message.role == MessageRole.AGENT:
                parts = [c.text.value for c in message.content or [] if isinstance(c, MessageTextContent)]
                return cap_output("".join(parts))
        return ""

    def _thread_has_room(self, thread_id: str, max_messages: int | None) -> bool:
        """Whether a response may go on ``thread_id``: it exists and holds at most ``max_messages``.

        Counts page by page and stops as soon as the count passes the limit, so a long thread costs
        ``max_messages / 100 + 1`` requests at most.
        """
        page_size = min(MAX_PAGE_SIZE, (max_messages or 0) + 1)
        try:
            if max_messages is None:
                self._client.threads.get(thread_id)
                return True
            pages = self._client.messages.list(thread_id, limit=page_size).by_page()
            count = 0
            for page in pages:
                on_page = sum(1 for _ in page)
                count += on_page
                if count > max_messages or on_page < page_size:
                    break
        except ResourceNotFoundError:
            log.info("thread %s is gone; the response starts a new thread", thread_id)
            return False
        if count > max_messages:
            log.info("thread %s holds over %d messages; starting a new thread", thread_id, max_messages)
            return False
        return True

    @contextmanager
    def _translate_errors(self, what: str) -> Iterator[None]:
        """Turn azure-core errors into ``AgentError``; ours pass through."""
        try:
            yield
        except HttpResponseError as exc:
            status = exc.status_code
            headers: Mapping[str, str] = getattr(exc.response, "headers", None) or {}
            code = exc.error.code if exc.error is not None else None
            detail = (exc.error.message if exc.error is not None else None) or exc.reason or "no detail"
            raise http_error(
                what,
                status,
                detail,
                code=code,
                retry_after=retry_after_seconds(headers, self._clock()),
            ) from exc
        except AzureError as exc:  # connection refused, timeouts, token errors: no HTTP status
            raise http_error(what, None, str(exc.message)) from exc


def _status(run: ThreadRun) -> str:
    """The run's status as its wire string (the SDK hands out ``RunStatus`` members for known ones)."""
    return run.status.value if isinstance(run.status, RunStatus) else str(run.status)
