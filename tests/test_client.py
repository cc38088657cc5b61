"""The Python client (``client/``, ``routines_client``) against the devhost process over real HTTP.

Every case runs twice, on ``routines_client.RoutinesClient`` and on ``routines_client.aio``'s twin: the
``client`` fixture drives the async client through ``Synced``, which runs each awaited call on a private
event loop, so one test body checks both surfaces. Retries and credentials are checked against a local
scripted server (``ScriptedServer``), which can answer what the devhost never would (503, 429).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import routines_client.aio
from azure.core import MatchConditions
from azure.core.credentials import AccessToken, AzureKeyCredential
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from routines_client import (
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    Routine,
    RoutineApprovalStep,
    RoutineInvocationAction,
    RoutineResponseAction,
    RoutineRetryPolicy,
    RoutineRun,
    RoutineScheduleTrigger,
    RoutinesClient,
    RoutinesError,
    RoutineTimerTrigger,
    RoutineWebhookTrigger,
    ValidationError,
)

from routines.azurite import free_ports
from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent
from tests.scripted_api import ROUTINE, ScriptedServer

pytestmark = [pytest.mark.e2e, pytest.mark.azurite]


# --- the devhost and the two clients ----------------------------------------------------------------


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>
    agent: FakeAgent


@pytest.fixture(scope="module")
def server(azurite: Any) -> Iterator[Server]:
    settings = {
        "AzureWebJobsStorage": azurite.connection_string,
        "ROUTINES_TABLE_PREFIX": "c" + uuid.uuid4().hex[:12],
        "ROUTINES_QUEUE_NAME": "q" + uuid.uuid4().hex[:16],
        "ROUTINES_AGENT_BACKEND": "http",
        "ROUTINES_MIN_INTERVAL_SECONDS": "1",
    }
    with FakeAgent() as agent, devhost_process({**settings, "ROUTINES_AGENT_ENDPOINT": agent.url}) as base:
        yield Server(base, agent)


class Synced:
    """The async client with a synchronous face: awaitables are run to completion on ``loop``, async
    pagers become iterators. Everything else is passed through untouched."""

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._client, self._loop = client, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if attr is self._client:  # .agents
            return self
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if inspect.isawaitable(result):
                return self._loop.run_until_complete(result)
            if hasattr(result, "__aiter__"):
                return SyncedPager(result, self._loop)
            return result

        return call


class SyncedPager:
    def __init__(self, pager: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._pager, self._loop = pager, loop

    def __iter__(self) -> Iterator[Any]:
        return self._drain(self._pager)

    def _drain(self, aiterator: Any) -> Iterator[Any]:
        iterator = aiterator.__aiter__()
        while True:
            try:
                yield self._loop.run_until_complete(iterator.__anext__())
            except StopAsyncIteration:
                return

    def by_page(self, continuation_token: str | None = None) -> Iterator[list[Any]]:
        for page in self._drain(self._pager.by_page(continuation_token)):
            yield list(self._drain(page))


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make_client(endpoint, credential=None, **options)``: a sync client, or the async twin behind
    ``Synced``; closed after the test."""
    loop = asyncio.new_event_loop() if request.param == "async" else None
    made: list[Any] = []

    def make(endpoint: str, credential: Any = None, **options: Any) -> Any:
        if loop is None:
            client = RoutinesClient(endpoint, credential, **options)
            made.append(client)
            return client
        if credential is not None and not isinstance(credential, AzureKeyCredential):
            credential = AsyncCredential(credential)
        aclient = routines_client.aio.RoutinesClient(endpoint, credential, **options)
        made.append(aclient)
        return Synced(aclient, loop)

    yield make
    for client in made:
        if loop is None:
            client.close()
        else:
            loop.run_until_complete(client.close())
    if loop is not None:
        loop.close()


@pytest.fixture
def client(make_client: Callable[..., Any], server: Server) -> Any:
    return make_client(server.base)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def echo_action(text: Any = "hello") -> RoutineInvocationAction:
    return RoutineInvocationAction(agent_id="echo", input=text)


