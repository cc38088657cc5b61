"""The management API of docs/api.md through ``routines.api.Api``: a MemoryStore, a MemoryQueue and
an injected clock, so every case is fast and exact; the hostile-input cases also run on Azurite.

Every bad request asserts that nothing stored changed (routines, due index, runs, queue).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from azure.data.tables import TableServiceClient

from routines import openapi, scheduler
from routines.api import MAX_BODY_BYTES, Api, Request, Response
from routines.config import Settings, StorageTarget
from routines.errors import StorageUnavailable
from routines.messages import MemoryQueue
from routines.models import MAX_INPUT_BYTES, scheduled_run_id
from routines.store import Advance, Store, codec
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore
from tests.helpers import Clock

NOW = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)  # a Sunday; Paris is on UTC+1, New York on UTC-5
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

ROUTES: list[tuple[str, str, str]] = [
    ("POST", "routines", "create_routine"),
    ("GET", "routines", "list_routines"),
    ("GET", "routines/{id}", "get_routine"),
    ("PATCH", "routines/{id}", "patch_routine"),
    ("DELETE", "routines/{id}", "delete_routine"),
    ("POST", "routines/{id}/disable", "disable_routine"),
    ("POST", "routines/{id}/enable", "enable_routine"),
    ("POST", "routines/{id}/dispatch", "dispatch_routine"),
    ("GET", "routines/{id}/runs", "list_runs"),
    ("GET", "routines/{id}/runs/{run_id}", "get_run"),
    ("POST", "preview", "preview"),
    ("GET", "health", "health"),
]


@dataclass
class Client:
    """Drives ``Api`` the way ``function_app.py`` does: one handler per route, lower-case headers."""

    api: Api
    store: Store
    queue: MemoryQueue
    clock: Clock

    def call(
        self,
        handler: str,
        method: str,
        *,
        route_params: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        all_headers = {"content-type": "application/json"} if raw else {}
        all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
        request = Request(method, route_params or {}, query or {}, all_headers, raw)
        return self.api.handle(getattr(self.api, handler), request)

    def request(
        self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        parts = urlsplit(url)
        segments = parts.path.removeprefix("/api/").split("/")
        for route_method, pattern, handler in ROUTES:
            names = pattern.split("/")
            if route_method != method or len(names) != len(segments):
                continue
            params: dict[str, str] = {}
            for name, segment in zip(names, segments, strict=True):
                if name.startswith("{"):
                    params[name[1:-1]] = unquote(segment)
                elif name != segment:
                    break
            else:
                query = dict(parse_qsl(parts.query, keep_blank_values=True))
                return self.call(
                    handler, method, route_params=params, query=query, body=body, headers=headers
                )
        raise AssertionError(f"no route for {method} {url}")

    def get(self, url: str, **kw: Any) -> Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", url, body, **kw)

    def patch(self, url: str, body: Any = None, **kw: Any) -> Response:
        return self.request("PATCH", url, body, **kw)

    def delete(self, url: str, **kw: Any) -> Response:
        return self.request("DELETE", url, **kw)

    def create(self, **changes: Any) -> dict[str, Any]:
        response = self.post("/api/routines", routine_body(**changes))
        assert response.status == 201, response.body
        body: dict[str, Any] = response.body
        return body

    def snapshot(self) -> dict[str, Any]:
        """Everything a request could have changed."""
        routines = self.store.list_routines(None, 200, None).items
        return {
            "routines": [(r.public(), r.schedule_version, r.due_at) for r in routines],
            "due": [
                (e.routine_id, e.fire_at, e.schedule_version)
                for e in self.store.due_entries(NOW + timedelta(days=3650))
            ],
            "runs": {
                r.id: [run.public() for run in self.store.list_runs(r.id, None, 200, None).items]
                for r in routines
            },
            "queued": len(self.queue.sent),
        }


def settings(min_interval_seconds: int = 60) -> Settings:
    return Settings(
        storage=StorageTarget(connection_string="UseDevelopmentStorage=true"),
        min_interval_seconds=min_interval_seconds,
    )


def make_client(store: Store, min_interval_seconds: int = 60) -> Client:
    clock, queue = Clock(NOW), MemoryQueue()
    return Client(Api(store, queue, settings(min_interval_seconds), clock), store, queue, clock)


@pytest.fixture
def client() -> Client:
    return make_client(MemoryStore())


@pytest.fixture(params=["memory", pytest.param("tables", marks=pytest.mark.azurite)])
def any_client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client on either store, for the cases where the storage adapter matters (hostile input)."""
    if request.param == "memory":
        yield make_client(MemoryStore())
        return
    azurite = request.getfixturevalue("azurite")
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    store = TableStore(service, request.getfixturevalue("table_prefix"))
    store.ensure_tables()
    yield make_client(store)
    for name in (store.routines_table, store.runs_table):
        service.delete_table(name)


def routine_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "daily-compliance-scan",
        "description": "Scan overnight logs",
        "trigger": cron("0 6 * * *", time_zone="UTC"),
        "actions": [
            {
                "type": "invocation",
                "agent_id": "asst_abc123",
                "input": {"instructions": "Scan overnight logs", "context": {"region": "us-east-1"}},
            }
        ],
    }
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def cron(expression: str, **changes: Any) -> dict[str, Any]:
    return {"type": "schedule", "cron_expression": expression, **changes}


def timer(at: str) -> dict[str, Any]:
    return {"type": "timer", "at": at}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def action(**changes: Any) -> dict[str, Any]:
    return {"type": "invocation", "agent_id": "asst_abc123", "input": "go", **changes}


