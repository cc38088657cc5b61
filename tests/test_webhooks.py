"""Webhook triggers through the API and the dispatcher, in memory with a fake clock: a
signed delivery becomes one run whose agent input holds the event; redeliveries, filters, debounce,
and every bad input (which stores and sends nothing)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from standardwebhooks import Webhook

from routines.agents.base import AgentCall, AgentOutcome
from routines.api import Api, Request, Response
from routines.config import Settings, StorageTarget
from routines.dispatcher import Dispatcher
from routines.messages import MemoryQueue
from routines.purge import purge
from routines.repair import repair
from routines.store.memory import MemoryStore
from tests.helpers import Clock

NOW = datetime(2026, 12, 4, 21, 0, 0, tzinfo=UTC)
SECRET = "whsec_" + base64.b64encode(b"a 24-byte secret for tests").decode()
GITHUB_SECRET = "gh-secret"
EVENT = {"action": "opened", "pull_request": {"number": 7, "title": "Fix it"}, "labels": ["bug"]}


class Agent:
    """Answers at once (or stays pending while ``pending``); keeps every call."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[datetime, AgentCall]] = []
        self.pending = False

    def start(self, call: AgentCall) -> AgentOutcome:
        self.calls.append((self.clock(), call))
        if self.pending:
            return AgentOutcome(done=False, handle={"run": call.run_id}, poll_after=1)
        return AgentOutcome(done=True, output="done")

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        return AgentOutcome(done=not self.pending, output="done", handle=handle, poll_after=1)

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        return None


class World:
    def __init__(self, **app_settings: str) -> None:
        self.clock = Clock(NOW)
        self.store, self.queue = MemoryStore(), MemoryQueue()
        values = {"HOOK_SECRET": SECRET, "GH_SECRET": GITHUB_SECRET, **app_settings}
        self.settings = Settings(
            StorageTarget("x"), min_interval_seconds=1, app_settings={k: v for k, v in values.items() if v}
        )
        self.api = Api(self.store, self.queue, self.settings, self.clock)
        self.agent = Agent(self.clock)
        self.dispatcher = Dispatcher(
            self.store, self.queue, self.agent, clock=self.clock, sleep=self.clock.sleep
        )
        self.pending: list[tuple[datetime, Any]] = []

    def call(self, handler: str, body: Any = None, **route: str) -> Response:
        raw = b"" if body is None else json.dumps(body).encode()
        request = Request("POST", route, {}, {"content-type": "application/json"} if raw else {}, raw)
        return self.api.handle(getattr(self.api, handler), request)

    def create(self, name: str = "on-pr", **trigger: Any) -> dict[str, Any]:
        response = self.call("create_routine", routine_body(name, **trigger))
        assert response.status == 201, response.body
        body: dict[str, Any] = response.body
        return body

    def deliver(
        self,
        key: str,
        event: Any = EVENT,
        *,
        msg_id: str = "msg_1",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        at: datetime | None = None,
    ) -> Response:
        """A Standard Webhooks delivery signed by the reference library (``headers`` override)."""
        body = raw if raw is not None else json.dumps(event).encode()
        stamp = at or self.clock()
        try:
            signature = Webhook(SECRET).sign(msg_id, stamp, body.decode())
        except UnicodeDecodeError:  # the reference signer takes text only: sign the bytes by hand
            secret = base64.b64decode(SECRET.removeprefix("whsec_"))
            content = f"{msg_id}.{int(stamp.timestamp())}.".encode() + body
            signature = "v1," + base64.b64encode(hmac.new(secret, content, hashlib.sha256).digest()).decode()
        all_headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int((at or self.clock()).timestamp())),
            "webhook-signature": signature,
            "user-agent": "Svix-Webhooks/1.0",
            **(headers or {}),
        }
        request = Request("POST", {"key": key}, {}, {k: v for k, v in all_headers.items() if v}, body)
        return self.api.handle(self.api.receive_hook, request)

    def drain(self, until: datetime | None = None) -> None:
        """Deliver queued messages in due order, moving the clock (up to ``until``)."""
        for _ in range(500):
            self.pending += [(self.clock() + timedelta(seconds=d), m) for d, m in self.queue.take_all()]
            self.pending.sort(key=lambda item: item[0])
            if not self.pending or (until is not None and self.pending[0][0] > until):
                break
            due, message = self.pending.pop(0)
            self.clock.now = max(self.clock.now, due)
            self.dispatcher.handle(message.encode())
        if until is not None:
            self.clock.now = max(self.clock.now, until)

    def runs(self, routine_id: str) -> list[dict[str, Any]]:
        return [r.public() for r in self.store.list_runs(routine_id, None, 200, None).items]

    def rows(self) -> tuple[Any, ...]:
        """Every stored row and every message sent: what a bad request must leave unchanged."""
        return (dict(self.store._routines), dict(self.store._runs), len(self.queue.sent))