def wait_for_run(client: Any, routine_id: str, run_id: str, timeout: float = 30) -> RoutineRun:
    deadline = time.monotonic() + timeout
    while True:
        run: RoutineRun = client.get_routine_run(routine_id, run_id)
        if run.is_terminal or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


# --- routines -------------------------------------------------------------------------------------


def test_create_in_the_articles_shape_and_read_back(client: Any) -> None:
    name = unique("daily-compliance-scan")
    routine = client.agents.create_routine(
        name=name,
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *", time_zone="Europe/Paris"),
        actions=[
            RoutineInvocationAction(
                agent_id="echo",
                input={"instructions": "Scan overnight logs", "context": {"region": "us-east-1"}},
            )
        ],
        retry_policy=RoutineRetryPolicy(max_attempts=3, delays_seconds=[1, 5]),
        overlap_policy="buffer_one",
    )
    assert isinstance(routine, Routine)
    assert routine.id and routine.id.startswith("rt_") and routine.name == name
    assert routine.state == "enabled" and routine.version == 1 and routine.etag == '"1"'
    assert isinstance(routine.next_fire_at, datetime) and routine.next_fire_at.tzinfo is not None
    assert routine.trigger == RoutineScheduleTrigger(cron_expression="0 6 * * *", time_zone="Europe/Paris")
    assert isinstance(routine.actions[0], RoutineInvocationAction)
    assert routine.actions[0].input == {
        "instructions": "Scan overnight logs",
        "context": {"region": "us-east-1"},
    }
    assert routine.retry_policy == RoutineRetryPolicy(max_attempts=3, delays_seconds=[1, 5])
    assert routine.overlap_policy == "buffer_one" and routine.timeout_seconds == 600  # server default

    got = client.get_routine(routine.id)
    assert got == routine and got.etag == '"1"'


def test_timer_trigger_takes_time_or_at_and_response_actions(client: Any) -> None:
    at = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    by_time = client.create_routine(
        name=unique("quarterly-report"),
        trigger=RoutineTimerTrigger(time=at.isoformat().replace("+00:00", "Z")),
        actions=[echo_action({"quarter": "Q3", "year": 2026})],
    )
    assert by_time.trigger == RoutineTimerTrigger(at=at) and by_time.next_fire_at == at
    by_mapping = client.create_routine(
        {
            "name": unique("weekly-summary"),
            "trigger": {"type": "timer", "at": at + timedelta(hours=1)},
            "actions": [RoutineResponseAction(agent_id="echo", input="go on", max_thread_messages=10)],
        }
    )
    assert isinstance(by_mapping.trigger, RoutineTimerTrigger) and by_mapping.next_fire_at == at + timedelta(
        hours=1
    )
    assert isinstance(by_mapping.actions[0], RoutineResponseAction)
    assert by_mapping.actions[0].max_thread_messages == 10


def test_list_routines_is_a_lazy_iterator_over_continuation_pages(
    make_client: Callable[..., Any], server: Server
) -> None:
    requests: list[str] = []
    client = make_client(server.base, raw_request_hook=lambda r: requests.append(r.http_request.url))
    names = {unique("paged") for _ in range(3)}
    for name in names:
        client.create_routine(
            name=name, trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"), actions=[echo_action()]
        )
    requests.clear()

    pager = client.list_routines(results_per_page=1)
    assert requests == []  # nothing is fetched until the iterator is advanced
    first = next(iter(pager))
    assert isinstance(first, Routine) and first.etag == f'"{first.version}"'
    assert len(requests) == 1 and "limit=1" in requests[0]

    pages = [list(page) for page in client.list_routines(results_per_page=1).by_page()]
    assert len(pages) >= 3 and all(len(page) <= 1 for page in pages)
    assert names <= {r.name for page in pages for r in page}
    assert any("continuation=" in url for url in requests)

    disabled = client.disable_routine(next(r.id for page in pages for r in page if r.name in names))
    assert disabled.id in {r.id for r in client.list_routines(state="disabled")}
    assert disabled.id not in {r.id for r in client.list_routines(state="enabled")}