def z(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_problem(response: Response, status: int, loc: list[Any] | None = None) -> None:
    assert response.status == status, response.body
    assert response.content_type == "application/problem+json"
    assert response.body["status"] == status
    assert response.body["title"] and response.body["detail"]
    if loc is not None:
        locs = [e["loc"] for e in response.body.get("errors", [])]
        assert loc in locs, locs


# --- create ---------------------------------------------------------------------------------------


def test_create_returns_201_with_location_etag_and_defaults(client: Client) -> None:
    response = client.post("/api/routines", routine_body())
    assert response.status == 201
    body = response.body
    assert re.fullmatch(r"rt_[0-9a-f]{16}", body["id"])
    assert response.headers["Location"] == f"/api/routines/{body['id']}"
    assert response.headers["ETag"] == '"1"'
    assert body["retry_policy"] == {"max_attempts": 4, "delays_seconds": [60, 300, 900]}
    assert body["overlap_policy"] == "skip"
    assert body["catchup_window_seconds"] == 3600
    assert body["timeout_seconds"] == 600
    assert body["state"] == "enabled"
    assert body["version"] == 1
    assert body["next_fire_at"] == "2026-03-02T06:00:00Z"
    assert body["created_at"] == body["updated_at"] == "2026-03-01T12:00:30Z"
    assert body["trigger"] == cron("0 6 * * *", time_zone="UTC")
    assert body["actions"] == [
        {
            "type": "invocation",
            "agent_id": "asst_abc123",
            "input": {"instructions": "Scan overnight logs", "context": {"region": "us-east-1"}},
        }
    ]
    flow = {
        "concurrency": None,
        "rate_limit": None,
        "jitter_seconds": 0,
        "start_at": None,
        "end_at": None,
        "max_fires": None,
        "pause_after_failures": 0,
    }
    assert {k: body[k] for k in flow} == flow
    assert body["fire_count"] == 0  # the 06:00 fire is beyond the next tick: not planned yet
    assert body["disabled_reason"] is None
    assert body["next_dispatch_at"] == body["next_fire_at"]  # no jitter
    assert set(body) == {
        "id", "name", "description", "trigger", "actions", "retry_policy", "overlap_policy",
        "catchup_window_seconds", "timeout_seconds", "state", "next_fire_at", "created_at", "updated_at",
        "version", *flow, "fire_count", "disabled_reason", "next_dispatch_at",
    }  # fmt: skip
    assert client.get(f"/api/routines/{body['id']}").body == body


def test_create_disabled_has_no_next_fire(client: Client) -> None:
    body = client.create(state="disabled")
    assert (body["state"], body["next_fire_at"]) == ("disabled", None)
    assert client.store.due_entries(NOW + timedelta(days=30)) == []
    assert client.queue.sent == []


def test_create_indexes_the_next_fire(client: Client) -> None:
    body = client.create()
    entries = client.store.due_entries(NOW + timedelta(days=2))
    assert [(e.routine_id, z(e.fire_at)) for e in entries] == [(body["id"], "2026-03-02T06:00:00Z")]


def test_create_time_zone_is_honoured(client: Client) -> None:
    body = client.create(trigger=cron("0 6 * * *", time_zone="Europe/Paris"))
    assert body["next_fire_at"] == "2026-03-02T05:00:00Z"


def test_create_timer_normalises_to_utc(client: Client) -> None:
    body = client.create(trigger=timer("2026-03-02T08:30:00+02:00"))
    assert body["trigger"] == timer("2026-03-02T06:30:00Z")
    assert body["next_fire_at"] == "2026-03-02T06:30:00Z"


def test_create_with_every_field(client: Client) -> None:
    body = client.create(
        actions=[
            action(),
            {
                "type": "response",
                "agent_name": "weekly-summary",
                "agent_version": "2",
                "thread_id": "conv_1",
                "input": {"k": "v"},
                "max_thread_messages": 20,
            },
        ],
        retry_policy={
            "max_attempts": 6,
            "backoff": "exponential",
            "initial_delay_seconds": 30,
            "max_delay_seconds": 3600,
            "jitter": True,
            "max_age_seconds": 600,
        },
        overlap_policy="buffer_one",
        catchup_window_seconds=0,
        timeout_seconds=30,
    )
    assert body["actions"][1] == {
        "type": "response",
        "agent_name": "weekly-summary",
        "agent_version": "2",
        "thread_id": "conv_1",
        "input": {"k": "v"},
        "max_thread_messages": 20,
    }
    assert body["retry_policy"] == {
        "max_attempts": 6,
        "backoff": "exponential",
        "initial_delay_seconds": 30,
        "max_delay_seconds": 3600,
        "jitter": True,
        "max_age_seconds": 600,
    }
    assert (body["overlap_policy"], body["catchup_window_seconds"], body["timeout_seconds"]) == (
        "buffer_one",
        0,
        30,
    )


# --- immediate scheduling (docs/guarantees.md #3) ----------------------------------------------


def sent(client: Client) -> list[tuple[float, str, str, int, str]]:
    return [(d, m.routine_id, z(m.scheduled_for), m.routine_version, m.run_id) for d, m in client.queue.sent]


def test_create_with_a_fire_before_the_next_tick_enqueues_it_at_once(client: Client) -> None:
    body = client.create(trigger=cron("* * * * *"))
    rid = body["id"]
    fire = datetime(2026, 3, 1, 12, 1, tzinfo=UTC)
    assert sent(client) == [
        (30.0 - scheduler.EARLY_SURFACE_SECONDS, rid, "2026-03-01T12:01:00Z", 1, scheduled_run_id(rid, fire))
    ]
    assert client.queue.sent[0][1].kind == "fire"
    assert body["next_fire_at"] == "2026-03-01T12:01:00Z"  # queued ahead, not started: still the next
    client.clock.now = fire + timedelta(seconds=1)
    assert client.get(f"/api/routines/{rid}").body["next_fire_at"] == "2026-03-01T12:02:00Z"


def test_create_second_schedule_enqueues_every_fire_before_the_horizon(client: Client) -> None:
    client = make_client(MemoryStore(), min_interval_seconds=1)
    body = client.create(trigger=cron("*/20 * * * * *"))
    assert [(d, f) for d, _, f, _, _ in sent(client)] == [
        (10.0 - scheduler.EARLY_SURFACE_SECONDS, "2026-03-01T12:00:40Z"),
        (30.0 - scheduler.EARLY_SURFACE_SECONDS, "2026-03-01T12:01:00Z"),
    ]
    assert body["next_fire_at"] == "2026-03-01T12:00:40Z"


def test_create_timer_due_before_the_next_tick_is_enqueued_and_still_shown(client: Client) -> None:
    body = client.create(trigger=timer("2026-03-01T12:00:50Z"))
    assert [(d, f) for d, _, f, _, _ in sent(client)] == [
        (20.0 - scheduler.EARLY_SURFACE_SECONDS, "2026-03-01T12:00:50Z")
    ]
    assert body["next_fire_at"] == "2026-03-01T12:00:50Z"
    assert client.store.due_entries(NOW + timedelta(days=1)) == []  # nothing left for the tick


@pytest.mark.parametrize("ahead_ms", [300, 500, 800, 1000, 1300, 2500, 45_000, 120_000])
def test_an_accepted_timer_always_has_its_fire_scheduled(ahead_ms: int) -> None:
    """Timers fire at whole seconds; an ``at`` that is ahead of ``now`` by a fraction of a second
    must not be accepted and then never fire."""
    client = make_client(MemoryStore())
    client.clock.now = NOW + timedelta(milliseconds=200)
    at = client.clock.now + timedelta(milliseconds=ahead_ms)
    response = client.post("/api/routines", routine_body(trigger=timer(at.isoformat())))
    if response.status == 422:
        assert_problem(response, 422, ["trigger", "at"])
        assert client.queue.sent == []
        return
    assert response.status == 201
    queued = [m.scheduled_for for _, m in client.queue.sent]
    indexed = [e.fire_at for e in client.store.due_entries(NOW + timedelta(days=1))]
    assert queued + indexed == [at.replace(microsecond=0)]
    assert response.body["next_fire_at"] is not None


def test_create_with_a_later_first_fire_enqueues_nothing(client: Client) -> None:
    client.create(trigger=cron("*/5 * * * *"))
    assert client.queue.sent == []
    client.create(name="timer-later", trigger=timer("2026-03-01T12:05:00Z"))
    assert client.queue.sent == []


def test_patch_of_the_trigger_enqueues_a_near_fire_with_the_new_version(client: Client) -> None:
    rid = client.create()["id"]
    assert client.queue.sent == []
    body = client.patch(f"/api/routines/{rid}", {"trigger": {"cron_expression": "* * * * *"}}).body
    assert sent(client) == [
        (
            30.0 - scheduler.EARLY_SURFACE_SECONDS,
            rid,
            "2026-03-01T12:01:00Z",
            2,
            scheduled_run_id(rid, datetime(2026, 3, 1, 12, 1, tzinfo=UTC)),
        )
    ]
    assert body["next_fire_at"] == "2026-03-01T12:01:00Z"  # queued, not started


def test_enable_enqueues_a_near_fire(client: Client) -> None:
    rid = client.create(state="disabled", trigger=cron("* * * * *"))["id"]
    assert client.queue.sent == []
    client.clock.advance(seconds=15)
    client.post(f"/api/routines/{rid}/enable")
    assert [(d, f, v) for d, _, f, v, _ in sent(client)] == [
        (15.0 - scheduler.EARLY_SURFACE_SECONDS, "2026-03-01T12:01:00Z", 2)
    ]


# --- list -------------------------------------------------------------------------------------------


def test_list_filters_by_state_and_pages_with_continuation(client: Client) -> None:
    enabled = [client.create(name=f"on-{i}")["id"] for i in range(3)]
    disabled = [client.create(name=f"off-{i}", state="disabled")["id"] for i in range(2)]
    first = client.get("/api/routines?limit=2")
    assert first.status == 200
    assert len(first.body["items"]) == 2 and first.body["continuation"]
    seen = [r["id"] for r in first.body["items"]]
    token = first.body["continuation"]
    while token:
        page = client.call("list_routines", "GET", query={"limit": "2", "continuation": token})
        seen += [r["id"] for r in page.body["items"]]
        token = page.body["continuation"]
    assert seen == sorted(enabled + disabled)
    only_off = client.get("/api/routines?state=disabled").body
    assert [r["id"] for r in only_off["items"]] == sorted(disabled)
    assert only_off["continuation"] is None
    assert {r["state"] for r in client.get("/api/routines?state=enabled").body["items"]} == {"enabled"}


def test_list_default_limit_is_50(client: Client) -> None:
    for i in range(51):
        client.create(name=f"r-{i}", state="disabled")
    body = client.get("/api/routines").body
    assert len(body["items"]) == 50 and body["continuation"]
    assert len(client.get("/api/routines?limit=200").body["items"]) == 51


def test_list_empty(client: Client) -> None:
    assert client.get("/api/routines").body == {"items": [], "continuation": None}


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"limit": "0"}, id="limit-0"),
        pytest.param({"limit": "201"}, id="limit-201"),
        pytest.param({"limit": "-1"}, id="limit-negative"),
        pytest.param({"limit": "abc"}, id="limit-text"),
        pytest.param({"limit": "1.5"}, id="limit-float"),
        pytest.param({"limit": "\u0665"}, id="limit-arabic-digit"),
        pytest.param({"state": "running"}, id="state-unknown"),
        pytest.param({"state": "Enabled"}, id="state-case"),
        pytest.param({"state": "enabled' or '1' eq '1"}, id="state-odata"),
        pytest.param({"continuation": "not-a-token"}, id="continuation-garbage"),
        pytest.param({"continuation": "'or'1'eq'1"}, id="continuation-odata"),
        pytest.param({"continuation": codec.encode_continuation("run_1")}, id="continuation-foreign"),
    ],
)
def test_list_bad_parameter_is_400(client: Client, query: dict[str, str]) -> None:
    client.create()
    before = client.snapshot()
    response = client.call("list_routines", "GET", query=query)
    assert_problem(response, 400, ["query", next(iter(query))])
    assert client.snapshot() == before


