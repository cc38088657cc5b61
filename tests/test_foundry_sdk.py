"""The drop-in for Foundry Routines, proved with Foundry's own client: ``azure-ai-projects``'
``AIProjectClient(...).beta.routines`` against the devhost (a real process, on Azurite, with the
fake HTTP agent), over HTTP. Nothing here speaks the REST shape by hand except where a test needs
to show what the SDK cannot (the same cron error through ``/api/routines``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.ai.projects import AIProjectClient
from azure.ai.projects.models import (
    CustomRoutineTrigger,
    GitHubIssueRoutineTrigger,
    InvokeAgentInvocationsApiDispatchPayload,
    InvokeAgentResponsesApiDispatchPayload,
    InvokeAgentResponsesApiRoutineAction,
    Routine,
    RoutineTrigger,
    ScheduleRoutineTrigger,
    TimerRoutineTrigger,
)
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import SansIOHTTPPolicy

from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent
from tests.helpers import request_json

pytestmark = pytest.mark.e2e


class StaticToken:
    """A TokenCredential: what DefaultAzureCredential is to the SDK, minus Entra."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("test-token", int(time.time()) + 3600)


class AllowPlainHttp(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """azure-core refuses to send a bearer token over http; the devhost is http on loopback."""

    def on_request(self, request: PipelineRequest) -> None:  # type: ignore[type-arg]
        request.context["enforce_https"] = False


class Seen(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """Records each request the SDK sends (method and URL), to show every page was fetched."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def on_request(self, request: PipelineRequest) -> None:  # type: ignore[type-arg]
        self.requests.append((request.http_request.method, request.http_request.url))


@pytest.fixture(scope="module")
def agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


@pytest.fixture(scope="module")
def app(azurite: Any, agent: FakeAgent) -> Iterator[str]:
    settings = {
        "AzureWebJobsStorage": azurite.connection_string,
        "ROUTINES_TABLE_PREFIX": "t" + uuid.uuid4().hex[:12],
        "ROUTINES_QUEUE_NAME": "q" + uuid.uuid4().hex[:16],
        "ROUTINES_AGENT_BACKEND": "http",
        "ROUTINES_AGENT_ENDPOINT": agent.url,
        "ROUTINES_FOUNDRY_API": "open",
        "ROUTINES_MIN_INTERVAL_SECONDS": "1",
    }
    with devhost_process(settings) as base:
        yield base


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def client(app: str, seen: Seen) -> Iterator[AIProjectClient]:
    # The two lines a Foundry user changes: the endpoint, and (locally) any credential at all.
    project = AIProjectClient(
        endpoint=f"{app}/api/foundry",
        credential=StaticToken(),
        per_call_policies=[AllowPlainHttp(), seen],
        retry_total=0,
    )
    with project:
        yield project


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def action(agent_name: str = "echo", input: Any = None) -> InvokeAgentResponsesApiRoutineAction:
    return InvokeAgentResponsesApiRoutineAction(agent_name=agent_name, input=input or {"say": "hi"})


def daily(cron: str = "0 6 * * *", zone: str = "Europe/Paris") -> dict[str, RoutineTrigger]:
    return {"daily": ScheduleRoutineTrigger(cron_expression=cron, time_zone=zone)}


def only_trigger(routine: Routine) -> RoutineTrigger:
    assert routine.triggers is not None
    (trigger,) = routine.triggers.values()
    return trigger


def rest(app: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, answer = request_json(method, f"{app}/api{path}", body, {"Content-Type": "application/json"})
    return status, answer


def routine_names(app: str) -> set[str]:
    """Every routine the deployment holds, read through the management API."""
    names, continuation = set(), ""
    while True:
        status, page = rest(app, "GET", f"/routines?limit=200&continuation={continuation}")
        assert status == 200, page
        names |= {r["name"] for r in page["items"]}
        if not page["continuation"]:
            return names
        continuation = page["continuation"]


def wait_for_run(client: AIProjectClient, name: str, run_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        runs = {run.id: run for run in client.beta.routines.list_runs(name)}
        run = runs.get(run_id)
        if (run is not None and run.phase in ("completed", "failed")) or time.monotonic() > deadline:
            return run
        time.sleep(0.3)


# --- the SDK's calls, one by one ---------------------------------------------------------------------


def test_create_get_update_enable_disable_delete(client: AIProjectClient, app: str) -> None:
    routines = client.beta.routines
    name = unique("daily-scan")
    created = routines.create_or_update(
        name, description="Scan overnight logs", enabled=True, triggers=daily(), action=action()
    )
    assert created.name == name and created.enabled is True and created.description == "Scan overnight logs"
    trigger = only_trigger(created)
    assert isinstance(trigger, ScheduleRoutineTrigger)
    assert (trigger.cron_expression, trigger.time_zone) == ("0 6 * * *", "Europe/Paris")
    assert isinstance(created.action, InvokeAgentResponsesApiRoutineAction)
    assert created.action.agent_name == "echo" and created.action.input == {"say": "hi"}
    assert created.created_at is not None and created.created_at.tzinfo is not None

    got = routines.get(name)
    assert got.as_dict() == created.as_dict()
    # The same routine through the management API: one implementation underneath.
    status, ours = rest(app, "GET", f"/routines/{created['id']}")
    assert status == 200 and ours["name"] == name and ours["state"] == "enabled"
    assert ours["actions"] == [{"type": "invocation", "agent_name": "echo", "input": {"say": "hi"}}]
    assert ours["retry_policy"]["max_attempts"] == 4  # Routines' defaults for what Foundry lacks

    # Update: a create_or_update of an existing name replaces what it gives, keeps the rest.
    updated = routines.create_or_update(
        name,
        triggers={"weekdays": ScheduleRoutineTrigger(cron_expression="30 6 * * 1-5", time_zone="UTC")},
        action=InvokeAgentResponsesApiRoutineAction(agent_name="echo", input="go", conversation="conv_1"),
    )
    trigger = only_trigger(updated)
    assert isinstance(trigger, ScheduleRoutineTrigger)
    assert (trigger.cron_expression, trigger.time_zone) == ("30 6 * * 1-5", "UTC")
    assert isinstance(updated.action, InvokeAgentResponsesApiRoutineAction)
    assert updated.action.conversation == "conv_1" and updated.action.input == "go"
    assert updated.description == "Scan overnight logs" and updated.enabled is True
    status, ours = rest(app, "GET", f"/routines/{created['id']}")
    assert ours["actions"][0]["type"] == "response" and ours["actions"][0]["thread_id"] == "conv_1"
    assert ours["version"] == 2

    disabled = routines.disable(name)
    assert disabled.enabled is False
    assert rest(app, "GET", f"/routines/{created['id']}")[1]["next_fire_at"] is None
    enabled = routines.enable(name)
    assert enabled.enabled is True
    assert rest(app, "GET", f"/routines/{created['id']}")[1]["next_fire_at"] is not None
    assert routines.create_or_update(name, enabled=False).enabled is False  # the state alone

    routines.delete(name)
    with pytest.raises(ResourceNotFoundError):
        routines.get(name)
    assert rest(app, "GET", f"/routines/{created['id']}")[0] == 404


def test_timer_trigger_round_trips_as_unix_time(client: AIProjectClient) -> None:
    at = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    name = unique("quarterly")
    created = client.beta.routines.create_or_update(
        name, triggers={"once": TimerRoutineTrigger(at=at)}, action=action(input="Q3 report")
    )
    trigger = only_trigger(created)
    assert isinstance(trigger, TimerRoutineTrigger) and trigger.at == at
    # And back to a schedule: another kind of trigger replaces the timer whole.
    updated = client.beta.routines.create_or_update(name, triggers=daily("0 9 * * 1"))
    trigger = only_trigger(updated)
    assert isinstance(trigger, ScheduleRoutineTrigger) and trigger.cron_expression == "0 9 * * 1"


def test_list_walks_every_page(client: AIProjectClient, app: str, seen: Seen) -> None:
    names = {unique("paged") for _ in range(7)}
    for name in names:
        client.beta.routines.create_or_update(name, triggers=daily(), action=action())
    listed = [routine.name for routine in client.beta.routines.list(limit=3)]
    assert len(listed) == len(set(listed)), "a routine listed twice"
    assert names <= set(listed)
    assert set(listed) == routine_names(app)  # every routine of the deployment, no more
    pages = [url for method, url in seen.requests if method == "GET" and "/routines?" in url]
    assert len(pages) >= 3 and all("limit=3" in url for url in pages), pages
    assert all("api-version=v1" in url for url in pages)


def test_dispatch_runs_at_the_agent_and_list_runs_pages(
    client: AIProjectClient, agent: FakeAgent, seen: Seen
) -> None:
    name = unique("manual")
    client.beta.routines.create_or_update(name, triggers=daily(), action=action(input="default input"))
    first = client.beta.routines.dispatch(
        name, payload=InvokeAgentResponsesApiDispatchPayload(input="now please")
    )
    assert first.dispatch_id and first.dispatch_id.startswith("run_")
    run = wait_for_run(client, name, first.dispatch_id)
    assert run is not None and run.status == "succeeded" and run.phase == "completed", run
    assert run.attempt_source == "manual_dispatch" and run.dispatch_id == first.dispatch_id
    assert run.started_at is not None and run.ended_at is not None and run.ended_at >= run.started_at
    assert run.conversation_id and run.response_id and run.error_message is None
    calls = [c for c in agent.calls_for("echo") if c.body["input"] == "now please"]
    assert len(calls) == 1 and calls[0].body["run_id"] == first.dispatch_id

    # No payload: the routine's own input. Then more runs than one page of list_runs.
    # One at a time: a dispatch while a run is going is skipped (the default overlap policy).
    others: list[str] = []
    for _ in range(3):
        dispatched = client.beta.routines.dispatch(name).dispatch_id
        assert dispatched is not None
        others.append(dispatched)
        assert wait_for_run(client, name, others[-1]).status == "succeeded"
    assert any(
        c.body["input"] == "default input" and c.body["run_id"] == others[0] for c in agent.calls_for("echo")
    )
    seen.requests.clear()
    runs = list(client.beta.routines.list_runs(name, limit=2))
    assert [r.id for r in runs] == [*reversed(others), first.dispatch_id]  # newest first, all of them
    assert len([u for m, u in seen.requests if "/runs" in u]) >= 2


def test_a_schedule_under_five_minutes_fires_and_its_runs_read_as_schedule_deliveries(
    client: AIProjectClient,
) -> None:
    # Foundry's minimum interval is five minutes; here a 6-field cron fires every two seconds.
    name = unique("every-2s")
    client.beta.routines.create_or_update(name, triggers=daily("*/2 * * * * *", "UTC"), action=action())
    deadline = time.monotonic() + 30
    done: list[Any] = []
    while time.monotonic() < deadline and len(done) < 2:
        done = [r for r in client.beta.routines.list_runs(name) if r.phase == "completed"]
        time.sleep(0.5)
    client.beta.routines.disable(name)
    assert len(done) >= 2, done
    for run in done:
        assert (run.status, run.attempt_source, run.trigger_type) == (
            "succeeded",
            "schedule_delivery",
            "schedule",
        )
        assert run.scheduled_fire_at is not None and run.scheduled_fire_at.second % 2 == 0
        assert run.triggered_at == run.scheduled_fire_at and run.dispatch_id is None
    assert done[0].scheduled_fire_at > done[1].scheduled_fire_at  # newest first


# --- bad input: the SDK's own exceptions, nothing stored -------------------------------------------


def test_unknown_routine_raises_resource_not_found(client: AIProjectClient) -> None:
    routines = client.beta.routines
    for call in (
        lambda: routines.get("no-such-routine"),
        lambda: routines.enable("no-such-routine"),
        lambda: routines.disable("no-such-routine"),
        lambda: routines.delete("no-such-routine"),
        lambda: routines.dispatch("no-such-routine"),
        lambda: list(routines.list_runs("no-such-routine")),
    ):
        with pytest.raises(ResourceNotFoundError) as caught:
            call()
        assert caught.value.status_code == 404 and "no-such-routine" in str(caught.value.message)


@pytest.mark.parametrize(
    ("triggers", "field", "words"),
    [
        pytest.param(
            {**daily(), "hourly": ScheduleRoutineTrigger(cron_expression="0 * * * *", time_zone="UTC")},
            "triggers",
            "exactly one trigger",
            id="two_triggers",
        ),
        pytest.param(
            {
                "issues": GitHubIssueRoutineTrigger(
                    connection_id="c", owner="o", repository="r", issue_event="opened"
                )
            },
            "triggers.issues.type",
            "github_issue triggers are not supported",
            id="github_trigger",
        ),
        pytest.param(
            {"event": CustomRoutineTrigger(provider="p", parameters={})},
            "triggers.event.type",
            "custom triggers are not supported",
            id="custom_trigger",
        ),
    ],
)
def test_unsupported_triggers_are_400_naming_the_field_and_store_nothing(
    client: AIProjectClient, app: str, triggers: dict[str, Any], field: str, words: str
) -> None:
    name = unique("rejected")
    with pytest.raises(HttpResponseError) as caught:
        client.beta.routines.create_or_update(name, triggers=triggers, action=action())
    assert caught.value.status_code == 400
    assert not isinstance(caught.value, ResourceNotFoundError | ResourceExistsError)
    assert caught.value.error is not None and caught.value.error.code == "invalid_request"
    assert caught.value.error.message is not None
    assert caught.value.error.message.startswith(f"{field}: ") and words in caught.value.error.message
    assert name not in routine_names(app)


def test_invalid_cron_is_400_with_the_words_of_the_422(client: AIProjectClient, app: str) -> None:
    name = unique("bad-cron")
    with pytest.raises(HttpResponseError) as caught:
        client.beta.routines.create_or_update(name, triggers=daily("61 * * * *"), action=action())
    status, problem = rest(
        app,
        "POST",
        "/routines",
        {
            "name": name,
            "trigger": {"type": "schedule", "cron_expression": "61 * * * *", "time_zone": "Europe/Paris"},
            "actions": [{"type": "invocation", "agent_name": "echo", "input": "x"}],
        },
    )
    assert status == 422
    (ours,) = [e for e in problem["errors"] if e["loc"] == ["trigger", "cron_expression"]]
    error = caught.value.error
    assert caught.value.status_code == 400 and error is not None
    assert error.message == f"triggers.daily.cron_expression: {ours['msg']}"
    assert error.target == "triggers.daily.cron_expression" and error.details[0].message == ours["msg"]
    api_error = caught.value.model  # the SDK's ApiError
    assert api_error is not None and api_error.error.param == "triggers.daily.cron_expression"
    assert name not in routine_names(app)


def test_unsupported_dispatch_payload_is_400_and_starts_nothing(client: AIProjectClient) -> None:
    name = unique("payload")
    client.beta.routines.create_or_update(name, triggers=daily(), action=action())
    with pytest.raises(HttpResponseError) as caught:
        client.beta.routines.dispatch(name, payload=InvokeAgentInvocationsApiDispatchPayload(input={"x": 1}))
    assert caught.value.status_code == 400 and caught.value.error is not None
    assert caught.value.error.message is not None and caught.value.error.message.startswith("payload.type: ")
    assert list(client.beta.routines.list_runs(name)) == []


def test_enabling_a_completed_timer_is_resource_exists(client: AIProjectClient) -> None:
    # Enabling a timer routine that already fired is a conflict (409), the SDK's ResourceExistsError.
    name = unique("done-timer")
    at = datetime.now(UTC) + timedelta(seconds=3)
    client.beta.routines.create_or_update(
        name, triggers={"once": TimerRoutineTrigger(at=at)}, action=action()
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.beta.routines.get(name).enabled:
        time.sleep(0.3)
    with pytest.raises(ResourceExistsError) as caught:
        client.beta.routines.enable(name)
    assert caught.value.status_code == 409


def test_the_readme_example_runs_with_its_two_lines_changed(app: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Coming from Foundry Routines", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    lines = block.splitlines()
    endpoint = [i for i, line in enumerate(lines) if line.strip().startswith("endpoint=")]
    credential = [i for i, line in enumerate(lines) if line.strip().startswith("credential=")]
    assert len(endpoint) == len(credential) == 1, "the README's two lines moved"
    lines[endpoint[0]] = f"    endpoint={app + '/api/foundry'!r},"
    lines[credential[0]] = "    credential=StaticToken(), per_call_policies=[AllowPlainHttp()],"
    name = unique("daily-compliance-scan")
    code = "\n".join(lines).replace('"daily-compliance-scan"', repr(name))
    namespace: dict[str, Any] = {"StaticToken": StaticToken, "AllowPlainHttp": AllowPlainHttp}
    exec(compile(code, "README.md", "exec"), namespace)
    project_client = namespace["project_client"]
    run = wait_for_run(project_client, name, namespace["result"].dispatch_id)
    assert run is not None and run.status == "succeeded"
    assert project_client.beta.routines.get(name).action.agent_name == "compliance-agent"
