"""A scriptable fake Foundry project on 127.0.0.1, speaking the REST the real SDK clients send.

One server holds both protocols under the project path, as the real endpoint does:

- classic agents (``azure-ai-agents``, ``api-version=v1``): ``/threads...`` threads, messages and runs;
- agents by name (the OpenAI client of ``azure-ai-projects``): ``/openai/v1/conversations...`` and
  ``/openai/v1/responses...``.

Every request is recorded (method, path, query, headers, JSON body) before anything else happens, so a
test can count exactly what reached the wire. Scripting:

- ``fail(method, route, status, ...)``: answer the next ``times`` matching requests with an error
  (or delay them), before the normal handling;
- ``script(Outcome(...), ...)``: how the next runs / responses created end (status, error code,
  number of polls answered ``in_progress`` first); unscripted ones complete after one such poll;
- ``add_thread(n)`` / ``add_conversation(n)``: an existing thread / conversation holding ``n`` messages.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

PROJECT_PATH = "/api/projects/test-project"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # the full request path, without the query
    route: str  # the path below the project endpoint, e.g. "/threads/runs"
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # the decoded JSON body, or None


@dataclass
class Outcome:
    """How a run or response ends: after ``polls`` GETs answered ``in_progress``, with ``status``."""

    status: str = "completed"  # completed | failed | requires_action | expired | cancelled | incomplete
    polls: int = 1
    error_code: str | None = None  # failed: the run's last_error.code / the response's error.code
    error_message: str = "the run failed"
    output_text: str | None = None  # completed: the assistant's text (default: "echo: <input>")
    extra_output: list[dict[str, Any]] = field(default_factory=list)  # responses: more output items
    incomplete_reason: str = "max_output_tokens"


@dataclass
class _Injection:
    method: str
    route: re.Pattern[str]
    status: int | None
    body: Any
    headers: dict[str, str]
    times: int
    delay: float


@dataclass
class _Job:
    """A classic run or a response, with its script."""

    body: dict[str, Any]
    outcome: Outcome
    polls_left: int
    input_text: str
    cancelled: bool = False


class FakeFoundry:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.internal_errors: list[str] = []  # exceptions inside the fake (tests assert it stays empty)
        self.threads: dict[str, list[dict[str, Any]]] = {}  # thread id -> messages, oldest first
        self.thread_metadata: dict[str, dict[str, str]] = {}
        self.runs: dict[str, _Job] = {}
        self.conversations: dict[str, list[dict[str, Any]]] = {}  # conversation id -> items, oldest first
        self.conversation_metadata: dict[str, dict[str, str]] = {}
        self.responses: dict[str, _Job] = {}
        self._outcomes: deque[Outcome] = deque()
        self._injections: list[_Injection] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-foundry",
            daemon=True,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeFoundry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        """Forget every request, object and script (ids keep counting), for the next test."""
        with self._lock:
            self.requests.clear()
            self.internal_errors.clear()
            self.threads.clear()
            self.thread_metadata.clear()
            self.runs.clear()
            self.conversations.clear()
            self.conversation_metadata.clear()
            self.responses.clear()
            self._outcomes.clear()
            self._injections.clear()

    @property
    def endpoint(self) -> str:
        """The project endpoint to give the SDK clients."""
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}{PROJECT_PATH}"

    # --- scripting ---------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        route: str,
        status: int | None,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``route`` regex with ``status``.

        ``status`` None only waits ``delay`` seconds and then answers normally (a slow server).
        """
        if body is None and status is not None:
            body = {"error": {"code": f"http_{status}", "message": f"injected {status}"}}
        with self._lock:
            self._injections.append(
                _Injection(method, re.compile(route), status, body, headers or {}, times, delay)
            )

    def script(self, *outcomes: Outcome) -> None:
        """The outcomes of the next runs / responses created, in order."""
        with self._lock:
            self._outcomes.extend(outcomes)

    def add_thread(self, messages: int) -> str:
        with self._lock:
            thread_id = self._new_id("thread")
            self.threads[thread_id] = []
            for i in range(messages):
                role = "user" if i % 2 == 0 else "assistant"
                self.threads[thread_id].append(self._message(thread_id, role, f"old {i}", None))
            return thread_id

    def add_conversation(self, messages: int, other_items: int = 0) -> str:
        """A conversation with ``messages`` message items and ``other_items`` reasoning items."""
        with self._lock:
            conversation_id = self._new_id("conv")
            items = [
                self._message_item("user" if i % 2 == 0 else "assistant", f"old {i}") for i in range(messages)
            ]
            items += [
                {"type": "reasoning", "id": self._new_id("rs"), "summary": []} for _ in range(other_items)
            ]
            self.conversations[conversation_id] = items
            return conversation_id

    def requests_to(self, method: str, route: str) -> list[Recorded]:
        """The recorded requests whose method is ``method`` and whose route matches the regex ``route``."""
        pattern = re.compile(route)
        with self._lock:
            return [r for r in self.requests if r.method == method and pattern.fullmatch(r.route)]

    # --- request handling ----------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> _Answer:
        parts = urlsplit(raw_path)
        route = parts.path[len(PROJECT_PATH) :] if parts.path.startswith(PROJECT_PATH) else parts.path
        body = json.loads(raw_body) if raw_body else None
        record = Recorded(method, parts.path, route, dict(parse_qsl(parts.query)), headers, body)
        with self._lock:
            self.requests.append(record)
            injection = self._take_injection(method, route)
        if injection is not None:
            if injection.delay:
                time.sleep(injection.delay)
            if injection.status is not None:
                return _Answer(injection.status, injection.body, injection.headers)
        if not headers.get("authorization", "").startswith("Bearer "):
            return _error(401, "unauthorized", "no bearer token")
        with self._lock:
            for route_method, pattern, action in _ROUTES:
                match = pattern.fullmatch(route)
                if match and route_method == method:
                    if route.startswith("/threads") and record.query.get("api-version") != "v1":
                        return _error(
                            400, "bad_api_version", f"api-version {record.query.get('api-version')}"
                        )
                    answer: _Answer = action(self, record, *match.groups())
                    return answer
        return _error(404, "not_found", f"no route {method} {route}")

    def _take_injection(self, method: str, route: str) -> _Injection | None:
        for injection in self._injections:
            if injection.method == method and injection.route.fullmatch(route) and injection.times > 0:
                injection.times -= 1
                return injection
        return None

    # --- classic: threads, messages, runs -----------------------------------------------------

    def _create_thread_and_run(self, req: Recorded) -> _Answer:
        thread_spec = req.body.get("thread") or {}
        thread_id = self._new_id("thread")
        self.threads[thread_id] = []
        self.thread_metadata[thread_id] = thread_spec.get("metadata") or {}
        for message in thread_spec.get("messages") or []:
            self.threads[thread_id].append(
                self._message(thread_id, message["role"], message["content"], None, message.get("metadata"))
            )
        return self._start_run(thread_id, req.body)

    def _get_thread(self, req: Recorded, thread_id: str) -> _Answer:
        if thread_id not in self.threads:
            return _error(404, "not_found", f"no thread {thread_id}")
        return _Answer(200, {"id": thread_id, "object": "thread", "created_at": 1, "metadata": {}})

    def _create_message(self, req: Recorded, thread_id: str) -> _Answer:
        if thread_id not in self.threads:
            return _error(404, "not_found", f"no thread {thread_id}")
        body = req.body
        message = self._message(thread_id, body["role"], body["content"], None, body.get("metadata"))
        self.threads[thread_id].append(message)
        return _Answer(200, message)

    def _list_messages(self, req: Recorded, thread_id: str) -> _Answer:
        if thread_id not in self.threads:
            return _error(404, "not_found", f"no thread {thread_id}")
        messages = self.threads[thread_id]
        run_id = req.query.get("run_id")
        if run_id:
            messages = [m for m in messages if m["run_id"] == run_id]
        return _Answer(200, _page(messages, req.query))

    def _create_run(self, req: Recorded, thread_id: str) -> _Answer:
        if thread_id not in self.threads:
            return _error(404, "not_found", f"no thread {thread_id}")
        return self._start_run(thread_id, req.body)

    def _start_run(self, thread_id: str, body: dict[str, Any]) -> _Answer:
        run_id = self._new_id("run")
        outcome = self._outcomes.popleft() if self._outcomes else Outcome()
        user_texts = [
            m["content"][0]["text"]["value"] for m in self.threads[thread_id] if m["role"] == "user"
        ]
        self.runs[run_id] = _Job(
            body={**body, "id": run_id, "thread_id": thread_id, "status": "queued"},
            outcome=outcome,
            polls_left=outcome.polls,
            input_text=user_texts[-1] if user_texts else "",
        )
        return _Answer(200, self._run_json(run_id))

    def _get_run(self, req: Recorded, thread_id: str, run_id: str) -> _Answer:
        job = self.runs.get(run_id)
        if job is None or job.body["thread_id"] != thread_id:
            return _error(404, "not_found", f"no run {run_id}")
        if job.body["status"] in ("queued", "in_progress"):
            if job.polls_left > 0:
                job.polls_left -= 1
                job.body["status"] = "in_progress"
            else:
                self._finish_run(run_id, job)
        elif job.body["status"] == "cancelling":
            job.body["status"] = "cancelled"
        return _Answer(200, self._run_json(run_id))

    def _finish_run(self, run_id: str, job: _Job) -> None:
        outcome = job.outcome
        job.body["status"] = outcome.status
        if outcome.status == "completed":
            text = outcome.output_text if outcome.output_text is not None else f"echo: {job.input_text}"
            thread_id = job.body["thread_id"]
            self.threads[thread_id].append(self._message(thread_id, "assistant", text, run_id))
        elif outcome.status == "failed":
            job.body["last_error"] = {"code": outcome.error_code, "message": outcome.error_message}
        elif outcome.status == "requires_action":
            job.body["required_action"] = {
                "type": "submit_tool_outputs",
                "submit_tool_outputs": {
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": "{}"},
                        }
                    ]
                },
            }

    def _cancel_run(self, req: Recorded, thread_id: str, run_id: str) -> _Answer:
        job = self.runs.get(run_id)
        if job is None or job.body["thread_id"] != thread_id:
            return _error(404, "not_found", f"no run {run_id}")
        if job.body["status"] in ("completed", "failed", "cancelled", "expired"):
            return _error(400, "invalid_state", f"run {run_id} is {job.body['status']}")
        job.cancelled = True
        job.body["status"] = "cancelling"
        return _Answer(200, self._run_json(run_id))

    def _run_json(self, run_id: str) -> dict[str, Any]:
        body = self.runs[run_id].body
        return {
            "id": run_id,
            "object": "thread.run",
            "thread_id": body["thread_id"],
            "assistant_id": body.get("assistant_id"),
            "status": body["status"],
            "required_action": body.get("required_action"),
            "last_error": body.get("last_error"),
            "model": "gpt-4o",
            "instructions": "",
            "tools": [],
            "created_at": 1700000000,
            "metadata": body.get("metadata") or {},
        }

    def _message(
        self,
        thread_id: str,
        role: str,
        content: str,
        run_id: str | None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self._new_id("msg"),
            "object": "thread.message",
            "created_at": 1700000000,
            "thread_id": thread_id,
            "run_id": run_id,
            "assistant_id": None,
            "role": role,
            "status": "completed",
            "content": [{"type": "text", "text": {"value": content, "annotations": []}}],
            "attachments": [],
            "metadata": metadata or {},
        }

    # --- responses: conversations and responses -------------------------------------------------

    def _create_conversation(self, req: Recorded) -> _Answer:
        conversation_id = self._new_id("conv")
        self.conversations[conversation_id] = []
        self.conversation_metadata[conversation_id] = (req.body or {}).get("metadata") or {}
        return _Answer(200, self._conversation_json(conversation_id))

    def _get_conversation(self, req: Recorded, conversation_id: str) -> _Answer:
        if conversation_id not in self.conversations:
            return _error(404, "not_found", f"no conversation {conversation_id}")
        return _Answer(200, self._conversation_json(conversation_id))

    def _list_items(self, req: Recorded, conversation_id: str) -> _Answer:
        if conversation_id not in self.conversations:
            return _error(404, "not_found", f"no conversation {conversation_id}")
        return _Answer(200, _page(self.conversations[conversation_id], req.query))

    def _create_response(self, req: Recorded) -> _Answer:
        body = req.body
        conversation = body.get("conversation")
        conversation_id = conversation if isinstance(conversation, str) else (conversation or {}).get("id")
        if conversation_id not in self.conversations:
            return _error(404, "not_found", f"no conversation {conversation_id}")
        text = body["input"] if isinstance(body["input"], str) else json.dumps(body["input"])
        self.conversations[conversation_id].append(self._message_item("user", text))
        response_id = self._new_id("resp")
        outcome = self._outcomes.popleft() if self._outcomes else Outcome()
        self.responses[response_id] = _Job(
            body={**body, "id": response_id, "conversation_id": conversation_id, "status": "queued"},
            outcome=outcome,
            polls_left=outcome.polls,
            input_text=text,
        )
        return _Answer(200, self._response_json(response_id))

    def _get_response(self, req: Recorded, response_id: str) -> _Answer:
        job = self.responses.get(response_id)
        if job is None:
            return _error(404, "not_found", f"no response {response_id}")
        if job.body["status"] in ("queued", "in_progress"):
            if job.polls_left > 0:
                job.polls_left -= 1
                job.body["status"] = "in_progress"
            else:
                self._finish_response(job)
        return _Answer(200, self._response_json(response_id))

    def _finish_response(self, job: _Job) -> None:
        outcome = job.outcome
        job.body["status"] = outcome.status
        if outcome.status == "completed":
            text = outcome.output_text if outcome.output_text is not None else f"echo: {job.input_text}"
            message = self._message_item("assistant", text, output=True)
            job.body["output"] = [*outcome.extra_output, message]
            self.conversations[job.body["conversation_id"]].extend(job.body["output"])
        elif outcome.status == "failed":
            job.body["error"] = {"code": outcome.error_code, "message": outcome.error_message}
        elif outcome.status == "incomplete":
            job.body["incomplete_details"] = {"reason": outcome.incomplete_reason}

    def _cancel_response(self, req: Recorded, response_id: str) -> _Answer:
        job = self.responses.get(response_id)
        if job is None:
            return _error(404, "not_found", f"no response {response_id}")
        if job.body["status"] not in ("queued", "in_progress"):
            return _error(400, "invalid_state", f"response {response_id} is {job.body['status']}")
        job.cancelled = True
        job.body["status"] = "cancelled"
        return _Answer(200, self._response_json(response_id))

    def _response_json(self, response_id: str) -> dict[str, Any]:
        body = self.responses[response_id].body
        return {
            "id": response_id,
            "object": "response",
            "created_at": 1700000000,
            "status": body["status"],
            "background": body.get("background"),
            "conversation": {"id": body["conversation_id"]},
            "error": body.get("error"),
            "incomplete_details": body.get("incomplete_details"),
            "metadata": body.get("metadata") or {},
            "model": "gpt-4o",
            "output": body.get("output") or [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }

    def _conversation_json(self, conversation_id: str) -> dict[str, Any]:
        return {
            "id": conversation_id,
            "object": "conversation",
            "created_at": 1700000000,
            "metadata": self.conversation_metadata.get(conversation_id, {}),
        }

    def _message_item(self, role: str, text: str, *, output: bool = False) -> dict[str, Any]:
        content_type = "output_text" if output or role == "assistant" else "input_text"
        content: dict[str, Any] = {"type": content_type, "text": text}
        if content_type == "output_text":
            content["annotations"] = []
        return {
            "type": "message",
            "id": self._new_id("msg"),
            "role": role,
            "status": "completed",
            "content": [content],
        }

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"


# --- wire helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str) -> _Answer:
    return _Answer(status, {"error": {"code": code, "message": message, "type": "invalid_request_error"}})


def _page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """One page of ``items`` (oldest first) per ``order`` (default desc), ``after`` and ``limit``."""
    ordered = list(reversed(items)) if query.get("order", "desc") == "desc" else list(items)
    after = query.get("after")
    if after:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    limit = int(query.get("limit", "20"))
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


_ID = r"([^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], Any]] = [
    ("POST", re.compile(r"/threads/runs"), FakeFoundry._create_thread_and_run),
    ("GET", re.compile(rf"/threads/{_ID}"), FakeFoundry._get_thread),
    ("POST", re.compile(rf"/threads/{_ID}/messages"), FakeFoundry._create_message),
    ("GET", re.compile(rf"/threads/{_ID}/messages"), FakeFoundry._list_messages),
    ("POST", re.compile(rf"/threads/{_ID}/runs"), FakeFoundry._create_run),
    ("GET", re.compile(rf"/threads/{_ID}/runs/{_ID}"), FakeFoundry._get_run),
    ("POST", re.compile(rf"/threads/{_ID}/runs/{_ID}/cancel"), FakeFoundry._cancel_run),
    ("POST", re.compile(r"/openai/v1/conversations"), FakeFoundry._create_conversation),
    ("GET", re.compile(rf"/openai/v1/conversations/{_ID}"), FakeFoundry._get_conversation),
    ("GET", re.compile(rf"/openai/v1/conversations/{_ID}/items"), FakeFoundry._list_items),
    ("POST", re.compile(r"/openai/v1/responses"), FakeFoundry._create_response),
    ("GET", re.compile(rf"/openai/v1/responses/{_ID}"), FakeFoundry._get_response),
    ("POST", re.compile(rf"/openai/v1/responses/{_ID}/cancel"), FakeFoundry._cancel_response),
]


def _make_handler(fake: FakeFoundry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK clients expect
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall between

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                answer = fake.handle(self.command, self.path, headers, raw_body)
            except Exception as exc:  # a bug in the fake: answer, and let the test see it
                fake.internal_errors.append(f"{self.command} {self.path}: {exc!r}")
                answer = _error(599, "fake_bug", repr(exc))
            payload = json.dumps(answer.body).encode() if answer.body is not None else b""
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.wfile.write(payload)

        do_GET = _serve
        do_POST = _serve
        do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test asserts on fake.requests instead

    return Handler