def test_update_with_etag_and_match_condition(client: Any) -> None:
    routine = client.create_routine(
        name=unique("updated"),
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"),
        actions=[echo_action()],
    )
    # A Routine read from the server, changed and sent back, conditional on the version it was read at.
    routine.description = "scan logs"
    routine.trigger = RoutineScheduleTrigger(cron_expression="30 6 * * 1-5", time_zone="Europe/Paris")
    updated = client.update_routine(routine, match_condition=MatchConditions.IfNotModified)
    assert updated.version == 2 and updated.etag == '"2"' and updated.description == "scan logs"
    assert updated.trigger.cron_expression == "30 6 * * 1-5" and updated.trigger.time_zone == "Europe/Paris"

    with pytest.raises(PreconditionFailedError) as stale:  # the routine is at version 2 now
        client.update_routine(routine, match_condition=MatchConditions.IfNotModified)
    assert stale.value.status == 412 and isinstance(stale.value, ResourceModifiedError)
    assert stale.value.response is not None and stale.value.response.status_code == 412
    with pytest.raises(PreconditionFailedError):
        client.update_routine(routine.id, description="x", etag='"1"')
    assert client.get_routine(routine.id).version == 2  # refused updates changed nothing

    # Merge patch by id, unconditional or "if present"; keyword fields and a patch mapping combine.
    patched = client.update_routine(routine.id, {"timeout_seconds": 30}, description="by id")
    assert (patched.version, patched.timeout_seconds, patched.description) == (3, 30, "by id")
    patched = client.update_routine(
        routine.id, description="present", match_condition=MatchConditions.IfPresent
    )
    assert patched.version == 4
    with pytest.raises(ValueError, match="needs an etag"):
        client.update_routine(routine.id, description="x", match_condition=MatchConditions.IfNotModified)


def test_enable_disable_delete(client: Any) -> None:
    routine = client.create_routine(
        name=unique("pausable"),
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"),
        actions=[echo_action()],
    )
    disabled = client.disable_routine(routine.id)
    assert disabled.state == "disabled" and disabled.next_fire_at is None
    enabled = client.enable_routine(routine.id)
    assert enabled.state == "enabled" and enabled.next_fire_at is not None and enabled.version == 3
    assert client.delete_routine(routine.id) is None
    for call in (client.get_routine, client.delete_routine, client.enable_routine, client.disable_routine):
        with pytest.raises(NotFoundError) as missing:
            call(routine.id)
        assert missing.value.status == 404 and isinstance(missing.value, ResourceNotFoundError)
        assert routine.id in str(missing.value)


def test_errors_come_from_problem_json(client: Any) -> None:
    name = unique("taken")
    client.create_routine(
        name=name, trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"), actions=[echo_action()]
    )
    with pytest.raises(ConflictError) as taken:
        client.create_routine(
            name=name, trigger=RoutineScheduleTrigger(cron_expression="0 7 * * *"), actions=[echo_action()]
        )
    assert taken.value.status == 409 and isinstance(taken.value, ResourceExistsError)
    assert taken.value.title == "Conflict" and name in (taken.value.detail or "")

    with pytest.raises(ValidationError) as invalid:
        client.create_routine(
            name=unique("invalid"),
            trigger=RoutineScheduleTrigger(cron_expression="61 * * * *"),
            actions=[RoutineInvocationAction(agent_id="echo", agent_name="echo", input="x")],
        )
    error = invalid.value
    assert error.status == 422 and error.problem["status"] == 422
    locs = [e.loc for e in error.errors]
    assert ["trigger", "cron_expression"] in locs and ["actions", 0] in locs
    assert str(error).startswith("422 Invalid request: trigger.cron_expression")
    assert isinstance(error, RoutinesError) and error.response is not None
    assert error.response.status_code == 422

    with pytest.raises(ValidationError) as bad_query:
        list(client.list_routines(state="sleeping"))
    assert bad_query.value.status == 400 and bad_query.value.errors[0].loc == ["query", "state"]


# --- runs -----------------------------------------------------------------------------------------