# --- get / delete -------------------------------------------------------------------------------------


def test_get_returns_the_routine_with_its_etag(client: Client) -> None:
    created = client.create()
    response = client.get(f"/api/routines/{created['id']}")
    assert response.status == 200
    assert response.body == created
    assert response.headers["ETag"] == '"1"'


def test_get_unknown_is_404(client: Client) -> None:
    assert_problem(client.get("/api/routines/rt_0000000000000000"), 404)


def test_delete_is_204_then_404(client: Client) -> None:
    rid = client.create()["id"]
    response = client.delete(f"/api/routines/{rid}")
    assert (response.status, response.body, response.encoded()) == (204, None, b"")
    assert_problem(client.get(f"/api/routines/{rid}"), 404)
    assert_problem(client.delete(f"/api/routines/{rid}"), 404)
    assert client.store.due_entries(NOW + timedelta(days=30)) == []
    assert client.create()["name"] == "daily-compliance-scan"  # the name is free again


def test_delete_keeps_runs(client: Client) -> None:
    rid = client.create()["id"]
    run_id = client.post(f"/api/routines/{rid}/dispatch").body["id"]
    client.delete(f"/api/routines/{rid}")
    assert client.get(f"/api/routines/{rid}/runs/{run_id}").status == 200
    assert [r["id"] for r in client.get(f"/api/routines/{rid}/runs").body["items"]] == [run_id]


# --- bad input: body ----------------------------------------------------------------------------------

BODY_ROUTES = [
    pytest.param("POST", "/api/routines", id="create"),
    pytest.param("PATCH", "/api/routines/{id}", id="patch"),
    pytest.param("POST", "/api/preview", id="preview"),
    pytest.param("POST", "/api/routines/{id}/dispatch", id="dispatch"),
]


@pytest.fixture
def seeded(client: Client) -> tuple[Client, str, dict[str, Any]]:
    """A client holding one routine with one run, and a snapshot of it."""
    rid = client.create(trigger=cron("* * * * *"))["id"]
    client.post(f"/api/routines/{rid}/dispatch")
    return client, rid, client.snapshot()


@pytest.mark.parametrize(("method", "url"), BODY_ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"name": "x",}', id="trailing-comma"),
        pytest.param(b"{'name': 'x'}", id="single-quotes"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"NaN-ish", id="not-json"),
        pytest.param(b'{"input": NaN}', id="nan"),
        pytest.param(b'{"input": {"x": -Infinity}}', id="infinity"),
        pytest.param(b'{"count": ' + b"9" * 5000 + b"}", id="integer-over-digit-limit"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-5000-deep"),
    ],
)
def test_malformed_json_is_400(
    seeded: tuple[Client, str, dict[str, Any]], method: str, url: str, raw: bytes
) -> None:
    client, rid, before = seeded
    assert_problem(client.request(method, url.format(id=rid), raw), 400)
    assert client.snapshot() == before


