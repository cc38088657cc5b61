"""The HTTP agent backend (README, Agents) against real HTTP servers on 127.0.0.1.

The agent is ``tests/fake_agent.py``; the last tests start the sample agent and the fake agent as
processes, the way the README and the soak test do.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.http import HttpAgentBackend
from routines.agents.signature import sign, verify
from routines.agents.wire import parse_retry_after
from routines.errors import AgentError
from tests.fake_agent import Call, FakeAgent, Reply

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-3f9a1c7e5b2d"
SECRET = "sig-8d2e6f4a0c1b"
ROUTINE = "rt_0f3c2a9d6b1e4c7a"
SCHEDULED = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def make_call(**changes: Any) -> AgentCall:
    fields: dict[str, Any] = {
        "routine_id": ROUTINE,
        "run_id": "run_7a1c",
        "idempotency_key": f"{ROUTINE}:2026-11-30T06:00:00Z",
        "scheduled_for": SCHEDULED,
        "attempt": 2,
        "action_index": 0,
        "action_type": "invocation",
        "input": {"instructions": "Scan overnight logs", "context": {"region": "us-east-1"}},
        "agent_id": "asst_abc123",
    }
    fields.update(changes)
    return AgentCall(**fields)


def signature(secret: str, timestamp: int, method: str, target: str, body: bytes) -> str:
    """The protocol's signature, computed here from its definition (not with the code under test)."""
    message = f"{timestamp}.{method}.{target}.".encode() + body
    return f"t={timestamp},v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_at(call: Call) -> int:
    """The timestamp of the signature ``call`` carries."""
    header = call.headers["x-routines-signature"]
    assert header.startswith("t="), header
    return int(header.split(",")[0].removeprefix("t="))


def start_error(backend: HttpAgentBackend, call: AgentCall | None = None) -> AgentError:
    with pytest.raises(AgentError) as caught:
        backend.start(call or make_call())
    return caught.value