def test_dispatch_and_read_runs(client: Any, server: Server) -> None:
    routine = client.create_routine(
        name=unique("manual"),
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"),
        actions=[echo_action()],
    )
    run = client.dispatch_routine(routine.id, input={"say": "now"})
    assert isinstance(run, RoutineRun) and run.trigger == "manual" and run.status == "queued"
    assert run.idempotency_key == f"{routine.id}:manual:{run.id}"
    done = wait_for_run(client, routine.id, run.id)
    assert done.status == "succeeded" and done.is_terminal and done.attempt == 1
    assert done.actions[0].status == "succeeded" and json.loads(done.actions[0].output or "") == {
        "say": "now"
    }
    assert isinstance(done.started_at, datetime) and done.ended_at and done.ended_at >= done.started_at
    assert [c.input for c in server.agent.calls_for("echo") if c.idempotency_key == run.idempotency_key] == [
        {"say": "now"}
    ]

    plain = client.dispatch_routine(routine.id)
    assert wait_for_run(client, routine.id, plain.id).actions[0].output == "hello"
    runs = list(client.list_routine_runs(routine_id=routine.id))
    assert [r.id for r in runs] == [plain.id, run.id]  # newest first
    assert {r.id for r in client.list_routine_runs(routine.id, status="succeeded", results_per_page=1)} == {
        run.id,
        plain.id,
    }
    assert list(client.list_routine_runs(routine.id, status="failed")) == []

    with pytest.raises(NotFoundError):
        client.get_routine_run(routine.id, "run_0000000000000_nothere000")
    with pytest.raises(NotFoundError):
        client.dispatch_routine("rt_0000000000000000")
    with pytest.raises(NotFoundError):
        list(client.list_routine_runs("rt_0000000000000000"))


def test_approve_and_reject_send_the_step_routes(make_client: Callable[..., Any], server: Server) -> None:
    """The server has no approval steps yet: the client's requests go to the documented routes, with the
    comment, and the 404 for an unknown run (or, today, for the route) is NotFoundError."""
    sent: list[tuple[str, str, bytes]] = []
    client = make_client(
        server.base,
        raw_request_hook=lambda r: sent.append(
            (r.http_request.method, r.http_request.url, r.http_request.content)
        ),
    )
    routine = client.create_routine(
        name=unique("gated"),
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *"),
        actions=[echo_action()],
    )
    run_id = "run_0000000000000_nothere000"
    for verb, call in (("approve", client.approve_step), ("reject", client.reject_step)):
        with pytest.raises(NotFoundError) as missing:
            call(routine.id, run_id, "review", comment="looks fine")
        assert missing.value.status == 404
        method, url, content = sent[-1]
        assert (method, url) == (
            "POST",
            f"{server.base}/api/routines/{routine.id}/runs/{run_id}/steps/review/{verb}",
        )
        assert json.loads(content) == {"comment": "looks fine"}


def test_preview_fires(client: Any) -> None:
    fires = client.preview_fires(
        RoutineScheduleTrigger(cron_expression="30 2 * * *", time_zone="America/New_York"),
        after="2026-03-07T00:00:00Z",
        count=3,
    )
    # 02:30 does not exist on 2026-03-08 (spring forward): that fire is at 03:00 EDT, 07:00 UTC.
    assert fires == [
        datetime(2026, 3, 7, 7, 30, tzinfo=UTC),
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC),
    ]
    after = datetime(2030, 1, 1, tzinfo=UTC)
    assert client.preview_fires({"type": "timer", "at": "2030-01-02T00:00:00Z"}, after=after) == [
        datetime(2030, 1, 2, tzinfo=UTC)
    ]
    with pytest.raises(ValidationError) as invalid:
        client.preview_fires(RoutineScheduleTrigger(cron_expression="0 6 * * *", time_zone="Mars/Olympus"))
    assert invalid.value.errors[0].loc == ["trigger", "time_zone"]


def test_endpoint_accepts_a_trailing_api(make_client: Callable[..., Any], server: Server) -> None:
    for endpoint in (server.base + "/api", server.base + "/api/", server.base + "/"):
        client = make_client(endpoint)
        assert client.endpoint == server.base
        assert isinstance(list(client.list_routines(results_per_page=1)), list)
    with pytest.raises(ValueError, match="http"):
        RoutinesClient("127.0.0.1:7071")