@pytest.mark.parametrize(("method", "url"), BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_body_that_is_not_json_is_415(
    seeded: tuple[Client, str, dict[str, Any]], method: str, url: str, content_type: str
) -> None:
    client, rid, before = seeded
    response = client.request(
        method, url.format(id=rid), routine_body(), headers={"Content-Type": content_type}
    )
    assert_problem(response, 415)
    assert client.snapshot() == before


@pytest.mark.parametrize(("method", "url"), BODY_ROUTES)
def test_body_over_256_kib_is_413(seeded: tuple[Client, str, dict[str, Any]], method: str, url: str) -> None:
    client, rid, before = seeded
    body = json.dumps(routine_body(description="x" * MAX_BODY_BYTES)).encode()
    assert_problem(client.request(method, url.format(id=rid), body), 413)
    assert client.snapshot() == before


def test_body_just_under_the_limit_is_read(client: Client) -> None:
    body = routine_body()
    raw = json.dumps(body).encode()
    padded = raw[:-1] + b" " * (MAX_BODY_BYTES - len(raw)) + b"}"
    assert len(padded) == MAX_BODY_BYTES
    assert client.post("/api/routines", padded).status == 201


def test_json_content_type_with_charset_and_suffix_is_accepted(client: Client) -> None:
    assert (
        client.post(
            "/api/routines", routine_body(), headers={"Content-Type": "application/json; charset=utf-8"}
        ).status
        == 201
    )
    assert (
        client.post(
            "/api/routines",
            routine_body(name="other"),
            headers={"Content-Type": "application/merge-patch+json"},
        ).status
        == 201
    )


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        pytest.param({"bogus": 1}, ["bogus"], id="unknown-top-level"),
        pytest.param({"name": None}, ["name"], id="name-missing"),
        pytest.param({"name": "Daily"}, ["name"], id="name-uppercase"),
        pytest.param({"name": "-daily"}, ["name"], id="name-leading-hyphen"),
        pytest.param({"name": "a" * 64}, ["name"], id="name-64"),
        pytest.param({"name": "x'or'1'eq'1"}, ["name"], id="name-odata"),
        pytest.param({"name": "a/b"}, ["name"], id="name-slash"),
        pytest.param({"name": 'a"b'}, ["name"], id="name-quote"),
        pytest.param({"name": 5}, ["name"], id="name-number"),
        pytest.param({"description": "d" * 2049}, ["description"], id="description-long"),
        pytest.param({"trigger": None}, ["trigger"], id="trigger-missing"),
        pytest.param({"trigger": cron("61 * * * *")}, ["trigger", "cron_expression"], id="cron-bad"),
        pytest.param(
            {"trigger": cron("* * * * * *")}, ["trigger", "cron_expression"], id="cron-too-frequent"
        ),
        pytest.param({"trigger": cron("*/30 * * * * *")}, ["trigger", "cron_expression"], id="cron-30s"),
        pytest.param(
            {"trigger": cron("0 6 * * *", time_zone="Mars/Olympus")},
            ["trigger", "time_zone"],
            id="zone-unknown",
        ),
        pytest.param({"trigger": cron("0 6 * * *", extra=1)}, ["trigger", "extra"], id="trigger-extra"),
        pytest.param({"trigger": {"type": "weekly"}}, ["trigger"], id="trigger-type"),
        pytest.param({"trigger": timer("2026-03-01T12:00:00Z")}, ["trigger", "at"], id="timer-past"),
        pytest.param({"trigger": timer("2026-03-01T12:00:30Z")}, ["trigger", "at"], id="timer-now"),
        pytest.param({"trigger": timer("2026-03-02T12:00:00")}, ["trigger", "at"], id="timer-naive"),
        pytest.param({"trigger": timer("tomorrow")}, ["trigger", "at"], id="timer-text"),
        pytest.param({"actions": []}, ["actions"], id="actions-empty"),
        pytest.param({"actions": [action()] * 21}, ["actions"], id="actions-21"),
        pytest.param(
            {"actions": [action(input="x" * MAX_INPUT_BYTES)]}, ["actions", 0, "input"], id="input-over-32k"
        ),
        pytest.param(
            {"actions": [action(input={"k": "\u00e9" * (MAX_INPUT_BYTES // 2)})]},
            ["actions", 0, "input"],
            id="input-over-32k-utf8",
        ),
        pytest.param({"actions": [action(input=5)]}, ["actions", 0, "input"], id="input-number"),
        pytest.param({"actions": [action(input=["a"])]}, ["actions", 0, "input"], id="input-list"),
        pytest.param(
            {"actions": [action(input=nested(300))]}, ["actions", 0, "input"], id="input-nested-300"
        ),
        pytest.param(
            {"trigger": timer("9999-12-31T23:59:59-05:00")}, ["trigger", "at"], id="timer-past-year-9999"
        ),
        pytest.param({"actions": [action(), action(agent_name="weekly")]}, ["actions", 1], id="agent-both"),
        pytest.param({"actions": [action(agent_id=None)]}, ["actions", 0], id="agent-none"),
        pytest.param({"actions": [action(agent_version="1")]}, ["actions", 0], id="version-without-name"),
        pytest.param(
            {"actions": [action(agent_id="asst abc")]}, ["actions", 0, "agent_id"], id="agent-id-space"
        ),
        pytest.param(
            {"actions": [action(thread_id="t")]}, ["actions", 0, "thread_id"], id="thread-on-invocation"
        ),
        pytest.param(
            {"actions": [action(type="response", max_thread_messages=1)]},
            ["actions", 0, "max_thread_messages"],
            id="max-thread-1",
        ),
        pytest.param({"actions": [action(type="chat")]}, ["actions", 0], id="action-type"),
        pytest.param({"retry_policy": {"max_attempts": 0}}, ["retry_policy", "max_attempts"], id="retry-0"),
        pytest.param(
            {"retry_policy": {"backoff": "exponential", "delays_seconds": [1]}},
            ["retry_policy"],
            id="retry-mixed",
        ),
        pytest.param({"retry_policy": {"jitter": True}}, ["retry_policy"], id="retry-jitter-fixed"),
        pytest.param({"overlap_policy": "queue"}, ["overlap_policy"], id="overlap"),
        pytest.param({"catchup_window_seconds": -1}, ["catchup_window_seconds"], id="catchup-negative"),
        pytest.param({"timeout_seconds": 0}, ["timeout_seconds"], id="timeout-0"),
        pytest.param({"state": "completed"}, ["state"], id="state-completed"),
        pytest.param({"id": "rt_0000000000000000"}, ["id"], id="id"),
        pytest.param({"version": 3}, ["version"], id="version"),
        pytest.param({"next_fire_at": "2026-03-02T00:00:00Z"}, ["next_fire_at"], id="next-fire-at"),
    ],
)
def test_create_invalid_is_422_naming_the_field(
    seeded: tuple[Client, str, dict[str, Any]], changes: dict[str, Any], loc: list[Any]
) -> None:
    client, _, before = seeded
    response = client.post("/api/routines", routine_body(**{"name": "fresh-name", **changes}))
    assert_problem(response, 422, loc)
    assert client.snapshot() == before


@pytest.mark.parametrize("body", [[], "text", 5, None], ids=["list", "string", "number", "null"])
def test_create_body_not_an_object_is_422(seeded: tuple[Client, str, dict[str, Any]], body: Any) -> None:
    client, _, before = seeded
    assert_problem(client.post("/api/routines", json.dumps(body).encode()), 422, ["body"])
    assert client.snapshot() == before


def test_create_empty_body_is_400(seeded: tuple[Client, str, dict[str, Any]]) -> None:
    client, _, before = seeded
    assert_problem(client.post("/api/routines", b""), 400)
    assert client.snapshot() == before


def test_create_with_a_taken_name_is_409(seeded: tuple[Client, str, dict[str, Any]]) -> None:
    client, _, before = seeded
    response = client.post("/api/routines", routine_body(trigger=cron("0 6 * * *")))
    assert_problem(response, 409)
    assert client.snapshot() == before


def test_create_with_input_of_exactly_32_kib_is_accepted(client: Client) -> None:
    text = "x" * (MAX_INPUT_BYTES - 2)  # the JSON encoding adds two quotes
    body = client.create(actions=[action(input=text)])
    assert body["actions"][0]["input"] == text


def test_create_with_ten_actions_is_accepted(client: Client) -> None:
    assert len(client.create(actions=[action(agent_id=f"agent-{i}") for i in range(10)])["actions"]) == 10


def test_min_interval_setting_is_honoured(client: Client) -> None:
    loose = make_client(MemoryStore(), min_interval_seconds=1)
    assert loose.post("/api/routines", routine_body(trigger=cron("* * * * * *"))).status == 201
    strict = make_client(MemoryStore(), min_interval_seconds=3600)
    assert_problem(
        strict.post("/api/routines", routine_body(trigger=cron("*/30 * * * *"))),
        422,
        ["trigger", "cron_expression"],
    )
    assert strict.post("/api/routines", routine_body(trigger=cron("0 * * * *"))).status == 201


def test_validation_problem_lists_every_error(client: Client) -> None:
    response = client.post("/api/routines", routine_body(name="BAD", timeout_seconds=0, bogus=True))
    assert_problem(response, 422)
    locs = sorted(json.dumps(e["loc"]) for e in response.body["errors"])
    assert locs == sorted(json.dumps(loc) for loc in (["name"], ["timeout_seconds"], ["bogus"]))
    assert all(e["msg"] for e in response.body["errors"])


# --- PATCH --------------------------------------------------------------------------------------------


def test_patch_merges_nested_trigger_fields(client: Client) -> None:
    rid = client.create()["id"]
    client.clock.advance(minutes=1)
    response = client.patch(f"/api/routines/{rid}", {"trigger": {"time_zone": "Europe/Paris"}})
    assert response.status == 200
    body = response.body
    assert body["trigger"] == {
        "type": "schedule",
        "cron_expression": "0 6 * * *",
        "time_zone": "Europe/Paris",
    }
    assert body["next_fire_at"] == "2026-03-02T05:00:00Z"
    assert (body["version"], response.headers["ETag"]) == (2, '"2"')
    assert body["updated_at"] == "2026-03-01T12:01:30Z"
    assert body["created_at"] == "2026-03-01T12:00:30Z"
    assert client.get(f"/api/routines/{rid}").body == body
    due = client.store.due_entries(NOW + timedelta(days=2))
    assert [(e.routine_id, z(e.fire_at), e.schedule_version) for e in due] == [
        (rid, "2026-03-02T05:00:00Z", 2)
    ]


def test_patch_null_removes_the_description(client: Client) -> None:
    rid = client.create(description="to be removed")["id"]
    body = client.patch(f"/api/routines/{rid}", {"description": None}).body
    assert body["description"] == ""
    assert body["version"] == 2


def test_patch_changing_the_trigger_type_replaces_the_trigger(client: Client) -> None:
    rid = client.create()["id"]
    body = client.patch(f"/api/routines/{rid}", {"trigger": timer("2026-03-05T09:00:00Z")}).body
    assert body["trigger"] == timer("2026-03-05T09:00:00Z")
    assert body["next_fire_at"] == "2026-03-05T09:00:00Z"
    back = client.patch(f"/api/routines/{rid}", {"trigger": cron("0 7 * * *")}).body
    assert back["trigger"] == cron("0 7 * * *", time_zone="UTC")
    assert back["next_fire_at"] == "2026-03-02T07:00:00Z"
    assert back["version"] == 3


def test_patch_replaces_arrays_whole_and_merges_policies(client: Client) -> None:
    rid = client.create(actions=[action(), action(agent_id="second")])["id"]
    body = client.patch(
        f"/api/routines/{rid}", {"actions": [action(agent_id="only")], "retry_policy": {"max_attempts": 2}}
    ).body
    assert body["actions"] == [{"type": "invocation", "agent_id": "only", "input": "go"}]
    assert body["retry_policy"] == {"max_attempts": 2, "delays_seconds": [60, 300, 900]}
    assert body["next_fire_at"] == "2026-03-02T06:00:00Z"  # schedule untouched


def test_patch_switching_retry_form_with_null(client: Client) -> None:
    rid = client.create()["id"]
    body = client.patch(
        f"/api/routines/{rid}", {"retry_policy": {"backoff": "exponential", "delays_seconds": None}}
    ).body
    assert body["retry_policy"] == {
        "max_attempts": 4,
        "backoff": "exponential",
        "initial_delay_seconds": 30,
        "max_delay_seconds": 3600,
        "jitter": True,
    }


def test_patch_rename(client: Client) -> None:
    rid = client.create()["id"]
    assert client.patch(f"/api/routines/{rid}", {"name": "renamed"}).body["name"] == "renamed"
    assert client.create()["name"] == "daily-compliance-scan"  # old name free
    assert_problem(client.post("/api/routines", routine_body(name="renamed")), 409)


def test_patch_that_changes_nothing_keeps_the_version(client: Client) -> None:
    created = client.create()
    client.clock.advance(minutes=5)
    response = client.patch(
        f"/api/routines/{created['id']}",
        {"name": created["name"], "trigger": {"time_zone": "UTC"}, "overlap_policy": "skip"},
    )
    assert response.status == 200
    assert response.body == created
    assert response.headers["ETag"] == '"1"'
    assert client.patch(f"/api/routines/{created['id']}", {}).body == created


def test_patch_honours_if_match(client: Client) -> None:
    rid = client.create()["id"]
    ok = client.patch(f"/api/routines/{rid}", {"description": "v2"}, headers={"If-Match": '"1"'})
    assert (ok.status, ok.body["version"]) == (200, 2)
    before = client.snapshot()
    for stale in ('"1"', '"3"', 'W/"1"', "garbage"):
        assert_problem(
            client.patch(f"/api/routines/{rid}", {"description": "v3"}, headers={"If-Match": stale}), 412
        )
    assert client.snapshot() == before
    assert (
        client.patch(f"/api/routines/{rid}", {"description": "v3"}, headers={"If-Match": 'W/"2"'}).status
        == 200
    )
    assert (
        client.patch(f"/api/routines/{rid}", {"description": "v4"}, headers={"If-Match": "*"}).status == 200
    )


def test_patch_stale_if_match_on_a_no_op_is_still_412(client: Client) -> None:
    rid = client.create()["id"]
    client.patch(f"/api/routines/{rid}", {"description": "v2"})
    assert_problem(client.patch(f"/api/routines/{rid}", {}, headers={"If-Match": '"1"'}), 412)


def test_patch_unknown_routine_is_404(client: Client) -> None:
    assert_problem(client.patch("/api/routines/rt_0000000000000000", {"description": "x"}), 404)


def test_patch_rename_to_a_taken_name_is_409(seeded: tuple[Client, str, dict[str, Any]]) -> None:
    client, rid, _ = seeded
    client.create(name="taken", state="disabled")
    before = client.snapshot()
    assert_problem(client.patch(f"/api/routines/{rid}", {"name": "taken"}), 409)
    assert_problem(client.patch(f"/api/routines/{rid}", {"name": "taken", "description": "x"}), 409)
    assert client.snapshot() == before


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        pytest.param({"id": "rt_0000000000000000"}, ["id"], id="id"),
        pytest.param({"version": 7}, ["version"], id="version"),
        pytest.param({"state": "disabled"}, ["state"], id="state"),
        pytest.param({"next_fire_at": None}, ["next_fire_at"], id="next-fire-at"),
        pytest.param({"created_at": "2026-01-01T00:00:00Z"}, ["created_at"], id="created-at"),
        pytest.param({"bogus": 1}, ["bogus"], id="unknown"),
        pytest.param({"name": "Bad Name"}, ["name"], id="name"),
        pytest.param({"name": None}, ["name"], id="name-removed"),
        pytest.param({"trigger": None}, ["trigger"], id="trigger-removed"),
        pytest.param({"trigger": {"cron_expression": "nonsense"}}, ["trigger", "cron_expression"], id="cron"),
        pytest.param(
            {"trigger": {"cron_expression": "*/10 * * * * *"}},
            ["trigger", "cron_expression"],
            id="cron-frequent",
        ),
        pytest.param({"trigger": {"bogus": 1}}, ["trigger", "bogus"], id="trigger-unknown"),
        pytest.param({"trigger": timer("2026-02-01T00:00:00Z")}, ["trigger", "at"], id="timer-past"),
        pytest.param({"trigger": {"type": "timer"}}, ["trigger", "at"], id="timer-without-at"),
        pytest.param(
            {"actions": [action(input="x" * MAX_INPUT_BYTES)]}, ["actions", 0, "input"], id="input-big"
        ),
        pytest.param({"actions": [action(agent_name="n")]}, ["actions", 0], id="agent-both"),
        pytest.param({"actions": [action()] * 21}, ["actions"], id="actions-21"),
        pytest.param({"actions": None}, ["actions"], id="actions-removed"),
        pytest.param({"retry_policy": {"initial_delay_seconds": 5}}, ["retry_policy"], id="retry-mixed"),
        pytest.param({"overlap_policy": "all"}, ["overlap_policy"], id="overlap"),
        pytest.param({"timeout_seconds": 86401}, ["timeout_seconds"], id="timeout"),
    ],
)
def test_patch_invalid_is_422_naming_the_field(
    seeded: tuple[Client, str, dict[str, Any]], patch: dict[str, Any], loc: list[Any]
) -> None:
    client, rid, before = seeded
    assert_problem(client.patch(f"/api/routines/{rid}", patch), 422, loc)
    assert client.snapshot() == before


def test_patch_body_not_an_object_is_422(seeded: tuple[Client, str, dict[str, Any]]) -> None:
    client, rid, before = seeded
    assert_problem(client.patch(f"/api/routines/{rid}", [{"op": "replace"}]), 422, ["body"])
    assert client.snapshot() == before


def test_patch_keeps_a_grandfathered_schedule_when_the_trigger_is_untouched(client: Client) -> None:
    loose = make_client(MemoryStore(), min_interval_seconds=1)
    rid = loose.create(trigger=cron("*/10 * * * * *"))["id"]
    strict = Client(
        Api(loose.store, loose.queue, settings(60), loose.clock), loose.store, loose.queue, loose.clock
    )
    assert strict.patch(f"/api/routines/{rid}", {"description": "still fine"}).status == 200
    assert_problem(
        strict.patch(f"/api/routines/{rid}", {"trigger": {"cron_expression": "*/20 * * * * *"}}), 422
    )


# --- disable / enable -----------------------------------------------------------------------------------


def test_disable_clears_the_next_fire_and_bumps_the_version(client: Client) -> None:
    rid = client.create()["id"]
    response = client.post(f"/api/routines/{rid}/disable")
    assert response.status == 200
    body = response.body
    assert (body["state"], body["next_fire_at"], body["version"]) == ("disabled", None, 2)
    assert response.headers["ETag"] == '"2"'
    assert client.store.due_entries(NOW + timedelta(days=30)) == []
    again = client.post(f"/api/routines/{rid}/disable")
    assert (again.status, again.body) == (200, body)


def test_enable_computes_the_next_fire_from_now(client: Client) -> None:
    rid = client.create()["id"]
    client.post(f"/api/routines/{rid}/disable")
    client.clock.advance(days=2)  # 2026-03-03T12:00:30Z: the fires of the 2nd and 3rd are not run
    response = client.post(f"/api/routines/{rid}/enable")
    assert response.status == 200
    body = response.body
    assert (body["state"], body["next_fire_at"], body["version"]) == ("enabled", "2026-03-04T06:00:00Z", 3)
    entries = client.store.due_entries(NOW + timedelta(days=30))
    assert [(e.routine_id, z(e.fire_at), e.schedule_version) for e in entries] == [
        (rid, "2026-03-04T06:00:00Z", 3)
    ]
    again = client.post(f"/api/routines/{rid}/enable")
    assert (again.status, again.body) == (200, body)


def test_enable_a_completed_timer_is_409(client: Client) -> None:
    rid = client.create(trigger=timer("2026-03-02T00:00:00Z"))["id"]
    (entry,) = client.store.due_entries(NOW + timedelta(days=2))
    assert client.store.advance([Advance(entry, None, completed=True)]) == [True]
    assert client.get(f"/api/routines/{rid}").body["state"] == "completed"
    before = client.snapshot()
    assert_problem(client.post(f"/api/routines/{rid}/enable"), 409)
    assert client.snapshot() == before


def test_enable_a_disabled_timer_whose_time_passed_is_409(client: Client) -> None:
    rid = client.create(trigger=timer("2026-03-02T00:00:00Z"))["id"]
    client.post(f"/api/routines/{rid}/disable")
    client.clock.advance(days=2)
    before = client.snapshot()
    assert_problem(client.post(f"/api/routines/{rid}/enable"), 409)
    assert client.snapshot() == before


def test_patch_of_a_completed_timer_to_a_future_time_schedules_it_again(client: Client) -> None:
    rid = client.create(trigger=timer("2026-03-02T00:00:00Z"))["id"]
    (entry,) = client.store.due_entries(NOW + timedelta(days=2))
    client.store.advance([Advance(entry, None, completed=True)])
    body = client.patch(f"/api/routines/{rid}", {"trigger": {"at": "2026-03-04T00:00:00Z"}}).body
    assert (body["state"], body["next_fire_at"]) == ("enabled", "2026-03-04T00:00:00Z")


@pytest.mark.parametrize("verb", ["enable", "disable"])
def test_enable_disable_unknown_is_404(client: Client, verb: str) -> None:
    assert_problem(client.post(f"/api/routines/rt_0000000000000000/{verb}"), 404)


# --- dispatch and runs ----------------------------------------------------------------------------------


def test_dispatch_creates_a_manual_run_and_queues_a_fire(client: Client) -> None:
    rid = client.create()["id"]
    response = client.post(f"/api/routines/{rid}/dispatch")
    assert response.status == 202
    run = response.body
    assert run["trigger"] == "manual"
    assert run["status"] == "queued"
    assert run["routine_id"] == rid
    assert run["idempotency_key"] == f"{rid}:manual:{run['id']}"
    assert run["scheduled_for"] == "2026-03-01T12:00:30Z"
    assert run["max_attempts"] == 4
    assert response.headers["Location"] == f"/api/routines/{rid}/runs/{run['id']}"
    assert "progress" not in run
    ((delay, message),) = client.queue.sent
    assert (message.kind, message.routine_id, message.run_id, message.routine_version) == (
        "fire",
        rid,
        run["id"],
        1,
    )
    assert delay == 0
    assert client.get(f"/api/routines/{rid}/runs/{run['id']}").body == run
    stored, _ = client.store.get_run(rid, run["id"])
    assert stored.progress.input_override is None


def test_dispatch_with_an_input_override(client: Client) -> None:
    rid = client.create()["id"]
    run = client.post(f"/api/routines/{rid}/dispatch", {"input": {"instructions": "just this once"}}).body
    stored, _ = client.store.get_run(rid, run["id"])
    assert stored.progress.input_override == {"instructions": "just this once"}
    text_run = client.post(f"/api/routines/{rid}/dispatch", {"input": "plain text"}).body
    assert client.store.get_run(rid, text_run["id"])[0].progress.input_override == "plain text"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param({"input": "x" * MAX_INPUT_BYTES}, ["input"], id="input-too-big"),
        pytest.param({"input": 5}, ["input"], id="input-number"),
        pytest.param({"bogus": 1}, ["bogus"], id="unknown-field"),
    ],
)
def test_dispatch_invalid_body_is_422(
    seeded: tuple[Client, str, dict[str, Any]], body: dict[str, Any], loc: list[Any]
) -> None:
    client, rid, before = seeded
    assert_problem(client.post(f"/api/routines/{rid}/dispatch", body), 422, loc)
    assert client.snapshot() == before