def routine_body(name: str = "on-pr", **trigger: Any) -> dict[str, Any]:
    return {
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
                "input": {
                    "instructions": "Review PR #{{event.pull_request.number}}: {{event.pull_request.title}}",
                    "number": "{{event.pull_request.number}}",
                    "labels": "{{event.labels}}",
                    "sender": "{{event_headers.user-agent}}",
                },
            }
        ],
    }


@pytest.fixture
def world() -> World:
    return World()


# --- routines with a webhook trigger -----------------------------------------------------------------


def test_a_webhook_routine_has_its_trigger_and_no_next_fire(world: World) -> None:
    created = world.create(when=[{"path": "action", "op": "eq", "value": "opened"}], debounce_seconds=0)
    assert created["trigger"] == {
        "type": "webhook",
        "signature": "standard-webhooks",
        "secret_setting": "HOOK_SECRET",
        "when": [{"path": "action", "op": "eq", "value": "opened"}],
        "debounce_seconds": 0,
    }
    assert created["next_fire_at"] is None and created["state"] == "enabled"
    assert not world.queue.sent  # nothing fires in time
    disabled = world.call("disable_routine", id=created["id"]).body
    enabled = world.call("enable_routine", id=created["id"])
    assert disabled["state"] == "disabled" and enabled.status == 200 and enabled.body["state"] == "enabled"


@pytest.mark.parametrize(
    ("settings", "trigger", "message"),
    [
        pytest.param({"HOOK_SECRET": ""}, {}, "not defined", id="setting_undefined"),
        pytest.param({}, {"secret_setting": "NO_SUCH_SETTING"}, "not defined", id="other_name_undefined"),
        pytest.param(
            {"HOOK_SECRET": "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/hook)"},
            {},
            "Key Vault",
            id="key_vault_reference_unresolved",
        ),
        pytest.param({"HOOK_SECRET": "not-a-whsec-secret!"}, {}, "whsec_", id="not_a_standard_secret"),
        pytest.param({}, {"signature": "hmac"}, "", id="unknown_scheme"),
        pytest.param({}, {"secret_setting": "has space"}, "", id="setting_name_malformed"),
        pytest.param(
            {}, {"when": [{"path": "a", "op": "eq"}]}, "needs a value", id="condition_without_value"
        ),
        pytest.param({}, {"when": [{"path": "a", "op": "in", "value": 1}]}, "a list", id="in_without_list"),
        pytest.param({}, {"when": [{"path": "a..b", "op": "exists"}]}, "", id="empty_path_segment"),
        pytest.param({}, {"debounce_seconds": -1}, "", id="negative_debounce"),
        pytest.param({}, {"debounce_seconds": True}, "", id="boolean_debounce"),
        pytest.param({}, {"secret": SECRET}, "", id="secret_itself_is_not_a_field"),
    ],
)
def test_invalid_webhook_triggers_are_422_and_store_nothing(
    settings: dict[str, str], trigger: dict[str, Any], message: str
) -> None:
    world = World(**settings)
    before = world.rows()
    response = world.call("create_routine", routine_body(**trigger))
    assert response.status == 422, response.body
    assert message in response.body["detail"]
    assert all(e["loc"][0] == "trigger" for e in response.body["errors"]), response.body["errors"]
    assert world.rows() == before
    assert SECRET not in json.dumps(response.body)


def test_patching_a_routine_to_a_webhook_checks_the_secret_setting(world: World) -> None:
    created = world.call(
        "create_routine",
        {**routine_body(), "trigger": {"type": "schedule", "cron_expression": "0 6 * * *"}},
    ).body
    patch = {"trigger": {"type": "webhook", "signature": "github", "secret_setting": "UNSET_NAME"}}
    request = Request(
        "PATCH", {"id": created["id"]}, {}, {"content-type": "application/json"}, json.dumps(patch).encode()
    )
    assert world.api.handle(world.api.patch_routine, request).status == 422
    patch["trigger"]["secret_setting"] = "GH_SECRET"
    request = Request(
        "PATCH", {"id": created["id"]}, {}, {"content-type": "application/json"}, json.dumps(patch).encode()
    )
    patched = world.api.handle(world.api.patch_routine, request)
    assert patched.status == 200 and patched.body["next_fire_at"] is None