def poll_until_done(backend: HttpAgentBackend, call: AgentCall, outcome: AgentOutcome) -> AgentOutcome:
    for _ in range(20):
        if outcome.done:
            return outcome
        assert outcome.handle is not None
        outcome = backend.poll(call, outcome.handle)
    raise AssertionError("the run never completed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


@pytest.fixture
def backend(agent: FakeAgent) -> Iterator[HttpAgentBackend]:
    with HttpAgentBackend(agent.url) as http:
        yield http


@pytest.fixture
def signed() -> Iterator[tuple[FakeAgent, HttpAgentBackend]]:
    """An agent that checks both credentials, and a backend that sends them."""
    with (
        FakeAgent(token=TOKEN, signing_secret=SECRET) as fake,
        HttpAgentBackend(fake.url, token=TOKEN, signing_secret=SECRET) as http,
    ):
        yield fake, http


# -- the request ----------------------------------------------------------------------------------


def test_start_sends_the_spec_body_and_headers(signed: tuple[FakeAgent, HttpAgentBackend]) -> None:
    agent, backend = signed
    outcome = backend.start(make_call(traceparent=TRACEPARENT))

    assert outcome.done
    [call] = agent.calls
    assert (call.method, call.path, call.agent) == ("POST", "/agents/asst_abc123/invocations", "asst_abc123")
    assert call.body == {
        "routine_id": ROUTINE,
        "run_id": "run_7a1c",
        "idempotency_key": f"{ROUTINE}:2026-11-30T06:00:00Z",
        "scheduled_for": "2026-11-30T06:00:00Z",
        "attempt": 2,
        "type": "invocation",
        "thread_id": None,
        "input": {"instructions": "Scan overnight logs", "context": {"region": "us-east-1"}},
    }
    assert call.headers["Idempotency-Key"] == f"{ROUTINE}:2026-11-30T06:00:00Z"  # any case looks up
    assert call.headers["traceparent"] == TRACEPARENT
    assert call.headers["content-type"] == "application/json"
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["x-routines-signature"] == signature(
        SECRET, signed_at(call), "POST", call.path, call.raw_body
    )
    assert abs(signed_at(call) - time.time()) < 60


def test_response_action_sends_its_type_and_thread(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    call = make_call(
        action_type="response", agent_id=None, agent_name="weekly", thread_id="conv_1", input="go"
    )
    outcome = backend.start(call)

    [sent] = agent.calls
    assert (sent.agent, sent.body["type"], sent.body["thread_id"], sent.body["input"]) == (
        "weekly",
        "response",
        "conv_1",
        "go",
    )
    assert "traceparent" not in sent.headers
    assert outcome.thread_id == "conv_1"


@pytest.mark.parametrize(
    ("token", "secret", "expected"),
    [
        pytest.param(TOKEN, None, {"authorization"}, id="token_only"),
        pytest.param(None, SECRET, {"x-routines-signature"}, id="secret_only"),
        pytest.param(TOKEN, SECRET, {"authorization", "x-routines-signature"}, id="both"),
        pytest.param(None, None, set(), id="neither"),
    ],
)
def test_credentials_sent_are_the_ones_configured(
    agent: FakeAgent, token: str | None, secret: str | None, expected: set[str]
) -> None:
    with HttpAgentBackend(agent.url, token=token, signing_secret=secret) as backend:
        backend.start(make_call())

    [call] = agent.calls
    assert {"authorization", "x-routines-signature"} & call.headers.keys() == expected


SIGNED_AT = datetime(2026, 11, 30, 6, 0, 5, tzinfo=UTC)
T = int(SIGNED_AT.timestamp())


@pytest.fixture
def frozen() -> Iterator[tuple[FakeAgent, HttpAgentBackend]]:
    """A signature-checking agent and a signing backend, both on a clock stopped at ``SIGNED_AT``."""
    with (
        FakeAgent(signing_secret=SECRET, clock=SIGNED_AT.timestamp) as fake,
        HttpAgentBackend(f"{fake.url}/v1?code=k", signing_secret=SECRET, clock=lambda: SIGNED_AT) as http,
    ):
        yield fake, http


def test_every_request_is_signed_over_time_method_target_and_body(
    frozen: tuple[FakeAgent, HttpAgentBackend],
) -> None:
    agent, backend = frozen
    agent.script("asst_abc123", [Reply.pending(polls=5, location="absolute")])
    call = make_call()
    started = backend.start(call)
    assert started.handle is not None
    backend.poll(call, started.handle)
    backend.cancel(call, started.handle)

    start, poll, cancel = agent.calls
    assert [(c.method, c.path) for c in agent.calls] == [
        ("POST", "/v1/agents/asst_abc123/invocations?code=k"),
        ("GET", "/runs/fake_run_1"),
        ("DELETE", "/runs/fake_run_1"),
    ]
    assert start.headers["x-routines-signature"] == signature(SECRET, T, "POST", start.path, start.raw_body)
    assert poll.headers["x-routines-signature"] == signature(SECRET, T, "GET", "/runs/fake_run_1", b"")
    assert cancel.headers["x-routines-signature"] == signature(SECRET, T, "DELETE", "/runs/fake_run_1", b"")
    assert agent.cancelled() == ["fake_run_1"], "the agent accepted the DELETE's signature"


def test_a_captured_request_cannot_be_replayed(frozen: tuple[FakeAgent, HttpAgentBackend]) -> None:
    agent, backend = frozen
    agent.script("asst_abc123", [Reply.pending(polls=5), Reply.pending(polls=5)])
    call = make_call()
    first, second = backend.start(call), backend.start(call)
    assert first.handle is not None and second.handle is not None
    backend.poll(call, first.handle)
    captured = agent.calls_for(kind="poll")[0]

    def replay(path: str) -> int:
        headers = {"X-Routines-Signature": captured.headers["x-routines-signature"]}
        return httpx.get(agent.url + path, headers=headers).status_code

    assert replay("/runs/fake_run_1") == 202, "the very same request, replayed at once, is valid"
    assert replay("/runs/fake_run_2") == 401, "not against another run"
    agent.clock = lambda: SIGNED_AT.timestamp() + 301
    assert replay("/runs/fake_run_1") == 401, "not after 5 minutes"


def test_a_backend_clock_off_by_more_than_5_minutes_is_refused() -> None:
    late = datetime.now(UTC) - timedelta(minutes=6)
    with (
        FakeAgent(signing_secret=SECRET) as strict,
        HttpAgentBackend(strict.url, signing_secret=SECRET, clock=lambda: late) as backend,
    ):
        error = start_error(backend)

    assert not error.retriable
    assert "401" in str(error)


INVOKE, BODY = "/agents/a/invocations", b'{"x":1}'
GOOD = signature(SECRET, T, "POST", INVOKE, BODY)
DIGEST = GOOD.split("v1=")[1]


@pytest.mark.parametrize(
    ("header", "method", "target", "body", "now", "valid"),
    [
        pytest.param(GOOD, "POST", INVOKE, BODY, T, True, id="valid"),
        pytest.param(GOOD, "POST", INVOKE, BODY, T + 300, True, id="300_s_later"),
        pytest.param(GOOD, "POST", INVOKE, BODY, T - 300, True, id="300_s_early"),
        pytest.param(GOOD, "POST", INVOKE, BODY, T + 301, False, id="301_s_later"),
        pytest.param(GOOD, "POST", INVOKE, BODY, T - 301, False, id="301_s_early"),
        pytest.param(GOOD, "PUT", INVOKE, BODY, T, False, id="other_method"),
        pytest.param(GOOD, "POST", "/agents/b/invocations", BODY, T, False, id="other_path"),
        pytest.param(GOOD, "POST", INVOKE + "?x", BODY, T, False, id="other_query"),
        pytest.param(GOOD, "POST", INVOKE, b'{"x":2}', T, False, id="other_body"),
        pytest.param(f"t={T},v1={'0' * 64},v1={DIGEST}", "POST", INVOKE, BODY, T, True, id="rotation"),
        pytest.param(f"t={T + 1},v1={DIGEST}", "POST", INVOKE, BODY, T, False, id="timestamp_changed"),
        pytest.param(f"v1={DIGEST}", "POST", INVOKE, BODY, T, False, id="no_time"),
        pytest.param(f"t={T}", "POST", INVOKE, BODY, T, False, id="no_digest"),
        pytest.param(f"t={T},t={T},v1={DIGEST}", "POST", INVOKE, BODY, T, False, id="two_times"),
        pytest.param("sha256=abc", "POST", INVOKE, BODY, T, False, id="old_format"),
        pytest.param("", "POST", INVOKE, BODY, T, False, id="empty"),
        pytest.param(None, "POST", INVOKE, BODY, T, False, id="absent"),
    ],
)
def test_verify_signature(
    header: str | None, method: str, target: str, body: bytes, now: int, valid: bool
) -> None:
    assert verify(SECRET, header, method, target, body, now=now) is valid


def readme_verifier() -> Any:
    """The verification snippet of the README's "HTTP agent security" section, as a function."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### HTTP agent security", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["signed_by_routines"]


def test_the_readme_snippet_verifies_what_the_backend_signs(agent: FakeAgent) -> None:
    verifier = readme_verifier()
    with HttpAgentBackend(f"{agent.url}/v1?code=k", signing_secret=SECRET) as backend:
        backend.start(make_call(input="é"))
    [call] = agent.calls
    header = call.headers["x-routines-signature"]

    assert verifier(SECRET, header, "POST", call.path, call.raw_body)
    assert not verifier(SECRET, header, "POST", "/v1/agents/other/invocations?code=k", call.raw_body)
    assert not verifier(SECRET, header, "POST", call.path, call.raw_body + b" ")
    assert not verifier("other", header, "POST", call.path, call.raw_body)
    assert not verifier(SECRET, None, "POST", call.path, call.raw_body)
    stale = f"t={signed_at(call) - 301}," + header.split(",")[1]
    assert not verifier(SECRET, stale, "POST", call.path, call.raw_body)


def test_signature_key_is_the_secrets_utf8_bytes() -> None:
    secret = "clé-☃"
    expected = hmac.new(secret.encode("utf-8"), b"7.GET./runs/1.", hashlib.sha256).hexdigest()
    assert sign(secret, 7, "GET", "/runs/1", b"") == f"t=7,v1={expected}"


@pytest.mark.parametrize(
    ("base_path", "agent_name", "expected_path"),
    [
        pytest.param("", "asst_abc123", "/agents/asst_abc123/invocations", id="bare_host"),
        pytest.param("/", "asst_abc123", "/agents/asst_abc123/invocations", id="trailing_slash"),
        pytest.param("/v1", "asst_abc123", "/v1/agents/asst_abc123/invocations", id="base_path"),
        pytest.param("/v1/", "team/a b", "/v1/agents/team%2Fa%20b/invocations", id="quoted_name"),
    ],
)
def test_agent_is_one_quoted_path_segment_under_the_endpoint(
    agent: FakeAgent, base_path: str, agent_name: str, expected_path: str
) -> None:
    with HttpAgentBackend(agent.url + base_path) as backend:
        backend.start(make_call(agent_id=agent_name))

    [call] = agent.calls
    assert (call.path, call.agent) == (expected_path, agent_name)


@pytest.mark.parametrize(
    "endpoint", [pytest.param("ftp://agents.example", id="not_http"), pytest.param("agents", id="no_scheme")]
)
def test_endpoint_must_be_an_http_url(endpoint: str) -> None:
    with pytest.raises(ValueError, match="http"):
        HttpAgentBackend(endpoint)


# -- 200: done ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(
            Reply.ok("hi", thread_id="thread_9", run_id="run_9"), ("hi", "thread_9", "run_9"), id="text"
        ),
        pytest.param(Reply.ok({"a": [1, 2]}), ('{"a": [1, 2]}', None, None), id="object_output_json_encoded"),
        pytest.param(Reply.ok(42, id="r42"), ("42", None, "r42"), id="number_output_and_id"),
        pytest.param(Reply(body={"output": None}), (None, None, None), id="null_output"),
        pytest.param(Reply(body={}), (None, None, None), id="empty_object"),
    ],
)
def test_200_is_a_done_outcome(
    agent: FakeAgent, backend: HttpAgentBackend, reply: Reply, expected: tuple[str | None, ...]
) -> None:
    agent.script("asst_abc123", [reply])
    outcome = backend.start(make_call())

    assert outcome.done
    assert (outcome.output, outcome.thread_id, outcome.agent_run_id) == expected


def test_echo_agent_answers_with_a_new_thread(backend: HttpAgentBackend) -> None:
    outcome = backend.start(make_call(input="hello"))

    assert (outcome.done, outcome.output) == (True, "hello")
    assert outcome.thread_id is not None and outcome.thread_id.startswith("thread_")
    assert outcome.agent_run_id is not None


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(Reply.raw(200, "<html>oops</html>", "text/html"), "not JSON", id="html"),
        pytest.param(Reply.raw(200, b"", "application/json"), "not JSON", id="empty"),
        pytest.param(Reply.raw(200, "[1, 2]", "application/json"), "not a JSON object", id="array"),
        pytest.param(Reply.raw(200, '"done"', "application/json"), "not a JSON object", id="string"),
    ],
)
def test_unreadable_200_fails_without_retry(
    agent: FakeAgent, backend: HttpAgentBackend, reply: Reply, message: str
) -> None:
    agent.script("asst_abc123", [reply])
    error = start_error(backend)

    assert not error.retriable
    assert message in str(error) and "200" in str(error)


# -- 202: pending, then polled --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_202_is_polled_at_its_location_until_done(
    signed: tuple[FakeAgent, HttpAgentBackend], form: Any
) -> None:
    agent, backend = signed
    agent.script("asst_abc123", [Reply.pending(polls=2, location=form)])
    call = make_call(input="long job", traceparent=TRACEPARENT)

    first = backend.start(call)
    assert not first.done
    assert first.handle == {"location": f"{agent.url}/runs/fake_run_1"}
    assert first.poll_after == 1.0
    final = poll_until_done(backend, call, first)

    assert (final.output, final.agent_run_id) == ("long job", "fake_run_1")
    assert [c.kind for c in agent.calls] == ["start", "poll", "poll", "poll"]
    for poll in agent.calls_for(kind="poll"):
        assert poll.headers["authorization"] == f"Bearer {TOKEN}"
        expected = signature(SECRET, signed_at(poll), "GET", poll.path, b"")
        assert poll.headers["x-routines-signature"] == expected
        assert poll.headers["traceparent"] == TRACEPARENT


def test_retry_after_of_a_202_sets_poll_after(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    agent.script("asst_abc123", [Reply.pending(polls=1, retry_after=7)])
    call = make_call()

    started = backend.start(call)
    assert started.handle is not None
    polled = backend.poll(call, started.handle)

    assert (started.poll_after, polled.poll_after, polled.done) == (7.0, 7.0, False)
    assert polled.handle == started.handle


def test_202_without_location_is_a_protocol_error(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    agent.script("asst_abc123", [Reply.pending(location="none")])
    error = start_error(backend)

    assert not error.retriable
    assert "Location" in str(error)


@pytest.mark.parametrize(
    ("final", "retriable"),
    [
        pytest.param(Reply.error(500), True, id="run_failed_500"),
        pytest.param(Reply.error(429, retry_after=3), True, id="rate_limited"),
        pytest.param(Reply.error(422), False, id="run_rejected_422"),
    ],
)
def test_poll_errors_are_classified(
    agent: FakeAgent, backend: HttpAgentBackend, final: Reply, retriable: bool
) -> None:
    agent.script("asst_abc123", [Reply.pending(polls=0, final=final)])
    call = make_call()
    started = backend.start(call)
    assert started.handle is not None

    with pytest.raises(AgentError) as caught:
        backend.poll(call, started.handle)
    assert caught.value.retriable is retriable
    assert str(final.status) in str(caught.value)


@pytest.mark.parametrize(
    "handle",
    [
        pytest.param({}, id="empty"),
        pytest.param({"location": 3}, id="not_text"),
        pytest.param({"location": "ftp://127.0.0.1/runs/1"}, id="not_http"),
        pytest.param({"location": "http://[::1"}, id="not_a_url"),
    ],
)
def test_poll_of_a_bad_handle_fails(backend: HttpAgentBackend, handle: dict[str, Any]) -> None:
    with pytest.raises(AgentError) as caught:
        backend.poll(make_call(), handle)
    assert not caught.value.retriable


@pytest.mark.parametrize(
    "location",
    [
        pytest.param("{elsewhere}/runs/x", id="another_port"),
        pytest.param("//localhost:{port}/runs/x", id="protocol_relative_other_host"),
        pytest.param("https://127.0.0.1:{port}/runs/x", id="other_scheme"),
        pytest.param("http://169.254.169.254/metadata/identity", id="metadata_service"),
    ],
)
def test_a_location_off_the_endpoint_origin_fails_the_run(
    signed: tuple[FakeAgent, HttpAgentBackend], location: str
) -> None:
    agent, backend = signed
    with FakeAgent() as elsewhere:
        where = location.format(elsewhere=elsewhere.url, port=agent.port)
        agent.script("asst_abc123", [Reply(status=202, headers={"Location": where})])
        error = start_error(backend)

        assert elsewhere.calls == []
    assert not error.retriable
    assert "not on the agent endpoint's origin" in str(error)


def test_a_poll_moving_to_another_origin_fails_the_run(signed: tuple[FakeAgent, HttpAgentBackend]) -> None:
    agent, backend = signed
    with FakeAgent() as elsewhere:
        moved = Reply(status=202, headers={"Location": f"{elsewhere.url}/runs/x"})
        agent.script("asst_abc123", [Reply.pending(polls=0, final=moved)])
        call = make_call()
        started = backend.start(call)
        assert started.handle is not None
        with pytest.raises(AgentError) as caught:
            backend.poll(call, started.handle)

        assert elsewhere.calls == []
    assert not caught.value.retriable
    assert "not on the agent endpoint's origin" in str(caught.value)


def test_a_stored_handle_off_the_origin_is_neither_polled_nor_cancelled(backend: HttpAgentBackend) -> None:
    with FakeAgent() as elsewhere:
        handle = {"location": f"{elsewhere.url}/runs/x"}
        with pytest.raises(AgentError) as caught:
            backend.poll(make_call(), handle)
        backend.cancel(make_call(), handle)

        assert elsewhere.calls == []
    assert not caught.value.retriable


def test_a_relative_location_resolves_on_the_endpoint(agent: FakeAgent) -> None:
    agent.script("asst_abc123", [Reply(status=202, headers={"Location": "../../runs/fake_run_9"})])
    with HttpAgentBackend(f"{agent.url}/v1") as backend:
        started = backend.start(make_call())

    assert started.handle == {"location": f"{agent.url}/v1/runs/fake_run_9"}


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retriable"),
    [
        pytest.param(400, False, id="400_bad_request"),
        pytest.param(401, False, id="401_unauthorized"),
        pytest.param(403, False, id="403_forbidden"),
        pytest.param(404, False, id="404_no_such_agent"),
        pytest.param(409, False, id="409_conflict"),
        pytest.param(422, False, id="422_invalid_input"),
        pytest.param(408, True, id="408_request_timeout"),
        pytest.param(429, True, id="429_rate_limited"),
        pytest.param(500, True, id="500_server_error"),
        pytest.param(502, True, id="502_bad_gateway"),
        pytest.param(503, True, id="503_unavailable"),
        pytest.param(504, True, id="504_gateway_timeout"),
        pytest.param(302, False, id="302_redirect_not_followed"),
    ],
)
def test_status_classification(
    agent: FakeAgent, backend: HttpAgentBackend, status: int, retriable: bool
) -> None:
    agent.script("asst_abc123", [status])
    error = start_error(backend)

    assert error.retriable is retriable
    assert str(status) in str(error)
    assert error.retry_after is None


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        pytest.param(503, "7", 7.0, id="seconds"),
        pytest.param(429, "0", 0.0, id="zero"),
        pytest.param(429, "2.5", 2.5, id="fraction"),
        pytest.param(503, "in a while", None, id="unreadable"),
        pytest.param(400, "7", None, id="ignored_when_not_retriable"),
    ],
)
def test_retry_after_on_errors(
    agent: FakeAgent, backend: HttpAgentBackend, status: int, header: str, expected: float | None
) -> None:
    agent.script("asst_abc123", [Reply.error(status, retry_after=header)])
    assert start_error(backend).retry_after == expected


def test_retry_after_as_http_date(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    agent.script(
        "asst_abc123",
        [
            Reply.error(
                503, retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
            )
        ],
    )
    retry_after = start_error(backend).retry_after

    assert retry_after is not None and 25 <= retry_after <= 31


NOW = datetime(2015, 10, 21, 7, 27, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("120", 120.0, id="seconds"),
        pytest.param(" 5 ", 5.0, id="spaces"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 60.0, id="http_date"),
        pytest.param("Wed, 21 Oct 2015 07:00:00 GMT", 0.0, id="http_date_in_the_past"),
        pytest.param("-3", 0.0, id="negative"),
        pytest.param("nan", None, id="nan"),
        pytest.param("soon", None, id="garbage"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_connection_refused_is_retriable() -> None:
    with HttpAgentBackend(f"http://127.0.0.1:{free_port()}") as backend:
        error = start_error(backend)

    assert error.retriable
    assert "could not be reached" in str(error)


def test_slow_agent_past_the_deadline_times_out_retriably(
    agent: FakeAgent, backend: HttpAgentBackend
) -> None:
    agent.script("asst_abc123", [Reply.slow(60.0)])
    began = time.monotonic()
    error = start_error(backend, make_call(deadline=datetime.now(UTC) + timedelta(seconds=1.2)))

    assert error.retriable
    assert "timed out" in str(error)
    assert time.monotonic() - began < 30, "given up on long before the agent would have answered"


def test_an_answer_trickling_past_the_deadline_times_out_retriably(
    agent: FakeAgent, backend: HttpAgentBackend
) -> None:
    """Each byte arrives well inside the socket's read timeout; the call as a whole does not."""
    agent.script("asst_abc123", [Reply.trickling(0.25)])  # ~100 bytes: 25 s to send
    began = time.monotonic()
    error = start_error(backend, make_call(deadline=datetime.now(UTC) + timedelta(seconds=1.5)))

    assert error.retriable
    assert "still arriving at the call's deadline" in str(error)
    assert time.monotonic() - began < 20, "given up on long before the agent would have finished"


def test_an_answer_trickling_inside_the_deadline_is_read_whole(
    agent: FakeAgent, backend: HttpAgentBackend
) -> None:
    agent.script("asst_abc123", [Reply.trickling(0.001, Reply.ok("slow but fine"))])

    outcome = backend.start(make_call(deadline=datetime.now(UTC) + timedelta(seconds=60)))

    assert (outcome.done, outcome.output) == (True, "slow but fine")


def test_an_answer_over_a_mebibyte_fails_the_attempt(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    agent.script("asst_abc123", [Reply.ok("x" * (1024 * 1024 + 1))])

    error = start_error(backend)

    assert not error.retriable
    assert "more than 1048576 bytes" in str(error)


def test_a_gzip_answer_is_decoded(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    body = gzip.compress(json.dumps({"output": "zipped"}).encode())
    agent.script("asst_abc123", [Reply(body=body, headers={"Content-Encoding": "gzip"})])

    assert backend.start(make_call()).output == "zipped"


def test_deadline_already_passed_sends_nothing(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    error = start_error(backend, make_call(deadline=datetime.now(UTC) - timedelta(seconds=1)))

    assert error.retriable
    assert "timed out" in str(error)
    assert agent.calls == []


def echo_request_headers(call: Call) -> Reply:
    return Reply.error(500, body={"received": call.headers, "padding": "x" * 2000})


def test_error_messages_never_show_credentials() -> None:
    with (
        FakeAgent(token=TOKEN, signing_secret=SECRET, default=echo_request_headers) as agent,
        HttpAgentBackend(f"{agent.url}/?code=fn-key-5e1d", token=TOKEN, signing_secret=SECRET) as backend,
    ):
        error = start_error(backend)

    message = str(error)
    assert "500" in message and "received" in message
    assert TOKEN not in message and SECRET not in message and "fn-key-5e1d" not in message
    assert "v1=" not in message
    assert len(message) < 600, "the body is cut to a short excerpt"


def test_wrong_token_fails_without_showing_it() -> None:
    with FakeAgent(token=TOKEN) as strict, HttpAgentBackend(strict.url, token="not-" + TOKEN) as backend:
        error = start_error(backend)

    assert not error.retriable
    assert "401" in str(error) and TOKEN not in str(error)


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_deletes_the_run(agent: FakeAgent, backend: HttpAgentBackend) -> None:
    agent.script("asst_abc123", [Reply.pending(polls=10)])
    call = make_call()
    started = backend.start(call)
    assert started.handle is not None

    backend.cancel(call, started.handle)

    assert agent.cancelled() == ["fake_run_1"]
    with pytest.raises(AgentError):  # the fake answers 410 once cancelled
        backend.poll(call, started.handle)


@pytest.mark.parametrize(
    "handle",
    [
        pytest.param({"location": f"http://127.0.0.1:{free_port()}/runs/1"}, id="agent_gone"),
        pytest.param({"location": "not a url at all"}, id="garbage_location"),
        pytest.param({}, id="no_location"),
    ],
)
def test_cancel_never_raises(backend: HttpAgentBackend, handle: dict[str, Any]) -> None:
    backend.cancel(make_call(), handle)


# -- connection handling --------------------------------------------------------------------------


def test_a_given_client_is_used_and_left_open(agent: FakeAgent) -> None:
    sent: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as client:
        with HttpAgentBackend(agent.url, client=client) as backend:
            backend.start(make_call())
            backend.start(make_call())
        assert len(sent) == 2
        assert not client.is_closed


# -- the sample agent and the fake agent as processes ---------------------------------------------


def start_process(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server process with ``env`` added; return it and the URL from its ready line."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ROUTINES_AGENT_")}
    env = {**inherited, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if " ready on " not in line:
        process.kill()
        raise AssertionError(f"no ready line: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


@contextmanager
def running_sample_agent(**env: str) -> Iterator[str]:
    process, url = start_process(
        "-m", "routines.sample_agent", "--port", "0", "--slow-seconds", "0.5", env=env
    )
    try:
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=5)


@pytest.fixture
def sample_agent() -> Iterator[str]:
    with running_sample_agent() as url:
        yield url


@pytest.fixture(scope="module")
def strict_sample_agent() -> Iterator[str]:
    """The sample agent configured like Routines, from the same settings: token and signing secret."""
    with running_sample_agent(ROUTINES_AGENT_TOKEN=TOKEN, ROUTINES_AGENT_SIGNING_SECRET=SECRET) as url:
        yield url


def test_sample_agent_accepts_what_routines_sends(strict_sample_agent: str) -> None:
    call = make_call(agent_id="slow", input="hi")
    with HttpAgentBackend(strict_sample_agent, token=TOKEN, signing_secret=SECRET) as backend:
        started = backend.start(call)
        assert not started.done and started.handle is not None
        polled = backend.poll(call, started.handle)  # a signed GET
        backend.cancel(call, started.handle)  # a signed DELETE
        with pytest.raises(AgentError, match="404"):  # the DELETE was accepted: the run is gone
            backend.poll(call, started.handle)

    assert not polled.done


@pytest.mark.parametrize(
    ("token", "secret", "clock"),
    [
        pytest.param(None, None, None, id="no_credentials"),
        pytest.param(TOKEN, None, None, id="token_without_signature"),
        pytest.param(None, SECRET, None, id="signature_without_token"),
        pytest.param("not-" + TOKEN, SECRET, None, id="wrong_token"),
        pytest.param(TOKEN, "not-" + SECRET, None, id="wrong_secret"),
        pytest.param(TOKEN, SECRET, timedelta(minutes=-6), id="signed_6_minutes_ago"),
        pytest.param(TOKEN, SECRET, timedelta(minutes=6), id="signed_6_minutes_ahead"),
    ],
)
def test_sample_agent_refuses_bad_credentials(
    strict_sample_agent: str, token: str | None, secret: str | None, clock: timedelta | None
) -> None:
    skew = clock or timedelta(0)
    with HttpAgentBackend(
        strict_sample_agent, token=token, signing_secret=secret, clock=lambda: datetime.now(UTC) + skew
    ) as backend:
        error = start_error(backend)

    assert not error.retriable
    assert "401" in str(error)


def test_sample_agent_refuses_a_replayed_poll(strict_sample_agent: str) -> None:
    call = make_call(agent_id="slow")
    with HttpAgentBackend(strict_sample_agent, token=TOKEN, signing_secret=SECRET) as backend:
        first, second = backend.start(call), backend.start(call)
    assert first.handle is not None and second.handle is not None
    sent: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as client:
        with HttpAgentBackend(strict_sample_agent, token=TOKEN, signing_secret=SECRET, client=client) as spy:
            spy.poll(call, first.handle)
        captured = dict(sent[0].headers)
        assert client.get(first.handle["location"], headers=captured).status_code == 202
        assert client.get(second.handle["location"], headers=captured).status_code == 401


def test_sample_agent_echoes(sample_agent: str) -> None:
    with HttpAgentBackend(sample_agent) as backend:
        outcome = backend.start(make_call(input="hello"))

    assert (outcome.done, outcome.output) == (True, "echo: hello")
    assert outcome.thread_id is not None and outcome.thread_id.startswith("thread_")


def test_sample_agent_slow_is_polled(sample_agent: str) -> None:
    call = make_call(agent_id="slow", action_type="response", thread_id="thread_1", input={"n": 1})
    with HttpAgentBackend(sample_agent) as backend:
        started = backend.start(call)
        assert not started.done and started.poll_after == 1.0
        time.sleep(0.6)
        final = poll_until_done(backend, call, started)

    assert (final.output, final.thread_id) == ('echo: {"n": 1}', "thread_1")


def test_fake_agent_process_fails_at_random_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    process, url = start_process("tests/fake_agent.py", "--port", "0", "--fail-rate", "1", "--log", str(log))
    try:
        with HttpAgentBackend(url) as backend:
            error = start_error(backend)
    finally:
        process.terminate()
        process.communicate(timeout=5)

    assert error.retriable
    [line] = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["kind"] == "start" and line["status"] in (429, 500, 503)
    assert line["idempotency_key"] == f"{ROUTINE}:2026-11-30T06:00:00Z"
