"""Steps end to end: the devhost as a real process on Azurite, the fake HTTP agent, driven over HTTP.
A diamond (a -> b, c in parallel -> d using both outputs), and an approval approved and one rejected."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.devhost_process import devhost_process
from tests.fake_agent import FakeAgent, Reply
from tests.helpers import wait_for
from tests.test_e2e import Client

pytestmark = pytest.mark.e2e
SLOW = 4.0  # seconds b's agent takes: c must have started before b answers


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with FakeAgent() as fake:
        yield fake


@pytest.fixture
def devhost(storage_env: dict[str, str], agent: FakeAgent) -> Iterator[Client]:
    settings = {**storage_env, "ROUTINES_AGENT_BACKEND": "http", "ROUTINES_AGENT_ENDPOINT": agent.url}
    with devhost_process(settings) as base:
        yield Client(f"{base}/api")


def create(devhost: Client, name: str, actions: list[dict[str, Any]], **fields: Any) -> str:
    body = {
        "name": name,
        "trigger": {"type": "schedule", "cron_expression": "0 6 1 1 *"},
        "actions": actions,
        **fields,
    }
    status, _, created = devhost.call("POST", "/routines", body)
    assert status == 201, created
    return str(created["id"])


def dispatch(devhost: Client, rid: str) -> str:
    status, _, run = devhost.call("POST", f"/routines/{rid}/dispatch")
    assert status == 202, run
    return str(run["id"])


def run_of(devhost: Client, rid: str, run_id: str) -> dict[str, Any]:
    status, _, run = devhost.call("GET", f"/routines/{rid}/runs/{run_id}")
    assert status == 200, run
    return dict(run)


def ended(devhost: Client, rid: str, run_id: str) -> dict[str, Any] | None:
    run = run_of(devhost, rid, run_id)
    return run if run["status"] in ("succeeded", "failed", "cancelled") else None


def test_a_diamond_runs_its_middle_steps_in_parallel_and_joins_their_outputs(
    devhost: Client, agent: FakeAgent
) -> None:
    agent.script("triage", [Reply.ok(json.dumps({"severity": "high"}))])
    agent.script("scan-us", [Reply.slow(SLOW, Reply.ok(json.dumps({"findings": 3})))])
    agent.script("scan-eu", [Reply.ok(json.dumps({"findings": 5}))])
    agent.script("summary", [Reply.ok("2 regions")])
    rid = create(
        devhost,
        "diamond",
        [
            {"type": "invocation", "agent_id": "triage", "id": "triage", "input": "look"},
            {"type": "invocation", "agent_id": "scan-us", "id": "us", "after": ["triage"], "input": "us"},
            {"type": "invocation", "agent_id": "scan-eu", "id": "eu", "after": ["triage"], "input": "eu"},
            {
                "type": "invocation",
                "agent_id": "summary",
                "id": "summary",
                "after": ["us", "eu"],
                "input": {"us": "{{steps.us.output.findings}}", "eu": "{{steps.eu.output.findings}}"},
            },
        ],
    )
    run_id = dispatch(devhost, rid)
    run = wait_for(lambda: ended(devhost, rid, run_id))
    assert run["status"] == "succeeded", run
    assert [(s["id"], s["status"], s["attempt"]) for s in run["actions"]] == [
        ("triage", "succeeded", 1),
        ("us", "succeeded", 1),
        ("eu", "succeeded", 1),
        ("summary", "succeeded", 1),
    ]
    [us], [eu], [summary] = agent.starts("scan-us"), agent.starts("scan-eu"), agent.starts("summary")
    # eu started while us was still working: they ran in parallel, not one after the other.
    assert eu.received_at < us.received_at + SLOW, (us.received_at, eu.received_at)
    print(f"parallel steps started {abs(eu.received_at - us.received_at):.3f} s apart")
    assert summary.input == {"us": 3, "eu": 5}
    assert summary.received_at >= us.received_at + SLOW - 0.5, "the join waited for both"
    assert {c.idempotency_key for c in agent.starts()} == {
        f"{rid}:manual:{run_id}:{s}" for s in ("triage", "us", "eu", "summary")
    }
    for step in run["actions"]:
        assert step["started_at"] <= step["ended_at"]


GATED: list[dict[str, Any]] = [
    {"type": "invocation", "agent_id": "writer", "id": "draft", "input": "write it"},
    {"type": "approval", "id": "review", "timeout_seconds": 3600},
    {"type": "invocation", "agent_id": "mailer", "id": "send", "input": "send: {{steps.draft.output}}"},
]


def waiting(devhost: Client, rid: str, run_id: str) -> dict[str, Any] | None:
    run = run_of(devhost, rid, run_id)
    return run if run["status"] == "waiting" else None


def test_an_approval_approved_and_one_rejected(devhost: Client, agent: FakeAgent) -> None:
    agent.set_default("writer", Reply.ok("the draft"))
    # allow_all: a run held by an approval still holds the overlap slot (the second would be skipped)
    rid = create(devhost, "gated", GATED, overlap_policy="allow_all")
    approved, rejected = dispatch(devhost, rid), dispatch(devhost, rid)
    for run_id in (approved, rejected):
        run = wait_for(functools.partial(waiting, devhost, rid, run_id))
        assert [s["status"] for s in run["actions"]] == ["succeeded", "waiting", "pending"]
    status, _, page = devhost.call("GET", f"/routines/{rid}/runs?status=waiting")
    assert status == 200 and {r["id"] for r in page["items"]} == {approved, rejected}

    status, _, body = devhost.call(
        "POST", f"/routines/{rid}/runs/{approved}/steps/review/approve", {"comment": "go"}
    )
    assert status == 200 and body["actions"][1]["status"] == "succeeded", body
    status, _, body = devhost.call("POST", f"/routines/{rid}/runs/{rejected}/steps/review/reject")
    assert status == 200 and body["actions"][1]["status"] == "failed", body
    assert devhost.call("POST", f"/routines/{rid}/runs/{rejected}/steps/review/approve")[0] == 409
    assert devhost.call("POST", f"/routines/{rid}/runs/{rejected}/steps/nope/approve")[0] == 404

    done = wait_for(lambda: ended(devhost, rid, approved))
    assert done["status"] == "succeeded" and done["actions"][1]["comment"] == "go"
    assert done["actions"][1]["decided_at"].endswith("Z")
    [mail] = agent.starts("mailer")
    assert mail.input == "send: the draft" and mail.body["run_id"] == approved
    failed = wait_for(lambda: ended(devhost, rid, rejected))
    assert failed["status"] == "failed" and [s["status"] for s in failed["actions"]] == [
        "succeeded",
        "failed",
        "skipped",
    ]
    assert failed["error_message"] == "step review: rejected"