def test_dispatch_unknown_routine_is_404_and_queues_nothing(client: Client) -> None:
    assert_problem(client.post("/api/routines/rt_0000000000000000/dispatch"), 404)
    assert client.queue.sent == []


def test_runs_list_newest_first_with_status_filter_and_paging(client: Client) -> None:
    rid = client.create()["id"]
    ids = []
    for _ in range(3):
        ids.append(client.post(f"/api/routines/{rid}/dispatch").body["id"])
        client.clock.advance(seconds=1)
    first = client.get(f"/api/routines/{rid}/runs?limit=2").body
    assert [r["id"] for r in first["items"]] == ids[:0:-1]
    rest = client.call(
        "list_runs",
        "GET",
        route_params={"id": rid},
        query={"limit": "2", "continuation": first["continuation"]},
    )
    assert [r["id"] for r in rest.body["items"]] == [ids[0]]
    assert rest.body["continuation"] is None
    assert len(client.get(f"/api/routines/{rid}/runs?status=queued").body["items"]) == 3
    assert client.get(f"/api/routines/{rid}/runs?status=succeeded").body == {
        "items": [],
        "continuation": None,
    }


def test_runs_of_unknown_routine_are_404(client: Client) -> None:
    assert_problem(client.get("/api/routines/rt_0000000000000000/runs"), 404)
    assert_problem(client.get("/api/routines/rt_0000000000000000/runs/run_8227633540000_m0123456789"), 404)


