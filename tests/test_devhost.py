"""The devhost runs a throwaway function app's HTTP routes, timers and queue triggers like the Functions host.

Most tests share one devhost subprocess (``python -m routines.devhost``) on the session's Azurite; the
app records what its functions saw in JSON-lines files that the tests poll.

HTTP behaviour pinned here: an unknown path is ``404`` (problem JSON); a known path with a method no
function accepts is ``405`` with ``Allow``; HEAD on a GET-only route answers the GET without a body.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from routines.devhost import (
    DevHost,
    DevHostError,
    HttpRouter,
    QueueOptions,
    RouteTemplate,
    Schedule,
    discover_functions,
    find_function_app,
    load_app_module,
    parse_timespan,
)
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent

APP = """
import json
import os
import time
from datetime import UTC, datetime

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
OUT = os.environ["OUT_DIR"]


def record(name, **data):
    with open(os.path.join(OUT, name + ".jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(data) + "\\n")


def as_json(data, status=200):
    return func.HttpResponse(json.dumps(data), status_code=status, mimetype="application/json",
                             headers={"X-Echo": "yes"})


@app.route(route="items/{id}", methods=["GET", "post"])
def item(req: func.HttpRequest) -> func.HttpResponse:
    return as_json({"method": req.method, "id": req.route_params.get("id"), "params": dict(req.params),
                    "body": req.get_body().decode("latin-1"), "header": req.headers.get("x-test"),
                    "url": req.url})


@app.route(route="items/{id:int}/runs/{run_id}", methods=["GET"])
def item_run(req: func.HttpRequest) -> func.HttpResponse:
    return as_json({"route_params": dict(req.route_params)})


@app.route(route="settings", methods=["GET"])
def settings(req: func.HttpRequest) -> func.HttpResponse:
    return as_json({name: os.environ.get(name) for name in ("FROM_FILE", "OVERRIDDEN")})


@app.route(route="created", methods=["POST"])
def created(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(status_code=201, headers={"Location": "/api/items/1"})


@app.route(route="boom")
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("kaboom")


@app.route(route="slow")
def slow(req: func.HttpRequest) -> func.HttpResponse:
    record("slow", started=datetime.now(UTC).isoformat())
    time.sleep(float(req.params.get("seconds", "1")))
    return func.HttpResponse("finished")


@app.timer_trigger(schedule="%TICK_SCHEDULE%", arg_name="clock")
def tick(clock: func.TimerRequest) -> None:
    record("tick", at=datetime.now(UTC).isoformat(), past_due=clock.past_due)


@app.queue_trigger(arg_name="msg", queue_name="%GOOD_QUEUE%", connection="AzureWebJobsStorage")
def good(msg: func.QueueMessage) -> None:
    record("good", body=msg.get_body().decode(), dequeue_count=msg.dequeue_count, id=msg.id)


@app.queue_trigger(arg_name="msg", queue_name="%SLOW_QUEUE%", connection="AzureWebJobsStorage")
def slow_queue(msg: func.QueueMessage) -> None:
    started = time.time()
    time.sleep(0.5)
    record("slow_queue", body=msg.get_body().decode(), started=started, ended=time.time())


@app.queue_trigger(arg_name="message", queue_name="%BAD_QUEUE%", connection="AzureWebJobsStorage")
def bad(message: func.QueueMessage) -> None:
    record("bad", body=message.get_body().decode(), dequeue_count=message.dequeue_count)
    raise ValueError("this function always fails")
"""

HOST_JSON = {
    "version": "2.0",
    "extensions": {
        "http": {"routePrefix": "api"},
        "queues": {
            "maxPollingInterval": "00:00:00.200",
            "visibilityTimeout": "00:00:00",
            "maxDequeueCount": 3,
            "batchSize": 8,
            "messageEncoding": "base64",
        },
    },
}


# -- helpers --------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class DevHostProcess:
    process: subprocess.Popen[str]
    url: str
    stderr_path: Path
    out_dir: Path
    env: dict[str, str]

    def log(self) -> str:
        return "devhost stderr:\n" + self.stderr_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def records(self, name: str) -> list[dict[str, Any]]:
        return read_records(self.out_dir / f"{name}.jsonl")

    def queue(self, setting: str, *, base64_encode: bool = True, suffix: str = "") -> QueueClient:
        policy = TextBase64EncodePolicy() if base64_encode else None
        return QueueClient.from_connection_string(
            self.env["AzureWebJobsStorage"], self.env[setting] + suffix, message_encode_policy=policy
        )

    def terminate(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"devhost did not exit within {timeout} s of SIGTERM\n{self.log()}")


def start_devhost(app_dir: Path, env: dict[str, str], *extra_args: str) -> DevHostProcess:
    stderr_path = app_dir / "devhost.stderr"
    stderr = stderr_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "routines.devhost", "--app-dir", str(app_dir), "--port", "0", *extra_args],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    stderr.close()
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    host = DevHostProcess(process, "", stderr_path, Path(env["OUT_DIR"]), env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line.startswith("devhost ready on "):
            host.url = line.removeprefix("devhost ready on ").strip()
            return host
    host.terminate()
    pytest.fail(f"devhost did not print its ready line (exit code {process.poll()})\n{host.log()}")


def write_app(app_dir: Path, local_settings: dict[str, str]) -> None:
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "function_app.py").write_text(APP, encoding="utf-8")
    (app_dir / "host.json").write_text(json.dumps(HOST_JSON), encoding="utf-8")
    (app_dir / "local.settings.json").write_text(
        json.dumps({"IsEncrypted": False, "Values": local_settings}), encoding="utf-8"
    )


def base_env(out_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FROM_FILE", "OVERRIDDEN", "GOOD_QUEUE")}
    env["OUT_DIR"] = str(out_dir)
    return env


@pytest.fixture(scope="module")
def devhost(azurite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevHostProcess]:
    app_dir = tmp_path_factory.mktemp("app")
    out_dir = tmp_path_factory.mktemp("out")
    unique = uuid.uuid4().hex[:12]
    write_app(
        app_dir,
        {
            # The environment overrides this one: were the file to win, no queue could be reached.
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "GOOD_QUEUE": f"good-{unique}",  # a %SETTING% queue name from local.settings.json
            "TICK_SCHEDULE": "*/1 * * * * *",
            "FROM_FILE": "file",
            "OVERRIDDEN": "file",
        },
    )
    env = base_env(out_dir) | {
        "AzureWebJobsStorage": azurite.connection_string,
        "BAD_QUEUE": f"bad-{unique}",
        "SLOW_QUEUE": f"slow-{unique}",
        "OVERRIDDEN": "environment",
    }
    host = start_devhost(app_dir, env)
    host.env["GOOD_QUEUE"] = f"good-{unique}"
    yield host
    code = host.terminate()
    assert code == 0, f"devhost exited with {code} on SIGTERM\n{host.log()}"


@pytest.fixture
def http(devhost: DevHostProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=devhost.url, timeout=10) as client:
        yield client


# -- HTTP -----------------------------------------------------------------------------------------------


def test_route_params_query_and_body_round_trip(http: httpx.Client) -> None:
    body = bytes(range(256))
    response = http.post(
        "/api/items/a%20b",
        params=[("x", "1"), ("y", "two"), ("x", "3")],
        content=body,
        headers={"X-Test": "t", "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-echo"] == "yes"
    data = response.json()
    assert data["method"] == "POST"
    assert data["id"] == "a b"
    assert data["params"] == {"x": "1,3", "y": "two"}  # repeated parameters are comma-joined
    assert data["body"].encode("latin-1") == body
    assert data["header"] == "t"
    assert data["url"] == str(response.request.url)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7071", "10.0.0.5", "localhost.evil.example"])
def test_a_request_under_another_host_name_is_refused(http: httpx.Client, host: str) -> None:
    """DNS rebinding: a web page's name pointed at 127.0.0.1 reaches the devhost with its own Host."""
    response = http.post("/api/created", json={}, headers={"Host": host})
    assert response.status_code == 421
    assert "loopback" in response.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:7071", "127.0.0.1:1", "[::1]:7071"])
def test_loopback_host_names_are_served(http: httpx.Client, host: str) -> None:
    assert http.post("/api/created", json={}, headers={"Host": host}).status_code == 201


def test_a_body_without_content_type_is_refused(http: httpx.Client) -> None:
    """A page may send a "simple" cross-origin POST with no Content-Type, which no preflight stops."""
    response = http.post("/api/created", content=b"{}")
    assert response.status_code == 415
    assert (
        http.post("/api/created", content=b"{}", headers={"Content-Type": "application/json"}).status_code
        == 201
    )


def test_methods_are_case_insensitive_and_limited(http: httpx.Client) -> None:
    assert http.get("/api/items/7").json()["method"] == "GET"
    assert http.get("/API/Items/7").status_code == 200  # literals match case-insensitively
    refused = http.put("/api/items/7")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, POST"
    assert refused.headers["content-type"] == "application/problem+json"


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    for path in ("/api/nothing-here", "/api/items/7/extra/segments", "/not-api/items/7", "/"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json()["status"] == 404


def test_route_constraint_and_second_parameter(http: httpx.Client) -> None:
    response = http.get("/api/items/12/runs/run_9")
    assert response.status_code == 200
    assert response.json() == {"route_params": {"id": "12", "run_id": "run_9"}}
    assert http.get("/api/items/abc/runs/run_9").status_code == 404  # {id:int} does not match "abc"


def test_head_answers_like_get_without_body(http: httpx.Client) -> None:
    got = http.get("/api/items/5")
    head = http.head("/api/items/5")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"]


def test_empty_response_status_and_headers(http: httpx.Client) -> None:
    response = http.post("/api/created", json={})
    assert response.status_code == 201
    assert response.headers["location"] == "/api/items/1"
    assert response.content == b""


def test_function_raising_is_500_and_logged(http: httpx.Client, devhost: DevHostProcess) -> None:
    response = http.get("/api/boom")
    assert response.status_code == 500
    assert "RuntimeError" in response.json()["detail"]
    wait_for(lambda: "kaboom" in devhost.log(), 5, "the traceback on stderr", devhost.log)
    assert http.get("/api/items/1").status_code == 200  # the host carries on


def test_local_settings_apply_and_environment_wins(http: httpx.Client) -> None:
    assert http.get("/api/settings").json() == {"FROM_FILE": "file", "OVERRIDDEN": "environment"}


def test_requests_are_logged(http: httpx.Client, devhost: DevHostProcess) -> None:
    http.get("/api/items/logged-request")
    wait_for(
        lambda: "GET /api/items/logged-request 200" in devhost.log(), 5, "the request log line", devhost.log
    )


# -- timers ---------------------------------------------------------------------------------------------


def test_every_second_timer_runs_on_schedule(devhost: DevHostProcess) -> None:
    before = len(devhost.records("tick"))
    wait_for(lambda: len(devhost.records("tick")) >= before + 2, 5, "two timer invocations", devhost.log)
    first, second = (datetime.fromisoformat(t["at"]) for t in devhost.records("tick")[before : before + 2])
    assert first.replace(microsecond=0) != second.replace(microsecond=0)  # one invocation per second
    assert timedelta(seconds=0.5) < second - first < timedelta(seconds=2)


# -- queues ---------------------------------------------------------------------------------------------


def test_queue_trigger_receives_base64_message(devhost: DevHostProcess) -> None:
    payload = json.dumps({"hello": "wörld", "n": uuid.uuid4().hex})
    devhost.queue("GOOD_QUEUE").send_message(payload)
    record = wait_for(
        lambda: next((r for r in devhost.records("good") if r["body"] == payload), None),
        10,
        "the queue function to receive the message",
        devhost.log,
    )
    assert record["dequeue_count"] == 1
    # Processed messages are deleted.
    wait_for(
        lambda: not devhost.queue("GOOD_QUEUE").peek_messages(max_messages=32),
        5,
        "the queue to be empty",
        devhost.log,
    )


def test_failing_message_goes_to_poison_after_max_dequeue_count(devhost: DevHostProcess) -> None:
    payload = "fails-" + uuid.uuid4().hex
    devhost.queue("BAD_QUEUE").send_message(payload)
    poison = devhost.queue("BAD_QUEUE", base64_encode=False, suffix="-poison")
    poisoned = wait_for(
        lambda: poison.peek_messages(max_messages=32) if _queue_exists(poison) else None,
        15,
        "the message in the poison queue",
        devhost.log,
    )
    assert [m.content for m in poisoned] == [base64.b64encode(payload.encode()).decode()]  # original text
    counts = [r["dequeue_count"] for r in devhost.records("bad") if r["body"] == payload]
    assert counts == [1, 2, 3]
    assert not devhost.queue("BAD_QUEUE").peek_messages(max_messages=32)


def test_undecodable_message_goes_to_poison_and_queue_continues(devhost: DevHostProcess) -> None:
    raw = devhost.queue("GOOD_QUEUE", base64_encode=False)
    garbage = f"not base64! {uuid.uuid4().hex}"
    raw.send_message(garbage)
    good_payload = "after-garbage-" + uuid.uuid4().hex
    devhost.queue("GOOD_QUEUE").send_message(good_payload)
    wait_for(
        lambda: any(r["body"] == good_payload for r in devhost.records("good")),
        10,
        "the good message after the undecodable one",
        devhost.log,
    )
    poison = devhost.queue("GOOD_QUEUE", base64_encode=False, suffix="-poison")
    wait_for(
        lambda: (
            _queue_exists(poison) and garbage in [m.content for m in poison.peek_messages(max_messages=32)]
        ),
        10,
        "the undecodable message in the poison queue",
        devhost.log,
    )
    assert not any(garbage in r["body"] for r in devhost.records("good"))
    assert "cannot be decoded" in devhost.log()


def test_batch_is_processed_concurrently(devhost: DevHostProcess) -> None:
    sender = devhost.queue("SLOW_QUEUE")
    for n in range(4):
        sender.send_message(f"slow-{n}")
    records = wait_for(
        lambda: devhost.records("slow_queue") if len(devhost.records("slow_queue")) >= 4 else None,
        10,
        "four slow messages",
        devhost.log,
    )
    assert sorted(r["body"] for r in records) == [f"slow-{n}" for n in range(4)]
    # Each takes 0.5 s; all four ran at the same time.
    assert max(r["started"] for r in records) < min(r["ended"] for r in records)


def _queue_exists(client: QueueClient) -> bool:
    try:
        client.get_queue_properties()
    except Exception:
        return False
    return True


# -- start-up and shutdown ------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_request_finish(azurite: Any, tmp_path: Path) -> None:
    app_dir, out_dir = tmp_path / "app", tmp_path / "out"
    out_dir.mkdir()
    write_app(app_dir, {"TICK_SCHEDULE": "0 0 0 1 1 *", "GOOD_QUEUE": "g" + uuid.uuid4().hex[:10]})
    env = base_env(out_dir) | {
        "AzureWebJobsStorage": azurite.connection_string,
        "BAD_QUEUE": "b" + uuid.uuid4().hex[:10],
        "SLOW_QUEUE": "s" + uuid.uuid4().hex[:10],
    }
    host = start_devhost(app_dir, env)
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            result["response"] = httpx.get(f"{host.url}/api/slow", params={"seconds": "1"}, timeout=10)
        except httpx.HTTPError as exc:
            result["error"] = exc

    caller = threading.Thread(target=slow_request)
    caller.start()
    wait_for(lambda: host.records("slow"), 5, "the slow request to start", host.log)
    assert host.terminate() == 0, host.log()
    caller.join(10)
    assert "error" not in result, result
    assert result["response"].status_code == 200
    assert result["response"].text == "finished"


def test_missing_setting_in_binding_expression_fails_start(azurite: Any, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    write_app(app_dir, {"TICK_SCHEDULE": "*/1 * * * * *"})  # GOOD_QUEUE and BAD_QUEUE unset
    env = base_env(tmp_path) | {"AzureWebJobsStorage": azurite.connection_string}
    env.pop("BAD_QUEUE", None)
    completed = subprocess.run(
        [sys.executable, "-m", "routines.devhost", "--app-dir", str(app_dir), "--port", "0"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 2
    assert "%GOOD_QUEUE%" in completed.stderr
    assert "ready" not in completed.stdout


def test_in_process_host_without_timers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "function_app.py").write_text(
        textwrap.dedent(
            """
            import os
            import azure.functions as func

            app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

            @app.timer_trigger(schedule="*/1 * * * * *", arg_name="timer", run_on_startup=True)
            def tick(timer: func.TimerRequest) -> None:
                open(os.path.join(os.environ["OUT_DIR"], "ticked"), "a").close()

            @app.route(route="ping")
            def ping(req: func.HttpRequest) -> func.HttpResponse:
                return func.HttpResponse("pong")
            """
        ),
        encoding="utf-8",
    )
    (app_dir / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": ""}}})
    )
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    host = DevHost(app_dir, port=0, timers=False)
    host.start()
    try:
        assert httpx.get(f"{host.url}/ping", timeout=5).text == "pong"  # empty route prefix
        time.sleep(1.2)  # runOnStartup plus at least one scheduled second, had timers been on
        assert not (tmp_path / "ticked").exists()
    finally:
        assert host.stop(grace=5)


def test_function_key_guards_non_anonymous_routes_only(tmp_path: Path) -> None:
    (tmp_path / "function_app.py").write_text(
        textwrap.dedent(
            """
            import azure.functions as func

            app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

            @app.route(route="secret")
            def secret(req: func.HttpRequest) -> func.HttpResponse:
                return func.HttpResponse("secret")

            @app.route(route="pages/{*path}", auth_level=func.AuthLevel.ANONYMOUS)
            def pages(req: func.HttpRequest) -> func.HttpResponse:
                return func.HttpResponse("page")
            """
        ),
        encoding="utf-8",
    )
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0"}))
    host = DevHost(tmp_path, port=0, timers=False, function_key="k3y")
    host.start()
    try:
        assert host.route_url("pages") == f"{host.url}/api/pages"
        assert host.route_url("nothing") is None

        def get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
            return httpx.get(f"{host.url}/api/{path}", timeout=5, headers=headers)

        assert (get("secret").status_code, get("secret").content) == (401, b"")
        assert get("secret", headers={"x-functions-key": "wrong"}).status_code == 401
        assert get("secret", headers={"x-functions-key": "k3y"}).text == "secret"
        assert get("secret?code=k3y").text == "secret"
        assert get("pages").text == get("pages/a/b.css").text == "page"  # anonymous: no key needed
        assert get("nowhere").status_code == 404  # unknown paths stay 404, not 401
    finally:
        assert host.stop(grace=5)


def _app_with(decorate: Callable[[Any], None]) -> Any:
    import azure.functions as func

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    decorate(app)
    return app


def test_discovery_reads_the_decorators_and_skips_disabled_functions() -> None:
    def worker(item: Any) -> None: ...

    def switched_off(req: Any) -> None: ...

    def decorate(app: Any) -> None:
        app.queue_trigger(arg_name="item", queue_name="work", connection="Storage")(worker)
        app.route(route="off")(switched_off)

    specs = discover_functions(_app_with(decorate), {"AzureWebJobs.switched_off.Disabled": "true"})
    assert [(s.name, s.trigger_type, s.arg_name, s.trigger["queueName"]) for s in specs] == [
        ("worker", "queueTrigger", "item", "work")
    ]


def test_discovery_rejects_what_the_devhost_cannot_run() -> None:
    def send(req: Any, out: Any) -> None: ...

    def needs_context(req: Any, context: Any) -> None: ...

    def tick(clock: Any) -> None: ...

    def output_binding(app: Any) -> None:
        app.route(route="send")(
            app.queue_output(arg_name="out", queue_name="elsewhere", connection="S")(send)
        )

    def extra_parameter(app: Any) -> None:
        app.route(route="ctx")(needs_context)

    def renamed_binding(app: Any) -> None:
        app.timer_trigger(schedule="0 * * * * *", arg_name="timer")(tick)

    with pytest.raises(DevHostError, match="binding 'out' of type queue"):
        discover_functions(_app_with(output_binding), {})
    with pytest.raises(DevHostError, match="needs_context: no binding fills parameter"):
        discover_functions(_app_with(extra_parameter), {})
    with pytest.raises(DevHostError, match="named 'timer' but the Python function has no parameter"):
        discover_functions(_app_with(renamed_binding), {})


# -- pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        pytest.param("routines/{id}", ["routines", "rt_1"], {"id": "rt_1"}, id="parameter"),
        pytest.param("routines/{id}", ["ROUTINES", "rt_1"], {"id": "rt_1"}, id="literal_case_insensitive"),
        pytest.param("routines/{id}", ["routines"], None, id="missing_segment"),
        pytest.param("routines/{id}", ["routines", "a", "b"], None, id="extra_segment"),
        pytest.param(
            "routines/{id}/runs/{run_id}",
            ["routines", "a", "runs", "b"],
            {"id": "a", "run_id": "b"},
            id="two",
        ),
        pytest.param("items/{id:int}", ["items", "-42"], {"id": "-42"}, id="int_ok"),
        pytest.param("items/{id:int}", ["items", "4x"], None, id="int_rejects"),
        pytest.param("items/{id:alpha}", ["items", "abc"], {"id": "abc"}, id="alpha_ok"),
        pytest.param("items/{id:alpha:maxlength(2)}", ["items", "abc"], None, id="chained_constraints"),
        pytest.param(
            "items/{id:guid}", ["items", str(uuid.UUID(int=1))], {"id": str(uuid.UUID(int=1))}, id="guid"
        ),
        pytest.param("items/{id:someday}", ["items", "x"], {"id": "x"}, id="unknown_constraint_tolerated"),
        pytest.param("items/{id?}", ["items"], {}, id="optional_absent"),
        pytest.param("items/{id?}", ["items", "3"], {"id": "3"}, id="optional_present"),
        pytest.param("files/{*rest}", ["files", "a", "b.txt"], {"rest": "a/b.txt"}, id="catch_all"),
        pytest.param("files/{*rest}", ["files"], {}, id="catch_all_matches_nothing"),
        pytest.param("files/{*rest}", ["other"], None, id="catch_all_after_a_literal"),
        pytest.param(
            "files/{name}.{ext}",
            ["files", "report.tar.gz"],
            {"name": "report", "ext": "tar.gz"},
            id="complex",
        ),
        pytest.param("openapi.json", ["openapi.json"], {}, id="literal_with_dot"),
        pytest.param("openapi.json", ["openapiXjson"], None, id="dot_is_literal"),
    ],
)
def test_route_template_matching(template: str, path: list[str], expected: dict[str, str] | None) -> None:
    assert RouteTemplate(template).match(path) == expected


def test_router_prefers_literal_segments_and_reports_allowed_methods() -> None:
    def spec(name: str, route: str, methods: list[str]) -> Any:
        from routines.devhost import FunctionSpec

        trigger = {"type": "httpTrigger", "name": "req", "route": route, "methods": methods}
        return FunctionSpec(name, trigger, lambda req: None)

    router = HttpRouter(
        "api",
        [
            spec("by_id", "routines/{id}", ["GET"]),
            spec("listing", "routines/list", ["GET"]),
            spec("create", "routines", ["POST"]),
        ],
    )
    route, params, _ = router.find("GET", "/api/routines/list")
    assert route is not None and route.spec.name == "listing"
    route, params, _ = router.find("GET", "/api/routines/rt_1")
    assert route is not None and (route.spec.name, params) == ("by_id", {"id": "rt_1"})
    route, _, allowed = router.find("DELETE", "/api/routines")
    assert route is None and allowed == {"POST"}
    assert router.find("GET", "/elsewhere/routines") == (None, {}, set())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:00:00.200", 0.2), ("00:01:00", 60.0), ("1.02:00:00", 93600.0), ("00:00:05.5", 5.5), (250, 0.25)],
)
def test_parse_timespan(text: object, seconds: float) -> None:
    assert parse_timespan(text, "test") == pytest.approx(seconds)


def test_parse_timespan_rejects_garbage() -> None:
    with pytest.raises(DevHostError, match="not a TimeSpan"):
        parse_timespan("soon", "host.json extensions.queues.visibilityTimeout")


def test_queue_options_defaults_and_overrides() -> None:
    assert QueueOptions.from_host_json({}) == QueueOptions(16, 8, 60.0, 0.0, 5, "base64")
    options = QueueOptions.from_host_json(
        {"batchSize": 4, "maxPollingInterval": "00:00:02", "messageEncoding": "None"}
    )
    assert (options.batch_size, options.new_batch_threshold, options.max_polling_interval) == (4, 2, 2.0)
    assert options.message_encoding == "none"
    with pytest.raises(DevHostError, match="batchSize"):
        QueueOptions.from_host_json({"batchSize": 64})


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        pytest.param(
            "0 * * * * *", "2026-01-01T12:00:00+00:00", "2026-01-01T12:01:00+00:00", id="every_minute"
        ),
        pytest.param(
            "*/1 * * * * *", "2026-01-01T12:00:00.300+00:00", "2026-01-01T12:00:01+00:00", id="every_second"
        ),
        pytest.param(
            "0 30 9 * * 1-5", "2026-01-02T10:00:00+00:00", "2026-01-05T09:30:00+00:00", id="weekdays"
        ),
        pytest.param(
            "30 9 * * *", "2026-01-01T00:00:00+00:00", "2026-01-01T09:30:00+00:00", id="five_fields"
        ),
        pytest.param("00:00:05", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:05+00:00", id="timespan"),
        pytest.param("0 0 0 * * *", "2026-01-01T01:00:00+01:00", "2026-01-02T00:00:00+00:00", id="utc"),
    ],
)
def test_schedule_next_after(expression: str, after: str, expected: str) -> None:
    assert Schedule(expression, "test").next_after(datetime.fromisoformat(after)) == datetime.fromisoformat(
        expected
    ).astimezone(UTC)


def test_schedule_rejects_invalid_expression() -> None:
    with pytest.raises(DevHostError, match="function tick"):
        Schedule("every day at noon", "function tick")


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("@daily", id="macro"),  # routines accept macros; NCRONTAB has none
        pytest.param("0 0 0 30 2 *", id="never_fires"),
        pytest.param("0 0 12 * * 1#2", id="nth_weekday"),
        pytest.param("0 0 12 * * * 2027", id="year_field"),
    ],
)
def test_schedule_rejects_what_ncrontab_does_not_run(expression: str) -> None:
    with pytest.raises(DevHostError, match="is not a valid NCRONTAB expression"):
        Schedule(expression, "function tick")