# --- deliveries ----------------------------------------------------------------------------------------


def test_a_signed_delivery_becomes_one_run_whose_agent_input_holds_the_event(world: World) -> None:
    rid = world.create()["id"]
    response = world.deliver(rid)
    assert response.status == 202, response.body
    run = response.body
    assert response.headers["Location"] == f"/api/routines/{rid}/runs/{run['id']}"
    assert run["trigger"] == "webhook" and run["status"] == "queued"
    assert run["idempotency_key"] == f"{rid}:event:msg_1"
    assert run["scheduled_for"] == "2026-12-04T21:00:00Z"
    assert run["event"]["id"] == "msg_1" and run["event"]["body"] == EVENT
    assert run["event"]["headers"]["user-agent"] == "Svix-Webhooks/1.0"
    assert "webhook-signature" not in run["event"]["headers"]
    [(delay, message)] = world.queue.sent
    assert message.kind == "fire" and message.run_id == run["id"] and delay == 0
    assert [w.run_id for w in world.store.watched(NOW + timedelta(days=1), 10)] == [run["id"]]

    world.drain()
    [(started, call)] = world.agent.calls
    assert started == NOW
    assert call.idempotency_key == f"{rid}:event:msg_1"
    assert call.input == {
        "instructions": "Review PR #7: Fix it",
        "number": 7,  # a whole-string placeholder keeps its JSON type
        "labels": ["bug"],
        "sender": "Svix-Webhooks/1.0",
    }
    [done] = world.runs(rid)
    assert done["status"] == "succeeded" and done["event"]["body"] == EVENT
    got = world.api.handle(world.api.get_run, Request("GET", {"id": rid, "run_id": run["id"]}))
    assert got.status == 200 and got.body["event"] == run["event"]
    assert not world.store.watched(NOW + timedelta(days=1), 10)  # finished: no longer watched


def test_the_routine_may_be_named_in_the_url(world: World) -> None:
    rid = world.create("named-hook")["id"]
    response = world.deliver("named-hook")
    assert response.status == 202 and response.body["routine_id"] == rid


def test_a_redelivery_answers_the_same_run_and_starts_no_second(world: World) -> None:
    rid = world.create()["id"]
    first = world.deliver(rid)
    world.drain()
    world.clock.sleep(60)
    again = world.deliver(rid)  # the sender retries: same id, same body, a new timestamp
    assert again.status == 200 and again.body["id"] == first.body["id"]
    assert again.body["status"] == "succeeded"
    world.drain()
    assert len(world.agent.calls) == 1 and len(world.runs(rid)) == 1


def test_a_replayed_id_with_another_body_keeps_the_first_run_and_is_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rid = world.create()["id"]
    first = world.deliver(rid)
    with caplog.at_level(logging.WARNING, logger="routines.webhooks.intake"):
        replay = world.deliver(rid, {**EVENT, "action": "closed"})
    assert replay.status == 200 and replay.body["id"] == first.body["id"]
    assert replay.body["event"]["body"] == EVENT  # the first delivery stands
    assert any("another body" in r.getMessage() for r in caplog.records)
    world.drain()
    assert len(world.agent.calls) == 1 and len(world.runs(rid)) == 1


def test_two_copies_racing_start_one_run(world: World) -> None:
    """Both copies get as far as the write; the delivery row, inserted with the run, lets one win and
    the other answers with the winner's run."""
    import threading

    rid = world.create()["id"]
    both_ready = threading.Barrier(2, timeout=10)
    write = world.store.record_delivery

    def meet_then_write(*args: Any, **kwargs: Any) -> str:
        both_ready.wait()
        return write(*args, **kwargs)

    world.store.record_delivery = meet_then_write  # type: ignore[method-assign]
    answers: list[Response] = []
    copies = [threading.Thread(target=lambda: answers.append(world.deliver(rid))) for _ in range(2)]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join(10)
    assert sorted(a.status for a in answers) == [200, 202]
    assert answers[0].body["id"] == answers[1].body["id"]
    world.drain()
    assert len(world.agent.calls) == 1 and len(world.runs(rid)) == 1