def test_unreachable_endpoint_raises_service_request_error(make_client: Callable[..., Any]) -> None:
    client = make_client(f"http://127.0.0.1:{free_ports(1)[0]}", retry_connect=0)
    with pytest.raises(ServiceRequestError):
        client.get_routine("rt_0000000000000000")


# --- retries and credentials, against a scripted server ---------------------------------------------


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("answers", "call"),
    [
        pytest.param([(503, {})], "get", id="503_then_200_get"),
        pytest.param([(503, {}), (503, {})], "get", id="503_twice_then_200"),
        pytest.param([(429, {"Retry-After": "0"})], "dispatch", id="429_retry_after_then_202_post"),
        pytest.param([(503, {})], "update", id="503_then_200_patch"),
    ],
)
def test_retries_429_and_503_with_back_off(
    make_client: Callable[..., Any],
    scripted: ScriptedServer,
    answers: list[tuple[int, dict[str, str]]],
    call: str,
) -> None:
    scripted.script = list(answers)
    client = make_client(scripted.url, retry_backoff_factor=0.01)
    if call == "get":
        result = client.get_routine(ROUTINE["id"])
        assert result.version == 7 and result.additional_properties == {"some_future_field": {"kept": True}}
    elif call == "dispatch":
        assert client.dispatch_routine(ROUTINE["id"], input="x").id == "run_1"
    else:
        assert client.update_routine(ROUTINE["id"], description="d").name == "scripted"
    assert len(scripted.seen) == len(answers) + 1
    assert len({(s.method, s.path) for s in scripted.seen}) == 1  # the same request each time


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_server_errors_are_not_retried(
    make_client: Callable[..., Any], scripted: ScriptedServer, status: int
) -> None:
    """A dispatch that failed half-way must not be sent twice."""
    scripted.script = [(status, {})]
    client = make_client(scripted.url, retry_backoff_factor=0.01)
    with pytest.raises(RoutinesError) as failed:
        client.dispatch_routine(ROUTINE["id"])
    assert failed.value.status == status and type(failed.value) is RoutinesError
    assert str(failed.value) == f"{status} Busy: try later"
    assert len(scripted.seen) == 1


def test_retries_give_up_with_the_last_error(
    make_client: Callable[..., Any], scripted: ScriptedServer
) -> None:
    scripted.script = [(503, {})] * 10
    client = make_client(scripted.url, retry_backoff_factor=0.01, retry_total=2)
    with pytest.raises(RoutinesError) as failed:
        client.get_routine(ROUTINE["id"])
    assert failed.value.status == 503 and len(scripted.seen) == 3


class FakeTokenCredential:
    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("t0ken", int(time.time()) + 3600)


class AsyncCredential:
    """The async form of a credential (``azure.identity.aio``'s shape)."""

    def __init__(self, inner: FakeTokenCredential) -> None:
        self.inner = inner

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self.inner.get_token(*scopes, **kwargs)

    async def close(self) -> None:
        pass