def test_the_apps_own_timer_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    """function_app.py's timer triggers, as the devhost reads them (through ``routines.schedule``)."""
    monkeypatch.setitem(sys.modules, "function_app", sys.modules.get("function_app"))  # restored after
    specs = discover_functions(find_function_app(load_app_module(ROOT)), {})
    after = datetime(2026, 11, 29, 20, 7, 0, tzinfo=UTC)
    next_fires = {
        s.name: Schedule(str(s.trigger["schedule"]), s.name).next_after(after)
        for s in specs
        if s.trigger_type == "timerTrigger"
    }
    assert next_fires == {
        "tick": datetime(2026, 11, 29, 20, 8, 0, tzinfo=UTC),
        "repair": datetime(2026, 11, 29, 20, 7, 15, tzinfo=UTC),
        "purge_runs": datetime(2026, 11, 30, 3, 30, 0, tzinfo=UTC),
    }


@pytest.mark.azurite
def test_azurite_restart_keeps_ports_and_data(tmp_path: Path) -> None:
    from routines.azurite import Azurite

    with Azurite(tmp_path / "data") as emulator:
        ports = (emulator.blob_port, emulator.queue_port, emulator.table_port)
        assert len(set(ports)) == 3
        client = QueueClient.from_connection_string(emulator.connection_string, "kept")
        client.create_queue()
        client.send_message("survives a restart")
        emulator.restart()
        assert (emulator.blob_port, emulator.queue_port, emulator.table_port) == ports
        client = QueueClient.from_connection_string(emulator.connection_string, "kept")
        assert [m.content for m in client.peek_messages()] == ["survives a restart"]
    assert not emulator.running