def test_a_github_delivery_verifies_with_x_hub_signature_256(world: World) -> None:
    rid = world.create(signature="github", secret_setting="GH_SECRET")["id"]
    body = json.dumps(EVENT).encode()
    headers = {
        "content-type": "application/json",
        "x-github-event": "pull_request",
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "x-hub-signature-256": "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }
    response = world.api.handle(world.api.receive_hook, Request("POST", {"key": rid}, {}, headers, body))
    assert response.status == 202, response.body
    assert response.body["idempotency_key"] == f"{rid}:event:72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert response.body["event"]["headers"] == {
        "content-type": "application/json",
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "x-github-event": "pull_request",
    }


def test_when_false_is_204_with_a_debug_line_and_no_run(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rid = world.create(
        when=[
            {"path": "action", "op": "in", "value": ["opened", "reopened"]},
            {"path": "labels", "op": "contains", "value": "bug"},
        ]
    )["id"]
    before = world.rows()
    with caplog.at_level(logging.DEBUG, logger="routines.webhooks.intake"):
        response = world.deliver(rid, {**EVENT, "action": "closed"})
    assert response.status == 204 and response.body is None
    assert world.rows() == before
    assert any("filtered out" in r.getMessage() for r in caplog.records)
    assert world.deliver(rid, msg_id="msg_2").status == 202


# --- bad input: a clear answer, nothing stored, nothing sent -------------------------------------------


def _tamper_signature(world: World, rid: str) -> Response:
    return world.deliver(rid, headers={"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()})


BAD_INPUT = [
    pytest.param(lambda w, rid: _tamper_signature(w, rid), 401, id="bad_signature"),
    pytest.param(
        lambda w, rid: w.deliver(rid, headers={"webhook-signature": ""}), 401, id="missing_signature"
    ),
    pytest.param(lambda w, rid: w.deliver(rid, headers={"webhook-id": ""}), 401, id="missing_id"),
    pytest.param(
        lambda w, rid: w.deliver(rid, at=NOW - timedelta(minutes=10)), 401, id="timestamp_ten_minutes_old"
    ),
    pytest.param(
        lambda w, rid: w.deliver(rid, at=NOW + timedelta(minutes=10)), 401, id="timestamp_in_the_future"
    ),
    pytest.param(lambda w, rid: w.deliver("rt_0123456789abcdef"), 404, id="unknown_routine_id"),
    pytest.param(lambda w, rid: w.deliver("no-such-name"), 404, id="unknown_routine_name"),
    pytest.param(lambda w, rid: w.deliver("../etc/passwd"), 404, id="key_neither_id_nor_name"),
    pytest.param(lambda w, rid: w.deliver("daily"), 404, id="not_a_webhook_routine"),
    pytest.param(lambda w, rid: w.deliver("off"), 409, id="disabled_routine"),
    pytest.param(
        lambda w, rid: w.deliver(rid, raw=b"[" + b"1," * (128 * 1024) + b"1]"), 413, id="body_over_256_kib"
    ),
    pytest.param(
        lambda w, rid: w.deliver(rid, {"x": "y" * 261_000}, headers={"x-pad": "p" * 20_000}),
        413,
        id="event_over_the_stored_bound",
    ),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b"payload=%7B%7D"), 400, id="form_encoded_not_json"),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b'{"a": NaN}'), 400, id="nan_not_json"),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b'{"a": 1e999}'), 400, id="infinite_number"),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b"\xff\xfe{}"), 400, id="not_utf8"),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b""), 400, id="empty_body"),
    pytest.param(lambda w, rid: w.deliver(rid, raw=b"[" * 300 + b"]" * 300), 400, id="nested_too_deeply"),
]


@pytest.mark.parametrize(("send", "status"), BAD_INPUT)
def test_bad_deliveries_get_a_clear_error_and_change_nothing(send: Any, status: int) -> None:
    world = World()
    rid = world.create()["id"]
    world.call(
        "create_routine",
        {**routine_body("daily"), "trigger": {"type": "schedule", "cron_expression": "0 6 * * *"}},
    )
    off = world.create("off")["id"]
    world.call("disable_routine", id=off)
    before = world.rows()
    response = send(world, rid)
    assert response.status == status, response.body
    assert response.body["status"] == status and response.body["detail"]
    assert response.headers["Content-Type"] == "application/problem+json"
    assert world.rows() == before


