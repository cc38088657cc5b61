"""End to end: the devhost as a real process on Azurite, driven over HTTP like a user would."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError

from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent
from tests.helpers import request_json

pytestmark = pytest.mark.e2e


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        return request_json(
            method, self.base + path, body, {"Content-Type": "application/json", **(headers or {})}
        )


SIGNING_SECRET = "e2e-sig-5d1f"  # the devhost reads it from its settings; the fake agent checks it


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with FakeAgent(signing_secret=SIGNING_SECRET) as fake:
        yield fake


@pytest.fixture
def devhost(storage_env: dict[str, str], agent: FakeAgent) -> Iterator[Client]:
    settings = {
        **storage_env,
        "ROUTINES_AGENT_BACKEND": "http",
        "ROUTINES_AGENT_ENDPOINT": agent.url,
        "ROUTINES_AGENT_SIGNING_SECRET": SIGNING_SECRET,
        "ROUTINES_MIN_INTERVAL_SECONDS": "1",
    }
    with devhost_process(settings) as base:
        yield Client(f"{base}/api")


def routine_body(name: str, cron: str = "0 6 * * *", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "trigger": {"type": "schedule", "cron_expression": cron, "time_zone": "Europe/Paris"},
        "actions": [{"type": "invocation", "agent_id": "echo", "input": {"say": "hi"}}],
        **extra,
    }


def test_readme_walkthrough(devhost: Client) -> None:
    status, headers, created = devhost.call("POST", "/routines", routine_body("daily-scan"))
    assert status == 201, created
    rid = created["id"]
    assert headers["Location"] == f"/api/routines/{rid}" and headers["ETag"] == '"1"'
    assert created["next_fire_at"].endswith("Z") and created["state"] == "enabled"

    status, _, page = devhost.call("GET", "/routines?state=enabled")
    assert status == 200 and [r["id"] for r in page["items"]] == [rid]

    status, headers, got = devhost.call("GET", f"/routines/{rid}")
    assert status == 200 and got == created and headers["ETag"] == '"1"'

    status, _, patched = devhost.call(
        "PATCH",
        f"/routines/{rid}",
        {"description": "scan logs", "trigger": {"cron_expression": "0 7 * * *"}},
        {"If-Match": '"1"'},
    )
    assert status == 200 and patched["version"] == 2 and patched["trigger"]["cron_expression"] == "0 7 * * *"
    assert patched["trigger"]["time_zone"] == "Europe/Paris"
    assert devhost.call("PATCH", f"/routines/{rid}", {"description": "x"}, {"If-Match": '"1"'})[0] == 412

    status, _, disabled = devhost.call("POST", f"/routines/{rid}/disable")
    assert status == 200 and disabled["state"] == "disabled" and disabled["next_fire_at"] is None
    status, _, enabled = devhost.call("POST", f"/routines/{rid}/enable")
    assert status == 200 and enabled["state"] == "enabled" and enabled["next_fire_at"] is not None

    assert devhost.call("DELETE", f"/routines/{rid}")[0] == 204
    assert devhost.call("GET", f"/routines/{rid}")[0] == 404
    status, _, problem = devhost.call("POST", "/routines", {"name": "x", "bogus": 1})
    assert status == 422 and any(e["loc"] == ["bogus"] for e in problem["errors"])
    status, _, health = devhost.call("GET", "/health")
    assert status == 200 and health == {"status": "ok"}


def test_second_schedule_fires_on_time_and_runs_read_back(devhost: Client, agent: FakeAgent) -> None:
    status, _, created = devhost.call("POST", "/routines", routine_body("every-5s", "*/5 * * * * *"))
    assert status == 201, created
    rid = created["id"]
    agent.wait_for_calls(2, timeout=30)
    calls = agent.calls_for("echo")[:2]
    for call in calls:
        scheduled = datetime.fromisoformat(call.body["scheduled_for"].replace("Z", "+00:00")).timestamp()
        # On time means within the 5 s period, not a minute tick late (latency figures: bench/).
        assert 0 <= call.received_at - scheduled < 4.5, (call.body["scheduled_for"], call.received_at)
        assert (
            call.headers["Idempotency-Key"]
            == call.body["idempotency_key"]
            == f"{rid}:{call.body['scheduled_for']}"
        )
        assert call.headers.get("traceparent", "").startswith("00-")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, _, runs = devhost.call("GET", f"/routines/{rid}/runs?status=succeeded")
        if len(runs["items"]) >= 2:
            break
        time.sleep(0.5)
    assert status == 200 and len(runs["items"]) >= 2
    newest, older = runs["items"][0], runs["items"][1]
    assert newest["scheduled_for"] > older["scheduled_for"]
    assert newest["attempt"] == 1 and newest["trigger"] == "schedule"
    assert newest["idempotency_key"] == f"{rid}:{newest['scheduled_for']}"
    assert newest["actions"][0]["status"] == "succeeded" and newest["trace_id"]
    status, _, one = devhost.call("GET", f"/routines/{rid}/runs/{newest['id']}")
    assert status == 200 and one["id"] == newest["id"]


def test_manual_dispatch_with_retry(devhost: Client, agent: FakeAgent) -> None:
    agent.script("flaky", [500, 200])
    body = routine_body("manual-one")
    body["actions"][0]["agent_id"] = "flaky"
    body["retry_policy"] = {"max_attempts": 3, "delays_seconds": [1]}
    rid = devhost.call("POST", "/routines", body)[2]["id"]
    status, _headers, run = devhost.call("POST", f"/routines/{rid}/dispatch", {"input": "now please"})
    assert status == 202 and run["trigger"] == "manual" and run["status"] == "queued"
    assert run["idempotency_key"] == f"{rid}:manual:{run['id']}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = devhost.call("GET", f"/routines/{rid}/runs/{run['id']}")[2]
        if run["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.3)
    assert run["status"] == "succeeded" and run["attempt"] == 2, run
    keys = {c.headers["Idempotency-Key"] for c in agent.calls_for("flaky")}
    assert keys == {run["idempotency_key"]}
    assert [c.body["input"] for c in agent.calls_for("flaky")] == ["now please", "now please"]


def test_unreadable_message_goes_to_poison_and_the_worker_carries_on(
    devhost: Client, agent: FakeAgent, storage_env: dict[str, str]
) -> None:
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

    queue_name = storage_env["ROUTINES_QUEUE_NAME"]
    connection = storage_env["AzureWebJobsStorage"]
    sender = QueueClient.from_connection_string(
        connection, queue_name, message_encode_policy=TextBase64EncodePolicy()
    )
    with contextlib.suppress(ResourceExistsError):  # the host may not have created it yet
        sender.create_queue()
    sender.send_message('{"v": 1, "kind": "explode"}')
    rid = devhost.call("POST", "/routines", routine_body("after-poison"))[2]["id"]
    run = devhost.call("POST", f"/routines/{rid}/dispatch")[2]

    poison = QueueClient.from_connection_string(
        connection, f"{queue_name}-poison", message_decode_policy=TextBase64DecodePolicy()
    )
    deadline = time.monotonic() + 20
    seen: list[str] = []
    while time.monotonic() < deadline and not seen:
        seen = [m.content for m in poison.peek_messages(max_messages=5)]
        time.sleep(0.3)
    assert any("explode" in text for text in seen), seen  # moved at once, base64 like the queue
    while time.monotonic() < deadline:
        run = devhost.call("GET", f"/routines/{rid}/runs/{run['id']}")[2]
        if run["status"] == "succeeded":
            break
        time.sleep(0.3)
    assert run["status"] == "succeeded"
