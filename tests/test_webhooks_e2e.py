"""Webhook triggers end to end: the devhost as a real process on Azurite, deliveries signed by the
Standard Webhooks reference library over HTTP, runs reaching the fake HTTP agent."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks import Webhook

from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent
from tests.helpers import request_json

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(b"end-to-end webhook secret").decode()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    status, _, answer = request_json("POST", url, headers=headers, data=body)
    return status, answer


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


@pytest.fixture
def base(storage_env: dict[str, str], agent: FakeAgent) -> Iterator[str]:
    settings = {
        **storage_env,
        "ROUTINES_AGENT_BACKEND": "http",
        "ROUTINES_AGENT_ENDPOINT": agent.url,
        "HOOK_SECRET": SECRET,  # the app setting the routines name in secret_setting
    }
    with devhost_process(settings) as url:
        yield f"{url}/api"


def create(base: str, name: str, **trigger: Any) -> str:
    body = {
        "name": name,
        "trigger": {
            "type": "webhook",
            "signature": "standard-webhooks",
            "secret_setting": "HOOK_SECRET",
            **trigger,
        },
        "actions": [
            {
                "type": "invocation",
                "agent_id": "reviewer",
                "input": {"task": "review #{{event.number}}", "number": "{{event.number}}"},
            }
        ],
    }
    status, created = post(
        f"{base}/routines", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 201, created
    return str(created["id"])


def deliver(base: str, key: str, event: Any, msg_id: str) -> tuple[int, Any]:
    body = json.dumps(event).encode()
    now = datetime.now(UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(msg_id, now, body.decode()),
    }
    return post(f"{base}/hooks/{key}", body, headers)


def wait_for_run(base: str, rid: str, run_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = get(f"{base}/routines/{rid}/runs/{run_id}")
        if run["status"] in ("succeeded", "failed", "skipped", "cancelled"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {run.get('status')}")


def test_a_signed_delivery_reaches_the_agent_once_with_the_event(base: str, agent: FakeAgent) -> None:
    rid = create(base, "on-event", when=[{"path": "kind", "op": "eq", "value": "pr"}])
    status, run = deliver(base, "on-event", {"kind": "pr", "number": 42}, "msg_e2e_1")
    assert status == 202, run
    assert run["trigger"] == "webhook" and run["event"]["body"] == {"kind": "pr", "number": 42}
    [call] = agent.wait_for_calls(1, timeout=30, agent="reviewer")
    assert call.input == {"task": "review #42", "number": 42}
    assert call.idempotency_key == f"{rid}:event:msg_e2e_1"
    assert call.headers.get("traceparent", "").startswith("00-")
    done = wait_for_run(base, rid, run["id"])
    assert done["status"] == "succeeded" and done["trace_id"]

    # The sender retries the same delivery: the same run, no second agent start.
    status, again = deliver(base, rid, {"kind": "pr", "number": 42}, "msg_e2e_1")
    assert status == 200 and again["id"] == run["id"]
    # Filtered out: 204, no run.
    status, nothing = deliver(base, rid, {"kind": "issue", "number": 1}, "msg_e2e_2")
    assert status == 204 and nothing is None
    # A bad signature: 401.
    status, problem = post(
        f"{base}/hooks/{rid}",
        b'{"kind": "pr"}',
        {"webhook-id": "x", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"},
    )
    assert status == 401 and problem["status"] == 401
    time.sleep(2)  # room for a wrongly started second run to show up
    assert len(agent.starts("reviewer")) == 1
    runs = get(f"{base}/routines/{rid}/runs")["items"]
    assert [r["id"] for r in runs] == [run["id"]]


def test_a_debounced_burst_makes_one_run_of_the_latest_event(base: str, agent: FakeAgent) -> None:
    rid = create(base, "debounced", debounce_seconds=4)
    answers = [deliver(base, rid, {"number": n}, f"burst-{n}") for n in range(2)]
    last_sent = time.time()  # the last delivery is received after this instant
    answers.append(deliver(base, rid, {"number": 2}, "burst-2"))
    assert [status for status, _ in answers] == [202, 202, 202], answers
    run_ids = {run["id"] for _, run in answers}
    assert len(run_ids) == 1, "the burst took longer than the window; deliveries fell into two windows"
    [call] = agent.wait_for_calls(1, timeout=40, agent="reviewer")
    assert call.input == {"task": "review #2", "number": 2}  # the latest event
    assert call.received_at >= last_sent + 4  # started once quiet for the window
    run = wait_for_run(base, rid, run_ids.pop())
    assert run["status"] == "succeeded" and run["coalesced_fires"] == 2 and run["event"]["id"] == "burst-2"
    time.sleep(2)
    assert len(agent.starts("reviewer")) == 1