def test_unknown_run_of_a_known_routine_is_404(client: Client) -> None:
    rid = client.create()["id"]
    assert_problem(client.get(f"/api/routines/{rid}/runs/run_8227633540000_m0123456789"), 404)
    other = client.create(name="other")["id"]
    run_id = client.post(f"/api/routines/{other}/dispatch").body["id"]
    assert_problem(client.get(f"/api/routines/{rid}/runs/{run_id}"), 404)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"status": "done"}, id="status"),
        pytest.param({"limit": "0"}, id="limit"),
        pytest.param({"continuation": "x"}, id="continuation"),
        pytest.param({"continuation": codec.encode_continuation("id:rt_1")}, id="continuation-foreign"),
    ],
)
def test_runs_bad_parameter_is_400(seeded: tuple[Client, str, dict[str, Any]], query: dict[str, str]) -> None:
    client, rid, before = seeded
    assert_problem(client.call("list_runs", "GET", route_params={"id": rid}, query=query), 400)
    assert client.snapshot() == before


# --- preview --------------------------------------------------------------------------------------------


def test_preview_default_count_is_10_from_now(client: Client) -> None:
    body = client.post("/api/preview", {"trigger": cron("0 * * * *")}).body
    assert body["fires"] == [f"2026-03-01T{h:02d}:00:00Z" for h in range(13, 23)]