def test_a_removed_secret_setting_is_503_and_logged_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    rid = world.create()["id"]
    world.settings = Settings(StorageTarget("x"), min_interval_seconds=1)  # the app setting was removed
    world.api = Api(world.store, world.queue, world.settings, world.clock)
    before = world.rows()
    with caplog.at_level(logging.ERROR):
        response = world.deliver(rid)
    assert response.status == 503 and world.rows() == before
    assert any("HOOK_SECRET" in r.getMessage() for r in caplog.records)


def test_the_secret_never_reaches_storage_messages_or_answers(world: World) -> None:
    rid = world.create()["id"]
    response = world.deliver(rid, headers={"authorization": "Bearer sk-live-token"})
    world.drain()
    stored = json.dumps([list(world.store._routines.values()), list(world.store._runs.values())], default=str)
    sent = json.dumps([m.encode() for _, m in world.queue.sent])
    key = SECRET.removeprefix("whsec_")
    for text in (stored, sent, json.dumps(response.body)):
        assert key not in text and "sk-live-token" not in text
    assert "authorization" not in response.body["event"]["headers"]


# --- debounce ------------------------------------------------------------------------------------------


def test_a_debounced_burst_makes_one_run_of_the_latest_event_once_quiet(world: World) -> None:
    rid = world.create(debounce_seconds=5)["id"]
    answers = []
    for n in range(4):  # at 0, 2, 4 and 6 s: each inside the window the one before opened
        answers.append(
            world.deliver(rid, {**EVENT, "pull_request": {"number": n, "title": f"t{n}"}}, msg_id=f"m{n}")
        )
        world.drain(until=world.clock() + timedelta(seconds=2))
    assert [a.status for a in answers] == [202] * 4
    assert len({a.body["id"] for a in answers}) == 1
    assert {m.run_id for _, m in world.queue.sent} == {answers[0].body["id"]}  # one run's messages
    assert not world.agent.calls  # still inside the window
    world.drain()
    [(started, call)] = world.agent.calls
    assert started == NOW + timedelta(seconds=6 + 5)  # quiet for 5 s after the last delivery
    assert isinstance(call.input, dict)
    assert call.input["number"] == 3 and call.input["instructions"] == "Review PR #3: t3"
    [run] = world.runs(rid)
    assert run["status"] == "succeeded" and run["coalesced_fires"] == 3 and run["event"]["id"] == "m3"
    assert run["idempotency_key"] == f"{rid}:event:m0"
    # A redelivery of any delivery of the burst answers that run.
    again = world.deliver(rid, {**EVENT, "pull_request": {"number": 1, "title": "t1"}}, msg_id="m1")
    assert again.status == 200 and again.body["id"] == run["id"]
    # The window closed when the run started: the next delivery opens a new one.
    later = world.deliver(rid, msg_id="m9")
    assert later.status == 202 and later.body["id"] != run["id"]
    world.drain()
    assert len(world.agent.calls) == 2 and len(world.runs(rid)) == 2


def test_the_debounce_message_re_queues_itself_rather_than_polling(world: World) -> None:
    rid = world.create(debounce_seconds=30)["id"]
    for n in range(10):
        world.deliver(rid, msg_id=f"m{n}")
        world.clock.sleep(20)
    handled = 0
    original = world.dispatcher.handle

    def counted(body: bytes | str) -> None:
        nonlocal handled
        handled += 1
        original(body)

    world.dispatcher.handle = counted  # type: ignore[method-assign]
    world.drain()
    assert len(world.agent.calls) == 1
    assert handled <= 12, handled  # one message per extension at most, not one per second


def test_a_debounced_run_whose_message_is_lost_is_started_by_the_repair_pass(world: World) -> None:
    rid = world.create(debounce_seconds=10)["id"]
    world.deliver(rid, msg_id="m0")
    world.clock.sleep(4)
    world.deliver(rid, msg_id="m1")
    world.queue.take_all()  # the worker crashed: the delayed message is gone
    repair_after = timedelta(seconds=world.settings.repair_after_seconds)
    quiet = NOW + timedelta(seconds=14)
    for seconds in range(0, 400, 15):  # the repair timer, every 15 s
        world.clock.now = NOW + timedelta(seconds=seconds)
        repair(world.store, world.queue, world.clock(), repair_after, owner="test")
        world.drain(until=world.clock())
    [(started, _)] = world.agent.calls
    assert quiet + repair_after <= started <= quiet + repair_after + timedelta(seconds=20)
    assert world.runs(rid)[0]["status"] == "succeeded" and world.runs(rid)[0]["event"]["id"] == "m1"


