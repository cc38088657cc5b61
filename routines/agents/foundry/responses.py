"""Foundry agents addressed by name: conversations and background responses (Responses API).

The OpenAI client comes from ``AIProjectClient.get_openai_client()`` (base URL ``{endpoint}/openai/v1``).
invocation: ``POST /conversations`` then ``POST /responses`` with ``conversation``, ``background: true``
and ``agent_reference``. response: the same on the call's conversation, or on a new one when there is
none, it is gone, or it holds more than ``max_thread_messages`` messages. Polling: ``GET
/responses/{id}``; cancel: ``POST /responses/{id}/cancel``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from azure.ai.projects import AIProjectClient
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError
from openai import APIConnectionError, APIStatusError, NotFoundError, OpenAIError
from openai.types.responses import Response

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

PENDING_STATUSES = frozenset({"queued", "in_progress", None})
# Output items that wait for the caller (a client-side function, an MCP approval): Routines has no one
# to answer them, so a response ending on one of these did not do its job.
CLIENT_ACTION_ITEMS = frozenset({"function_call", "mcp_approval_request", "computer_call"})
MAX_PAGE_SIZE = 100  # the service's largest page of conversation items


class NamedAgents(PollingProtocol):
    """``AgentBackend`` for agents by name.

    Handle: ``{"kind": "response", "response_id", "conversation_id"}``.
    """

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
        self._project = AIProjectClient(
            endpoint, credential, retry_total=0, per_call_policies=list(per_call_policies)
        )
        # The OpenAI client retries 408/409/429/5xx twice by default; a retried POST /responses could
        # start the agent twice.
        self._client = self._project.get_openai_client(max_retries=0, timeout=timeout)
        self._poll_interval = poll_interval
        self._clock = clock

    def close(self) -> None:
        self._client.close()
        self._project.close()

    def start(self, call: AgentCall) -> AgentOutcome:
        """Start a background response of agent ``call.agent_name``. Raises ``AgentError``."""
        agent_name = call.agent_name or ""
        metadata = run_metadata(call)
        reference: dict[str, str] = {"type": "agent_reference", "name": agent_name}
        if call.agent_version:
            reference["version"] = call.agent_version
        conversation_id = call.thread_id if call.action_type == "response" else None
        with self._translate_errors(f"agent {agent_name}"):
            if conversation_id is None or not self._conversation_has_room(
                conversation_id, call.max_thread_messages
            ):
                conversation_id = self._client.conversations.create(metadata=metadata).id
            response = self._client.responses.create(
                conversation=conversation_id,
                input=input_text(call),
                metadata=metadata,
                background=True,
                extra_body={"agent_reference": reference},
            )
            return self._settle(call, response, conversation_id)

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        """``GET`` the response: done, pending, or ``AgentError`` (failed, or timed out and cancelled)."""
        response_id = handle_str(handle, "response_id")
        conversation_id = handle_str(handle, "conversation_id")
        what = f"agent {call.agent_name} response {response_id}"
        return self._poll_run(
            call,
            handle,
            what,
            lambda: self._client.responses.retrieve(response_id),
            lambda response: self._settle(call, response, conversation_id),
            thread_id=conversation_id,
            agent_run_id=response_id,
        )

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        """``POST /responses/{id}/cancel``, best effort. Never raises."""
        try:
            self._client.responses.cancel(handle["response_id"])
        except Exception as exc:  # cancel is a courtesy: the run stays failed or timed out either way
            log.warning("could not cancel response %r: %s", handle, exc)

    def _settle(self, call: AgentCall, response: Response, conversation_id: str) -> AgentOutcome:
        """The outcome for ``response`` as it stands: done, pending, or ``AgentError``."""
        status = response.status
        what = f"agent {call.agent_name} response {response.id} in conversation {conversation_id}"
        if status == "completed":
            waiting = sorted({item.type for item in response.output} & CLIENT_ACTION_ITEMS)
            if waiting:
                raise AgentError(
                    f"{what} ended waiting for {', '.join(waiting)}, which Routines cannot answer; "
                    "give the agent only server-side tools",
                    retriable=False,
                )
            return AgentOutcome(
                done=True,
                output=cap_output(response.output_text),
                thread_id=conversation_id,
                agent_run_id=response.id,
            )
        if status == "failed":
            error = response.error
            raise run_failure(what, error.code if error else None, error.message if error else None)
        if status == "incomplete":
            details = response.incomplete_details
            reason = details.reason if details else None
            raise AgentError(f"{what} is incomplete: {reason or 'no reason given'}", retriable=False)
        if status == "cancelled":
            raise AgentError(f"{what} was cancelled", retriable=False)
        if status not in PENDING_STATUSES:
            log.warning("%s has unknown status %r; polling on", what, status)
        return AgentOutcome(
            done=False,
            thread_id=conversation_id,
            agent_run_id=response.id,
            handle={"kind": "response", "response_id": response.id, "conversation_id": conversation_id},
            poll_after=poll_delay(call, self._clock(), self._poll_interval),
        )

    def _conversation_has_room(self, conversation_id: str, max_messages: int | None) -> bool:
        """Whether a response may go on ``conversation_id``: it exists and holds at most ``max_messages``.

        Only ``message`` items count (tool calls and reasoning items do not). Counting stops as soon as
        it passes the limit.
        """
        page_size = min(MAX_PAGE_SIZE, (max_messages or 0) + 1)
        try:
            if max_messages is None:
                self._client.conversations.retrieve(conversation_id)
                return True
            page = self._client.conversations.items.list(conversation_id, limit=page_size, order="asc")
            count = 0
            while True:
                count += sum(1 for item in page.data if item.type == "message")
                if count > max_messages or len(page.data) < page_size or not page.has_next_page():
                    break
                page = page.get_next_page()
        except NotFoundError:
            log.info("conversation %s is gone; the response starts a new one", conversation_id)
            return False
        if count > max_messages:
            log.info("conversation %s holds over %d messages; starting anew", conversation_id, max_messages)
            return False
        return True

    @contextmanager
    def _translate_errors(self, what: str) -> Iterator[None]:
        """Turn OpenAI client (and token) errors into ``AgentError``; ours pass through."""
        try:
            yield
        except APIStatusError as exc:
            raise http_error(
                what,
                exc.status_code,
                exc.message,
                code=exc.code,
                retry_after=retry_after_seconds(exc.response.headers, self._clock()),
            ) from exc
        except APIConnectionError as exc:  # refused, reset, timed out
            raise http_error(what, None, exc.message) from exc
        except OpenAIError as exc:  # an answer the client could not read
            raise AgentError(f"{what} failed: {exc}", retriable=True) from exc
        except AzureError as exc:  # the token provider could not get a token
            raise http_error(what, None, str(exc.message)) from exc