def test_preview_honours_after_and_count(client: Client) -> None:
    response = client.post(
        "/api/preview",
        {
            "trigger": cron("0 6 * * MON"),
            "after": "2026-06-01T06:00:00Z",
            "count": 3,
        },
    )
    assert response.status == 200
    assert response.body == {
        "fires": ["2026-06-08T06:00:00Z", "2026-06-15T06:00:00Z", "2026-06-22T06:00:00Z"]
    }


def test_preview_dst_spring_forward_fires_once_after_the_gap(client: Client) -> None:
    trigger = cron("30 2 * * *", time_zone="America/New_York")
    body = client.post("/api/preview", {"trigger": trigger, "after": "2026-03-07T12:00:00Z", "count": 3}).body
    # 2026-03-08 02:30 does not exist in New York: it fires at 03:00 EDT (07:00Z), then 02:30 EDT (06:30Z).
    assert body["fires"] == ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z", "2026-03-10T06:30:00Z"]


def test_preview_dst_fall_back_fires_the_first_occurrence_only(client: Client) -> None:
    trigger = cron("30 1 * * *", time_zone="America/New_York")
    body = client.post("/api/preview", {"trigger": trigger, "after": "2026-10-31T12:00:00Z", "count": 2}).body
    assert body["fires"] == ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]


def test_preview_timer_gives_its_one_fire(client: Client) -> None:
    body = client.post("/api/preview", {"trigger": timer("2026-04-01T10:00:00+02:00")}).body
    assert body == {"fires": ["2026-04-01T08:00:00Z"]}


def test_preview_count_bounds(client: Client) -> None:
    trigger = cron("0 * * * *")
    assert len(client.post("/api/preview", {"trigger": trigger, "count": 1}).body["fires"]) == 1
    assert len(client.post("/api/preview", {"trigger": trigger, "count": 100}).body["fires"]) == 100


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param({"trigger": cron("0 * * * *"), "count": 0}, ["count"], id="count-0"),
        pytest.param({"trigger": cron("0 * * * *"), "count": 101}, ["count"], id="count-101"),
        pytest.param(
            {"trigger": cron("0 * * * *"), "after": "2026-03-01T12:00:00"}, ["after"], id="after-naive"
        ),
        pytest.param({"trigger": cron("0 * * * *"), "after": "soon"}, ["after"], id="after-text"),
        pytest.param({"trigger": cron("0 0 30 2 *")}, ["trigger", "cron_expression"], id="never-fires"),
        pytest.param({"trigger": cron("* * * * * *")}, ["trigger", "cron_expression"], id="too-frequent"),
        pytest.param({"trigger": cron("0 * * * *"), "bogus": 1}, ["bogus"], id="unknown"),
        pytest.param({}, ["trigger"], id="no-trigger"),
        pytest.param(
            {"trigger": cron("0 * * * *"), "after": "0001-01-01T00:00:00+05:00"},
            ["after"],
            id="after-before-year-1",
        ),
    ],
)
def test_preview_invalid_is_422(client: Client, body: dict[str, Any], loc: list[Any]) -> None:
    assert_problem(client.post("/api/preview", body), 422, loc)


@pytest.mark.parametrize(
    "after",
    [
        pytest.param("2200-01-01T00:00:00Z", id="year-2200"),
        pytest.param("9999-12-31T23:59:59Z", id="year-9999"),
        pytest.param("9999-12-31T23:59:59-05:00", id="after-year-9999-in-utc"),
    ],
)
def test_preview_after_must_be_before_2200(client: Client, after: str) -> None:
    body = {"trigger": cron("0 * * * *"), "after": after}
    assert_problem(client.post("/api/preview", body), 422, ["after"])


# --- health and OpenAPI ---------------------------------------------------------------------------------


def test_health_is_200_when_storage_answers(client: Client) -> None:
    response = client.get("/api/health")
    assert (response.status, response.body) == (200, {"status": "ok"})


class DownStore(MemoryStore):
    def ping(self) -> None:
        raise StorageUnavailable("storage is down")


def test_health_is_503_when_storage_does_not_answer(caplog: pytest.LogCaptureFixture) -> None:
    response = make_client(DownStore()).get("/api/health")

    assert (response.status, response.body) == (503, {"status": "unavailable"}), "no storage error text"
    assert "storage is down" in caplog.text, "the error is logged instead"


def test_storage_outage_on_a_route_is_503() -> None:
    class Broken(MemoryStore):
        def get_routine(self, routine_id: str) -> Any:
            raise StorageUnavailable("down")

    assert_problem(make_client(Broken()).get("/api/routines/rt_0000000000000000"), 503)


def test_openapi_is_a_valid_openapi_3_1_document() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    document = json.loads(json.dumps(openapi.document()))  # what the route serves
    validator.validate(document)
    assert document["openapi"].startswith("3.1")