def test_webhook_runs_follow_the_overlap_policy(world: World) -> None:
    rid = world.create()["id"]
    world.agent.pending = True
    world.deliver(rid, msg_id="a")
    world.drain(until=world.clock() + timedelta(seconds=3))
    world.deliver(rid, msg_id="b")
    world.drain(until=world.clock() + timedelta(seconds=3))
    statuses = sorted(r["status"] for r in world.runs(rid))
    assert statuses == ["running", "skipped"]  # overlap_policy skip, the default
    world.agent.pending = False
    world.drain()
    assert sorted(r["status"] for r in world.runs(rid)) == ["skipped", "succeeded"]


def test_the_purge_forgets_deliveries_with_their_runs(world: World) -> None:
    rid = world.create()["id"]
    world.deliver(rid)
    world.drain()
    later = NOW + timedelta(days=world.settings.run_retention_days + 1)
    assert purge(world.store, world.settings, later) == 1
    assert world.store.get_delivery(rid, "msg_1") is None
    world.clock.now = later
    assert world.deliver(rid).status == 202  # remembered as long as runs are kept, not for ever


def test_the_scheme_defaults_to_standard_webhooks_and_one_condition_needs_no_list(world: World) -> None:
    body = routine_body(when={"path": "action", "op": "eq", "value": "opened"})
    del body["trigger"]["signature"]
    created = world.call("create_routine", body).body
    assert created["trigger"]["signature"] == "standard-webhooks"
    assert created["trigger"]["when"] == [{"path": "action", "op": "eq", "value": "opened"}]
    assert world.deliver(created["id"]).status == 202


def test_the_hook_route_is_anonymous_and_the_management_routes_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys
    from pathlib import Path

    from routines.devhost import discover_functions, find_function_app, load_app_module

    monkeypatch.setitem(sys.modules, "function_app", sys.modules.get("function_app"))  # restored after
    root = Path(__file__).resolve().parent.parent
    specs = discover_functions(find_function_app(load_app_module(root)), {})
    levels = {
        s.trigger["route"]: str(s.trigger["authLevel"]) for s in specs if s.trigger_type == "httpTrigger"
    }
    anonymous = {route for route, level in levels.items() if level.lower().endswith("anonymous")}
    assert "hooks/{key}" in anonymous
    assert "routines" in levels and "routines" not in anonymous
    public = {"hooks/{key}", "health", "openapi.json"}  # and the dashboard's files, and /api/foundry (Entra)
    assert anonymous <= public | {r for r in levels if r.startswith(("ui", "foundry/"))}


def test_a_redelivery_inside_the_debounce_window_does_not_fold_again(world: World) -> None:
    rid = world.create(debounce_seconds=10)["id"]
    first = world.deliver(rid, msg_id="m0")
    world.drain(until=world.clock() + timedelta(seconds=1))
    again = world.deliver(rid, msg_id="m0")
    assert first.status == 202 and again.status == 200 and again.body["id"] == first.body["id"]
    assert (
        again.body["coalesced_fires"] == 0 and again.body["next_attempt_at"] == first.body["next_attempt_at"]
    )
    world.drain()
    [(started, _)] = world.agent.calls
    assert started == NOW + timedelta(seconds=10)  # the window did not move for the redelivery


def test_the_openapi_document_describes_webhook_routines_runs_and_conditions(world: World) -> None:
    import jsonschema

    from routines import openapi

    schemas = openapi.document()["components"]["schemas"]
    routine = world.create(when=[{"path": "action", "op": "in", "value": ["opened"]}], debounce_seconds=2)
    run = world.deliver(routine["id"]).body
    for name, instance in (("Routine", routine), ("Run", run)):
        jsonschema.validate(instance, {**schemas[name], "components": {"schemas": schemas}})
    condition = {**schemas["EventCondition"], "components": {"schemas": schemas}}
    jsonschema.validate({"path": "a", "op": "exists"}, condition)
    for bad in (
        {"path": "a", "op": "in", "value": 1},
        {"path": "a", "op": "eq"},
        {"op": "exists", "value": 3},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, condition)
    assert "/api/hooks/{key}" in openapi.document()["paths"]