def test_function_key_goes_in_x_functions_key_and_never_into_logs(
    make_client: Callable[..., Any], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(scripted.url, AzureKeyCredential("s3cret-key"), logging_enable=True)
    with caplog.at_level(logging.DEBUG, logger="azure"):
        client.get_routine(ROUTINE["id"])
    assert scripted.seen[0].headers["x-functions-key"] == "s3cret-key"
    assert "authorization" not in scripted.seen[0].headers
    assert f"routines-client/{routines_client.__version__}" in scripted.seen[0].headers["user-agent"]
    # The request is logged, with the key's value redacted.
    assert "'x-functions-key': 'REDACTED'" in caplog.text and "s3cret-key" not in caplog.text


def test_token_credential_sends_a_bearer_token(
    make_client: Callable[..., Any], scripted: ScriptedServer
) -> None:
    credential = FakeTokenCredential()
    client = make_client(scripted.url, credential)
    client.get_routine(ROUTINE["id"])
    assert scripted.seen[0].headers["authorization"] == "Bearer t0ken"
    assert "x-functions-key" not in scripted.seen[0].headers
    assert credential.scopes == [(f"{scripted.url}/.default",)]
    scoped = make_client(scripted.url, credential, credential_scopes=["api://routines/.default"])
    scoped.get_routine(ROUTINE["id"])
    assert credential.scopes[-1] == ("api://routines/.default",)


def test_no_credential_sends_no_auth(make_client: Callable[..., Any], scripted: ScriptedServer) -> None:
    make_client(scripted.url).get_routine(ROUTINE["id"])
    assert (
        "authorization" not in scripted.seen[0].headers and "x-functions-key" not in scripted.seen[0].headers
    )
    with pytest.raises(TypeError, match="credential"):
        RoutinesClient(scripted.url, "a bare string")


def test_update_sends_a_merge_patch_with_if_match(
    make_client: Callable[..., Any], scripted: ScriptedServer
) -> None:
    client = make_client(scripted.url)
    routine = client.get_routine(ROUTINE["id"])
    routine.description = "changed"
    client.update_routine(routine, match_condition=MatchConditions.IfNotModified)
    patch = scripted.seen[-1]
    assert patch.method == "PATCH" and patch.headers["if-match"] == '"7"'
    # Only settable fields: no id, version, state, or fields this client does not know.
    assert set(patch.body) == {"name", "description", "trigger", "actions"}
    client.update_routine(routine)
    assert "if-match" not in scripted.seen[-1].headers  # a Routine alone is an unconditional update


def test_steps_and_webhook_triggers_go_out_in_the_specs_shapes(
    make_client: Callable[..., Any], scripted: ScriptedServer
) -> None:
    client = make_client(scripted.url)
    client.create_routine(
        name="triage",
        trigger=RoutineWebhookTrigger(signature="github", secret_setting="HOOK_SECRET"),
        actions=[
            RoutineInvocationAction(id="triage", agent_id="echo", input="{{event.issue.title}}"),
            RoutineApprovalStep(id="review", after=["triage"], timeout_seconds=86400, on_timeout="reject"),
        ],
        jitter_seconds=30,
    )
    sent = scripted.seen[-1]
    assert (sent.method, sent.path) == ("POST", "/api/routines")
    assert sent.body == {
        "name": "triage",
        "trigger": {"type": "webhook", "secret_setting": "HOOK_SECRET", "signature": "github"},
        "actions": [
            {"type": "invocation", "id": "triage", "agent_id": "echo", "input": "{{event.issue.title}}"},
            {
                "type": "approval",
                "id": "review",
                "after": ["triage"],
                "timeout_seconds": 86400,
                "on_timeout": "reject",
            },
        ],
        "jitter_seconds": 30,
    }


def test_a_webhook_routine_whose_secret_setting_is_undefined_is_refused(client: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        client.create_routine(
            name=unique("hook"),
            trigger=RoutineWebhookTrigger(secret_setting="NO_SUCH_SETTING_" + uuid.uuid4().hex.upper()),
            actions=[echo_action()],
        )
    assert refused.value.status == 422 and any(e.loc[:1] == ["trigger"] for e in refused.value.errors)


def test_the_readme_python_quickstart_runs(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python blocks, run as written against the devhost."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python client", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.setenv("ROUTINES_ENDPOINT", server.base)
    monkeypatch.delenv("ROUTINES_KEY", raising=False)
    namespace: dict[str, Any] = {"__name__": "readme"}
    suffix = uuid.uuid4().hex[:6]  # the module's devhost is shared: keep the names apart
    for block in blocks:
        code = block.replace('"daily-compliance-scan"', f'"daily-compliance-scan-{suffix}"')
        exec(
            compile(
                code.replace('"quarterly-report-generator"', f'"quarterly-{suffix}"'), "README.md", "exec"
            ),
            namespace,
        )
    client = namespace["client"]
    routine = client.get_routine(namespace["routine"].id)
    assert routine.overlap_policy == "buffer_one" and routine.description == "weekdays only"
    assert wait_for_run(client, routine.id, namespace["run"].id).status == "succeeded"
    with pytest.raises(NotFoundError):
        client.get_routine(namespace["report"].id)
    client.close()