def test_openapi_covers_every_route_and_the_main_schemas() -> None:
    document = openapi.document()
    schemas = document["components"]["schemas"]
    assert {"Routine", "Run", "RoutineCreate"} <= set(schemas)
    routes = {
        ("post", "/api/routines"), ("get", "/api/routines"), ("get", "/api/routines/{id}"),
        ("patch", "/api/routines/{id}"), ("delete", "/api/routines/{id}"),
        ("post", "/api/routines/{id}/disable"), ("post", "/api/routines/{id}/enable"),
        ("post", "/api/routines/{id}/dispatch"), ("get", "/api/routines/{id}/runs"),
        ("get", "/api/routines/{id}/runs/{run_id}"), ("post", "/api/preview"), ("get", "/api/health"),
        ("get", "/api/openapi.json"), ("post", "/api/hooks/{key}"),
        ("post", "/api/routines/{id}/runs/{run_id}/steps/{step_id}/approve"),
        ("post", "/api/routines/{id}/runs/{run_id}/steps/{step_id}/reject"),
    }  # fmt: skip
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops if m != "parameters"}
    assert documented == routes
    assert {(m.lower(), "/api/" + p) for m, p, _ in ROUTES} <= documented  # the routes driven here
    for name in ("Routine", "Run", "RoutineCreate"):
        assert schemas[name]["properties"], name
    assert {"id", "name", "trigger", "actions", "state", "next_fire_at", "version"} <= set(
        schemas["Routine"]["properties"]
    )
    assert "progress" not in schemas["Run"]["properties"]
    assert {"schedule_version", "due_at"}.isdisjoint(schemas["Routine"]["properties"])


def test_openapi_schemas_describe_what_the_api_returns(client: Client) -> None:
    """Every ``$ref`` resolves and nested schemas are not empty (a bare ``{}`` says nothing)."""
    document = openapi.document()
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in schemas, ref
        assert schemas[ref], f"{ref} is an empty schema"
    jsonschema = pytest.importorskip("jsonschema")
    routine = client.create(
        actions=[
            action(),
            {"type": "response", "agent_name": "n", "agent_version": "1", "thread_id": "t", "input": "go"},
        ]
    )
    run = client.post(f"/api/routines/{routine['id']}/dispatch").body
    for name, instance in (("Routine", routine), ("Run", run)):
        schema = {**schemas[name], "components": {"schemas": schemas}}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
    bad = {**routine, "actions": [{"type": "invocation", "agent_id": 5, "input": []}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            bad,
            {**schemas["Routine"], "components": {"schemas": schemas}},
            cls=jsonschema.Draft202012Validator,
        )


# --- hostile ids and names, on both stores --------------------------------------------------------------

HOSTILE = [
    pytest.param("'or'1'eq'1", id="odata-or"),
    pytest.param("rt_0f3c2a9d6b1e4c7a' or RowKey ne '", id="odata-suffix"),
    pytest.param("' or PartitionKey eq 'r", id="odata-partition"),
    pytest.param("a'b\"c", id="quotes"),
    pytest.param("a/b", id="slash"),
    pytest.param("..%2F..%2Fr", id="encoded-slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("%", id="percent"),
    pytest.param("a#b?c=d", id="hash-question"),
    pytest.param("\u65e5\u672c\U0001f600", id="unicode"),
    pytest.param("a\tb\x01\x7f", id="control"),
    pytest.param("x" * 2000, id="long"),
    pytest.param("run_'or'1'eq'1", id="run-odata"),
    pytest.param("run_a/b", id="run-slash"),
]

ID_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("get_routine", "GET", None),
    ("patch_routine", "PATCH", {"description": "x"}),
    ("delete_routine", "DELETE", None),
    ("disable_routine", "POST", None),
    ("enable_routine", "POST", None),
    ("dispatch_routine", "POST", None),
    ("list_runs", "GET", None),
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_routine_ids_are_404(any_client: Client, bad: str) -> None:
    client = any_client
    rid = client.create(trigger=cron("* * * * *"))["id"]
    run_id = client.post(f"/api/routines/{rid}/dispatch").body["id"]
    before = client.snapshot()
    for handler, method, body in ID_ROUTES:
        response = client.call(handler, method, route_params={"id": bad}, body=body)
        assert_problem(response, 404)
    for params in ({"id": bad, "run_id": run_id}, {"id": rid, "run_id": bad}, {"id": bad, "run_id": bad}):
        assert_problem(client.call("get_run", "GET", route_params=params), 404)
    assert client.snapshot() == before


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_are_422(any_client: Client, bad: str) -> None:
    client = any_client
    rid = client.create()["id"]
    before = client.snapshot()
    assert_problem(client.post("/api/routines", routine_body(name=bad)), 422, ["name"])
    assert_problem(client.patch(f"/api/routines/{rid}", {"name": bad}), 422, ["name"])
    assert client.snapshot() == before


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_query_values_are_4xx(any_client: Client, bad: str) -> None:
    client = any_client
    rid = client.create()["id"]
    client.post(f"/api/routines/{rid}/dispatch")
    before = client.snapshot()
    forged = [
        bad,
        codec.encode_continuation("id:" + bad),
        codec.encode_continuation("run_" + bad),
    ]
    for query in [{"state": bad}, {"limit": bad}] + [{"continuation": token} for token in forged]:
        response = client.call("list_routines", "GET", query=query)
        assert response.status < 500, (query, response.body)
        if response.status == 200:
            assert all(r["id"] == rid for r in response.body["items"])
    for query in [{"status": bad}, {"limit": bad}] + [{"continuation": token} for token in forged]:
        response = client.call("list_runs", "GET", route_params={"id": rid}, query=query)
        assert response.status < 500, (query, response.body)
    assert client.snapshot() == before


def test_hostile_agent_ids_and_inputs_round_trip_as_data(any_client: Client) -> None:
    """Quotes and OData syntax inside values are stored and returned verbatim."""
    client = any_client
    hostile_input = {"q": "' or 1 eq 1 --", "p": "a/b\\c#d?e%f", "u": "\u65e5\U0001f600", "c": "\x00\x1f"}
    body = client.create(
        description="'or'1'eq'1 \"quoted\" /slash/",
        actions=[action(input=hostile_input)],
    )
    assert client.get(f"/api/routines/{body['id']}").body == body
    assert body["actions"][0]["input"] == hostile_input


# --- concurrency through the API --------------------------------------------------------------------------


def test_patch_retries_a_lost_race_and_keeps_both_changes(client: Client) -> None:
    rid = client.create()["id"]
    store = client.store
    original = store.replace_routine
    raced: list[bool] = []

    def racing_replace(routine: Any, etag: str, previous: Any, watches: Any = ()) -> str:
        if not raced:
            raced.append(True)
            current, current_etag = store.get_routine(routine.id)
            original(
                current.model_copy(update={"description": "theirs", "version": current.version + 1}),
                current_etag,
                current,
            )
        return original(routine, etag, previous, watches)

    store.replace_routine = racing_replace  # type: ignore[method-assign]
    body = client.patch(f"/api/routines/{rid}", {"timeout_seconds": 60}).body
    assert (body["description"], body["timeout_seconds"], body["version"]) == ("theirs", 60, 3)


def test_next_fire_at_is_the_earliest_fire_not_started_including_those_queued_by_the_tick(
    client: Client,
) -> None:
    rid = client.create(trigger=cron("0 6 * * *"))["id"]
    client.clock.now = datetime(2026, 3, 2, 5, 59, 0, tzinfo=UTC)
    scheduler.tick(client.store, client.queue, client.clock())
    assert client.store.get_routine(rid)[0].next_fire_at == datetime(2026, 3, 3, 6, tzinfo=UTC), "planned"
    client.clock.now += timedelta(seconds=30)
    assert client.get(f"/api/routines/{rid}").body["next_fire_at"] == "2026-03-02T06:00:00Z", "read at 05:59"
    [listed] = client.get("/api/routines").body["items"]
    assert listed["next_fire_at"] == "2026-03-02T06:00:00Z"
    client.clock.now = datetime(2026, 3, 2, 6, 0, 1, tzinfo=UTC)
    assert client.get(f"/api/routines/{rid}").body["next_fire_at"] == "2026-03-03T06:00:00Z", "06:00 is due"
