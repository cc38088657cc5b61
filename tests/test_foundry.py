"""FoundryBackend driven through the real SDK clients against the local fake Foundry (tests/fake_foundry.py).

Most tests run for both agent kinds: ``classic`` (``asst_...``, threads and runs of azure-ai-agents) and
``named`` (agents by name, conversations and responses of the OpenAI client from azure-ai-projects).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.foundry import FoundryBackend, credential_for
from routines.agents.foundry.common import limit_metadata
from routines.agents.wire import cap_utf8, retry_after_seconds
from routines.errors import AgentError
from tests.fake_foundry import FakeFoundry, Outcome
from tests.helpers import Clock

NOW = datetime(2026, 11, 30, 6, 0, 1, tzinfo=UTC)
KEY = "rt_0f3c2a9d6b1e4c7a:2026-11-30T06:00:00Z"


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("t", 4102444800)  # 2100-01-01


class AllowPlainHttp(SansIOHTTPPolicy[Any, Any]):
    """Lets the bearer-token policy send to the plain-http loopback fake."""

    def on_request(self, request: PipelineRequest[Any]) -> None:
        request.context["enforce_https"] = False


@dataclass(frozen=True)
class Kind:
    name: str
    agent: dict[str, str]  # the AgentCall fields naming the agent
    create: str  # route regex of the POST that starts the agent
    get: str  # route regex of the poll
    cancel: str  # route regex of the cancel
    count: str  # route regex of the listing that counts a thread's messages
    existing: Callable[[FakeFoundry, int], str]  # a thread / conversation holding n messages
    messages: Callable[[FakeFoundry, str], list[dict[str, Any]]]  # its messages / items


CLASSIC = Kind(
    name="classic",
    agent={"agent_id": "asst_abc123"},
    create=r"/threads(/[^/]+)?/runs",
    get=r"/threads/[^/]+/runs/[^/]+",
    cancel=r"/threads/[^/]+/runs/[^/]+/cancel",
    count=r"/threads/[^/]+/messages",
    existing=lambda fake, n: fake.add_thread(n),
    messages=lambda fake, thread_id: fake.threads[thread_id],
)
NAMED = Kind(
    name="named",
    agent={"agent_name": "weekly-summary", "agent_version": "3"},
    create=r"/openai/v1/responses",
    get=r"/openai/v1/responses/[^/]+",
    cancel=r"/openai/v1/responses/[^/]+/cancel",
    count=r"/openai/v1/conversations/[^/]+/items",
    existing=lambda fake, n: fake.add_conversation(n),
    messages=lambda fake, conversation_id: fake.conversations[conversation_id],
)
KINDS = [pytest.param(CLASSIC, id="classic"), pytest.param(NAMED, id="named")]


def make_call(kind: Kind, **fields: Any) -> AgentCall:
    """An AgentCall as the dispatcher builds it: attempt 1 of the fire at 06:00 of routine rt_0f3c..."""
    values: dict[str, Any] = {
        "routine_id": "rt_0f3c2a9d6b1e4c7a",
        "run_id": "run_7a1c",
        "idempotency_key": KEY,
        "scheduled_for": datetime(2026, 11, 30, 6, 0, tzinfo=UTC),
        "attempt": 1,
        "action_index": 0,
        "action_type": "invocation",
        "input": "hello",
        **kind.agent,
    }
    values.update(fields)
    return AgentCall(**values)


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeFoundry]:
    with FakeFoundry() as server:
        yield server


@pytest.fixture(scope="module")
def shared_clock() -> Clock:
    return Clock(NOW)


@pytest.fixture(scope="module")
def shared_backend(shared_fake: FakeFoundry, shared_clock: Clock) -> Iterator[FoundryBackend]:
    # One backend for the module, as in production (one per process): building the OpenAI client
    # loads the CA bundle, which costs more than most tests here.
    instance = FoundryBackend(
        shared_fake.endpoint,
        FakeCredential(),
        per_call_policies=[AllowPlainHttp()],
        clock=shared_clock,
        timeout=5.0,
    )
    yield instance
    instance.close()


@pytest.fixture
def fake(shared_fake: FakeFoundry) -> Iterator[FakeFoundry]:
    shared_fake.reset()
    yield shared_fake
    assert shared_fake.internal_errors == []


@pytest.fixture
def clock(shared_clock: Clock) -> Clock:
    shared_clock.now = NOW
    return shared_clock


@pytest.fixture
def backend(shared_backend: FoundryBackend, fake: FakeFoundry, clock: Clock) -> FoundryBackend:
    return shared_backend


def wire(fake: FakeFoundry) -> list[tuple[str, str]]:
    return [(r.method, r.route) for r in fake.requests]


def create_bodies(fake: FakeFoundry, kind: Kind) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests_to("POST", kind.create)]


def poll_until_done(backend: FoundryBackend, call: AgentCall, outcome: AgentOutcome) -> AgentOutcome:
    for _ in range(10):
        if outcome.done:
            return outcome
        assert outcome.handle is not None
        outcome = backend.poll(call, outcome.handle)
    raise AssertionError("still pending after 10 polls")


# --- invocation and polling ----------------------------------------------------------------------


def test_classic_invocation_creates_thread_and_run_then_polls_to_the_final_text(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    call = make_call(CLASSIC)
    started = backend.start(call)
    assert not started.done
    thread_id, run_id = started.thread_id, started.agent_run_id
    assert started.handle == {"kind": "thread_run", "thread_id": thread_id, "run_id": run_id}
    assert started.poll_after == 2.0

    pending = backend.poll(call, started.handle)
    assert not pending.done
    done = backend.poll(call, started.handle)

    assert done == AgentOutcome(done=True, output="echo: hello", thread_id=thread_id, agent_run_id=run_id)
    assert wire(fake) == [
        ("POST", "/threads/runs"),
        ("GET", f"/threads/{thread_id}/runs/{run_id}"),
        ("GET", f"/threads/{thread_id}/runs/{run_id}"),
        ("GET", f"/threads/{thread_id}/messages"),
    ]
    final_text_query = fake.requests[-1].query
    assert final_text_query["run_id"] == run_id and final_text_query["order"] == "desc"
    assert all(r.query["api-version"] == "v1" for r in fake.requests)
    assert all(r.headers["authorization"] == "Bearer t" for r in fake.requests)
    body = fake.requests[0].body
    assert body["assistant_id"] == "asst_abc123"
    assert body["thread"]["messages"][0]["role"] == "user"
    assert body["thread"]["messages"][0]["content"] == "hello"


def test_named_invocation_creates_conversation_and_background_response_then_polls_to_done(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    call = make_call(NAMED)
    started = backend.start(call)
    assert not started.done
    conversation_id, response_id = started.thread_id, started.agent_run_id
    assert started.handle == {
        "kind": "response",
        "response_id": response_id,
        "conversation_id": conversation_id,
    }
    assert conversation_id in fake.conversations

    assert not backend.poll(call, started.handle).done
    done = backend.poll(call, started.handle)

    assert done == AgentOutcome(
        done=True, output="echo: hello", thread_id=conversation_id, agent_run_id=response_id
    )
    assert wire(fake) == [
        ("POST", "/openai/v1/conversations"),
        ("POST", "/openai/v1/responses"),
        ("GET", f"/openai/v1/responses/{response_id}"),
        ("GET", f"/openai/v1/responses/{response_id}"),
    ]
    assert all(r.headers["authorization"] == "Bearer t" for r in fake.requests)
    body = fake.requests[1].body
    assert body["agent_reference"] == {"type": "agent_reference", "name": "weekly-summary", "version": "3"}
    assert body["background"] is True
    assert body["conversation"] == conversation_id
    assert body["input"] == "hello"
    assert "model" not in body


def test_named_agent_without_version_sends_no_version(fake: FakeFoundry, backend: FoundryBackend) -> None:
    backend.start(make_call(NAMED, agent_version=None))
    (body,) = create_bodies(fake, NAMED)
    assert body["agent_reference"] == {"type": "agent_reference", "name": "weekly-summary"}


@pytest.mark.parametrize("kind", KINDS)
def test_object_input_is_sent_as_json_text(fake: FakeFoundry, backend: FoundryBackend, kind: Kind) -> None:
    payload = {"instructions": "Scan overnight logs", "context": {"region": "us-east-1", "note": "été"}}
    backend.start(make_call(kind, input=payload))
    sent = create_bodies(fake, kind)[0]
    sent_text = sent["input"] if kind is NAMED else sent["thread"]["messages"][0]["content"]
    assert json.loads(sent_text) == payload
    assert "été" in sent_text  # readable text, not \u escapes


# --- response actions and thread rotation ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_response_appends_to_the_existing_thread(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind
) -> None:
    thread_id = kind.existing(fake, 3)
    call = make_call(kind, action_type="response", thread_id=thread_id, max_thread_messages=10)

    started = backend.start(call)
    done = poll_until_done(backend, call, started)

    assert started.thread_id == thread_id and done.thread_id == thread_id
    assert done.output == "echo: hello"
    assert len(kind.messages(fake, thread_id)) == 5  # 3 + the input + the answer
    if kind is CLASSIC:
        assert wire(fake)[:3] == [
            ("GET", f"/threads/{thread_id}/messages"),
            ("POST", f"/threads/{thread_id}/messages"),
            ("POST", f"/threads/{thread_id}/runs"),
        ]
    else:
        assert wire(fake)[:2] == [
            ("GET", f"/openai/v1/conversations/{thread_id}/items"),
            ("POST", "/openai/v1/responses"),
        ]
        assert fake.requests[1].body["conversation"] == thread_id


@pytest.mark.parametrize(
    ("held", "limit", "rotates", "count_requests"),
    [
        pytest.param(10, 10, False, (1, 1), id="at_limit_stays"),
        pytest.param(11, 10, True, (1, 1), id="over_limit_rotates"),
        pytest.param(100, 100, False, (2, 1), id="at_limit_one_full_page_stays"),
        pytest.param(101, 100, True, (2, 2), id="one_over_a_full_page_rotates"),
        pytest.param(150, 150, False, (2, 2), id="at_limit_over_two_pages_stays"),
        pytest.param(151, 150, True, (2, 2), id="over_limit_over_two_pages_rotates"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_response_rotates_to_a_fresh_thread_past_max_thread_messages(
    fake: FakeFoundry,
    backend: FoundryBackend,
    kind: Kind,
    held: int,
    limit: int,
    rotates: bool,
    count_requests: tuple[int, int],
) -> None:
    thread_id = kind.existing(fake, held)
    call = make_call(kind, action_type="response", thread_id=thread_id, max_thread_messages=limit)

    started = backend.start(call)

    if rotates:
        assert started.thread_id != thread_id
        assert len(kind.messages(fake, thread_id)) == held  # the full thread was left alone
        assert len(kind.messages(fake, started.thread_id or "")) == 1  # the input, on the new thread
    else:
        assert started.thread_id == thread_id
        assert len(kind.messages(fake, thread_id)) == held + 1
    counts = [r for r in fake.requests_to("GET", kind.count) if "run_id" not in r.query]
    # A classic page does not say whether more follow (the SDK hides has_more): a full page costs a look
    # at the next one.
    assert len(counts) == count_requests[0 if kind is CLASSIC else 1]
    assert int(counts[0].query["limit"]) == min(100, limit + 1)


def test_named_rotation_counts_only_message_items(fake: FakeFoundry, backend: FoundryBackend) -> None:
    conversation_id = fake.add_conversation(10, other_items=30)
    call = make_call(NAMED, action_type="response", thread_id=conversation_id, max_thread_messages=10)
    assert backend.start(call).thread_id == conversation_id


@pytest.mark.parametrize("kind", KINDS)
def test_response_without_a_thread_starts_one(fake: FakeFoundry, backend: FoundryBackend, kind: Kind) -> None:
    call = make_call(kind, action_type="response", thread_id=None, max_thread_messages=10)
    started = backend.start(call)
    assert started.thread_id is not None
    assert kind.messages(fake, started.thread_id)  # it exists and holds the input
    assert fake.requests_to("GET", kind.count) == []


@pytest.mark.parametrize("kind", KINDS)
def test_response_without_a_limit_appends_without_counting(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind
) -> None:
    thread_id = kind.existing(fake, 500)
    call = make_call(kind, action_type="response", thread_id=thread_id, max_thread_messages=None)
    assert backend.start(call).thread_id == thread_id
    assert len(kind.messages(fake, thread_id)) == 501
    assert fake.requests_to("GET", kind.count) == []


@pytest.mark.parametrize("limit", [10, None])
@pytest.mark.parametrize("kind", KINDS)
def test_response_on_a_deleted_thread_starts_a_fresh_one(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, limit: int | None
) -> None:
    call = make_call(kind, action_type="response", thread_id="gone_123", max_thread_messages=limit)
    started = backend.start(call)
    assert started.thread_id not in (None, "gone_123")
    assert kind.messages(fake, started.thread_id or "")


# --- metadata and idempotency ---------------------------------------------------------------------

EXPECTED_METADATA = {
    "idempotency_key": KEY,
    "routine_id": "rt_0f3c2a9d6b1e4c7a",
    "run_id": "run_7a1c",
    "action_index": "0",
    "attempt": "1",
}


def test_classic_metadata_on_thread_message_and_run(fake: FakeFoundry, backend: FoundryBackend) -> None:
    thread_id = backend.start(make_call(CLASSIC)).thread_id or ""
    backend.start(make_call(CLASSIC, action_type="response", thread_id=thread_id, max_thread_messages=10))

    create, message, run = (r.body for r in fake.requests if r.method == "POST")
    assert create["metadata"] == EXPECTED_METADATA
    assert create["thread"]["metadata"] == EXPECTED_METADATA
    assert create["thread"]["messages"][0]["metadata"] == EXPECTED_METADATA
    assert message["metadata"] == EXPECTED_METADATA
    assert run["metadata"] == EXPECTED_METADATA


def test_named_metadata_on_conversation_and_response(fake: FakeFoundry, backend: FoundryBackend) -> None:
    started = backend.start(make_call(NAMED))
    conversation, response = (r.body for r in fake.requests)
    assert conversation["metadata"] == EXPECTED_METADATA
    assert response["metadata"] == EXPECTED_METADATA
    assert fake.conversation_metadata[started.thread_id or ""] == EXPECTED_METADATA


@pytest.mark.parametrize("kind", KINDS)
def test_long_metadata_values_are_cut_to_512_characters(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind
) -> None:
    backend.start(make_call(kind, idempotency_key="k" * 600))
    assert create_bodies(fake, kind)[0]["metadata"]["idempotency_key"] == "k" * 512


def test_limit_metadata_refuses_what_the_service_would_refuse() -> None:
    with pytest.raises(ValueError, match="at most 16"):
        limit_metadata({f"k{i}": "v" for i in range(17)})
    with pytest.raises(ValueError, match="1 to 64"):
        limit_metadata({"k" * 65: "v"})
    assert limit_metadata({"k" * 64: "v" * 513}) == {"k" * 64: "v" * 512}


@pytest.mark.parametrize("kind", KINDS)
def test_two_attempts_of_one_fire_carry_the_same_idempotency_key(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind
) -> None:
    fake.fail("POST", kind.create, 503)
    attempt_1 = make_call(kind, attempt=1)
    attempt_2 = make_call(kind, attempt=2)

    with pytest.raises(AgentError) as failed:
        backend.start(attempt_1)
    assert failed.value.retriable
    poll_until_done(backend, attempt_2, backend.start(attempt_2))

    first, second = create_bodies(fake, kind)
    assert first["metadata"]["idempotency_key"] == second["metadata"]["idempotency_key"] == KEY
    assert (first["metadata"]["attempt"], second["metadata"]["attempt"]) == ("1", "2")


# --- HTTP errors: classification, Retry-After, no SDK retries -------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("kind", KINDS)
def test_server_error_on_start_is_sent_once_and_retriable(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, status: int
) -> None:
    fake.fail("POST", kind.create, status)
    with pytest.raises(AgentError) as failed:
        backend.start(make_call(kind))
    assert failed.value.retriable
    assert f"HTTP {status}" in str(failed.value)
    assert len(fake.requests_to("POST", kind.create)) == 1  # no SDK retry


@pytest.mark.parametrize(
    ("status", "headers", "deadline_in", "poll_after"),
    [
        pytest.param(500, {}, None, 2.0, id="500"),
        pytest.param(429, {"Retry-After": "7"}, None, 7.0, id="429_retry_after"),
        pytest.param(429, {"Retry-After": "7"}, 3.0, 3.0, id="429_retry_after_past_the_deadline"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_passing_error_on_poll_polls_again_instead_of_failing_the_attempt(
    fake: FakeFoundry,
    backend: FoundryBackend,
    kind: Kind,
    status: int,
    headers: dict[str, str],
    deadline_in: float | None,
    poll_after: float,
) -> None:
    # Failing the attempt would make the dispatcher start a second run while the first one goes on.
    deadline = NOW + timedelta(seconds=deadline_in) if deadline_in is not None else None
    call = make_call(kind, deadline=deadline)
    started = backend.start(call)
    fake.fail("GET", kind.get, status, headers=headers)

    again = backend.poll(call, started.handle or {})

    assert not again.done
    assert again.handle == started.handle
    assert (again.thread_id, again.agent_run_id) == (started.thread_id, started.agent_run_id)
    assert again.poll_after == poll_after
    assert len(fake.requests_to("GET", kind.get)) == 1  # no SDK retry
    assert poll_until_done(backend, call, again).output == "echo: hello"


def test_passing_error_while_reading_the_final_text_polls_again(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    fake.script(Outcome(polls=0))
    call = make_call(CLASSIC)
    started = backend.start(call)
    fake.fail("GET", CLASSIC.count, 503)
    assert not backend.poll(call, started.handle or {}).done
    assert backend.poll(call, started.handle or {}).output == "echo: hello"


@pytest.mark.parametrize("kind", KINDS)
def test_passing_error_on_poll_past_the_deadline_cancels_and_times_out(
    fake: FakeFoundry, backend: FoundryBackend, clock: Clock, kind: Kind
) -> None:
    call = make_call(kind, deadline=NOW + timedelta(seconds=60))
    started = backend.start(call)
    fake.fail("GET", kind.get, 500)
    clock.now = NOW + timedelta(seconds=61)
    with pytest.raises(AgentError, match="timed out") as failed:
        backend.poll(call, started.handle or {})
    assert failed.value.retriable
    assert len(fake.requests_to("POST", kind.cancel)) == 1


@pytest.mark.parametrize("status", [401, 403, 404])
@pytest.mark.parametrize("kind", KINDS)
def test_client_error_on_poll_fails_for_good(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, status: int
) -> None:
    call = make_call(kind)
    started = backend.start(call)
    fake.fail("GET", kind.get, status)
    with pytest.raises(AgentError) as failed:
        backend.poll(call, started.handle or {})
    assert not failed.value.retriable


@pytest.mark.parametrize(
    ("status", "retriable"),
    [
        pytest.param(400, False, id="400"),
        pytest.param(401, False, id="401"),
        pytest.param(403, False, id="403"),
        pytest.param(404, False, id="404"),
        pytest.param(409, False, id="409"),
        pytest.param(422, False, id="422"),
        pytest.param(408, True, id="408"),
        pytest.param(429, True, id="429"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_http_status_classification(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, status: int, retriable: bool
) -> None:
    fake.fail("POST", kind.create, status)
    with pytest.raises(AgentError) as failed:
        backend.start(make_call(kind))
    assert failed.value.retriable is retriable
    assert len(fake.requests_to("POST", kind.create)) == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Retry-After": "7"}, 7.0, id="seconds"),
        pytest.param({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5, id="milliseconds_first"),
        pytest.param(
            {"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0, id="date"
        ),
        pytest.param({}, None, id="none"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_429_retry_after_is_honoured(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, headers: dict[str, str], expected: float | None
) -> None:
    body = {"error": {"code": "too_many_requests", "message": "slow down"}}
    fake.fail("POST", kind.create, 429, body=body, headers=headers)
    with pytest.raises(AgentError) as failed:
        backend.start(make_call(kind))
    assert failed.value.retriable
    assert failed.value.retry_after == expected
    assert "too_many_requests" in str(failed.value)
    assert len(fake.requests_to("POST", kind.create)) == 1  # no SDK retry, even with Retry-After


@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused_is_retriable(kind: Kind, clock: Clock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    endpoint = f"http://127.0.0.1:{port}/api/projects/p"
    backend = FoundryBackend(endpoint, FakeCredential(), per_call_policies=[AllowPlainHttp()], clock=clock)
    try:
        with pytest.raises(AgentError) as failed:
            backend.start(make_call(kind))
        assert failed.value.retriable
    finally:
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_request_timeout_is_retriable(fake: FakeFoundry, clock: Clock, kind: Kind) -> None:
    fake.fail("POST", kind.create, 500, delay=1.0)
    backend = FoundryBackend(
        fake.endpoint, FakeCredential(), per_call_policies=[AllowPlainHttp()], clock=clock, timeout=0.2
    )
    try:
        with pytest.raises(AgentError) as failed:
            backend.start(make_call(kind))
        assert failed.value.retriable
        assert len(fake.requests_to("POST", kind.create)) == 1
    finally:
        backend.close()


# --- failed runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        pytest.param("server_error", True, id="server_error"),
        pytest.param("rate_limit_exceeded", True, id="rate_limit_exceeded"),
        pytest.param("too_many_requests", True, id="too_many_requests"),
        pytest.param(None, True, id="no_code"),
        pytest.param("invalid_prompt", False, id="invalid_prompt"),
        pytest.param("content_filter", False, id="content_filter"),
        pytest.param("image_content_policy_violation", False, id="content_policy"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_failed_run_is_classified_by_its_error_code(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, code: str | None, retriable: bool
) -> None:
    fake.script(Outcome(status="failed", polls=0, error_code=code, error_message="it broke"))
    call = make_call(kind)
    with pytest.raises(AgentError) as failed:
        poll_until_done(backend, call, backend.start(call))
    assert failed.value.retriable is retriable
    assert "it broke" in str(failed.value)
    assert failed.value.retry_after is None


@pytest.mark.parametrize(
    ("kind", "status", "retriable"),
    [
        pytest.param(CLASSIC, "expired", True, id="classic_expired"),
        pytest.param(CLASSIC, "cancelled", False, id="classic_cancelled"),
        pytest.param(NAMED, "cancelled", False, id="named_cancelled"),
        pytest.param(NAMED, "incomplete", False, id="named_incomplete"),
    ],
)
def test_other_terminal_statuses(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind, status: str, retriable: bool
) -> None:
    fake.script(Outcome(status=status, polls=0))
    call = make_call(kind)
    with pytest.raises(AgentError, match=status.rstrip("d")) as failed:
        poll_until_done(backend, call, backend.start(call))
    assert failed.value.retriable is retriable


def test_classic_requires_action_fails_for_good_and_cancels_the_run(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    fake.script(Outcome(status="requires_action", polls=0))
    call = make_call(CLASSIC)
    started = backend.start(call)
    with pytest.raises(AgentError, match="requires action") as failed:
        backend.poll(call, started.handle or {})
    assert not failed.value.retriable
    assert len(fake.requests_to("POST", CLASSIC.cancel)) == 1
    assert fake.runs[started.agent_run_id or ""].cancelled


def test_named_response_ending_on_a_function_call_fails_for_good(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    function_call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": "{}",
        "status": "completed",
    }
    fake.script(Outcome(polls=0, output_text="", extra_output=[function_call]))
    call = make_call(NAMED)
    with pytest.raises(AgentError, match="function_call") as failed:
        poll_until_done(backend, call, backend.start(call))
    assert not failed.value.retriable


# --- deadline and cancel --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_poll_past_the_deadline_cancels_and_raises_a_retriable_timeout(
    fake: FakeFoundry, backend: FoundryBackend, clock: Clock, kind: Kind
) -> None:
    fake.script(Outcome(polls=10))
    call = make_call(kind, deadline=NOW + timedelta(seconds=60))
    started = backend.start(call)
    assert not backend.poll(call, started.handle or {}).done
    assert fake.requests_to("POST", kind.cancel) == []

    clock.now = NOW + timedelta(seconds=61)
    with pytest.raises(AgentError, match="timed out") as failed:
        backend.poll(call, started.handle or {})

    assert failed.value.retriable
    assert len(fake.requests_to("POST", kind.cancel)) == 1
    jobs = fake.runs if kind is CLASSIC else fake.responses
    assert jobs[started.agent_run_id or ""].cancelled


@pytest.mark.parametrize("kind", KINDS)
def test_run_finished_when_polled_after_the_deadline_is_still_done(
    fake: FakeFoundry, backend: FoundryBackend, clock: Clock, kind: Kind
) -> None:
    fake.script(Outcome(polls=0))
    call = make_call(kind, deadline=NOW + timedelta(seconds=60))
    started = backend.start(call)
    clock.now = NOW + timedelta(seconds=61)
    assert backend.poll(call, started.handle or {}).done
    assert fake.requests_to("POST", kind.cancel) == []


@pytest.mark.parametrize("kind", KINDS)
def test_poll_after_never_passes_the_deadline(fake: FakeFoundry, backend: FoundryBackend, kind: Kind) -> None:
    started = backend.start(make_call(kind, deadline=NOW + timedelta(seconds=0.5)))
    assert started.poll_after == 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_never_raises(fake: FakeFoundry, backend: FoundryBackend, kind: Kind) -> None:
    call = make_call(kind)
    started = backend.start(call)
    handle = started.handle or {}
    fake.fail("POST", kind.cancel, 500)
    backend.cancel(call, handle)  # server error
    poll_until_done(backend, call, started)
    backend.cancel(call, handle)  # already finished: the service answers 400
    backend.cancel(call, {"kind": handle["kind"]})  # malformed
    backend.cancel(call, {"kind": "something-else"})
    assert len(fake.requests_to("POST", kind.cancel)) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_dispatches_share_one_backend(
    fake: FakeFoundry, backend: FoundryBackend, kind: Kind
) -> None:
    calls = [make_call(kind, run_id=f"run_{i}", input=f"hello {i}") for i in range(8)]

    def dispatch(call: AgentCall) -> AgentOutcome:
        return poll_until_done(backend, call, backend.start(call))

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(dispatch, calls))

    assert [o.output for o in outcomes] == [f"echo: hello {i}" for i in range(8)]
    assert len({o.agent_run_id for o in outcomes}) == 8


# --- routing, handles, output ---------------------------------------------------------------------


def test_agent_id_that_is_not_a_classic_id_is_refused_without_a_request(
    fake: FakeFoundry, backend: FoundryBackend
) -> None:
    with pytest.raises(AgentError, match="agent_name") as failed:
        backend.start(make_call(CLASSIC, agent_id="weekly-summary"))
    assert not failed.value.retriable
    assert fake.requests == []


@pytest.mark.parametrize(
    "handle",
    [
        pytest.param({}, id="empty"),
        pytest.param({"kind": "thread_run", "thread_id": "thread_1"}, id="classic_without_run"),
        pytest.param({"kind": "response", "response_id": 5, "conversation_id": "c"}, id="named_bad_id"),
    ],
)
def test_malformed_handle_is_not_retriable(backend: FoundryBackend, handle: dict[str, Any]) -> None:
    with pytest.raises(AgentError) as failed:
        backend.poll(make_call(CLASSIC), handle)
    assert not failed.value.retriable


@pytest.mark.parametrize("kind", KINDS)
def test_huge_output_is_capped(fake: FakeFoundry, backend: FoundryBackend, kind: Kind) -> None:
    fake.script(Outcome(polls=0, output_text="é" * 100_000))
    call = make_call(kind)
    done = poll_until_done(backend, call, backend.start(call))
    assert done.output is not None
    assert len(done.output.encode()) <= 32 * 1024
    assert set(done.output) == {"é"}


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        pytest.param("abc", 3, "abc", id="fits"),
        pytest.param("abcd", 3, "abc", id="ascii_cut"),
        pytest.param("aé", 2, "a", id="never_half_a_character"),
        pytest.param("€€", 5, "€", id="three_byte_character"),
    ],
)
def test_cap_utf8(text: str, limit: int, expected: str) -> None:
    assert cap_utf8(text, limit) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after": "12"}, 12.0, id="seconds"),
        pytest.param({"retry-after": "0.5"}, 0.5, id="fraction"),
        pytest.param({"retry-after-ms": "250"}, 0.25, id="ms"),
        pytest.param({"x-ms-retry-after-ms": "100"}, 0.1, id="x_ms"),
        pytest.param({"retry-after": "Mon, 30 Nov 2026 06:01:01 GMT"}, 60.0, id="date"),
        pytest.param({"retry-after": "Mon, 30 Nov 2026 05:00:00 GMT"}, 0.0, id="date_in_the_past"),
        pytest.param({"retry-after": "soon"}, None, id="garbage"),
        pytest.param({"retry-after": "-3"}, 0.0, id="negative"),
        pytest.param({}, None, id="absent"),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, NOW) == expected


def test_credential_for_creates_one_credential_per_client_id() -> None:
    first = credential_for("00000000-0000-0000-0000-000000000001")
    assert credential_for("00000000-0000-0000-0000-000000000001") is first
    assert credential_for("00000000-0000-0000-0000-000000000002") is not first
    assert type(first).__name__ == "DefaultAzureCredential"
