"""A fake agent speaking the HTTP agent protocol (README, Agents), for every test that needs an agent.

In a test, as a context manager (it serves on 127.0.0.1, a free port, from a background thread)::

    with FakeAgent(token="t0ken") as agent:
        agent.script("flaky", [500, (429, {"Retry-After": "2"}), 200])
        agent.script("long", [Reply.pending(polls=3)])
        agent.script("stuck", [Reply.slow(5.0)])
        backend = HttpAgentBackend(agent.url, token="t0ken")
        ...
        agent.wait_for_calls(3, agent="flaky")
        assert [c.kind for c in agent.calls_for("long")] == ["start", "poll", "poll", "poll", "poll"]

Each agent name has a queue of scripted replies, consumed one per invocation (POST); when its queue is
empty the agent's default applies (``set_default``), else the server's (``default=``, echo). A reply is a
``Reply``, or a shorthand: ``200`` / ``500`` (a status), ``202`` (pending, done at the first poll),
``(429, {"Retry-After": "2"})`` (status and headers), ``("sleep", 5.0)`` (a slow echo), or a callable
``(Call) -> reply`` deciding per request.

Without a script every agent echoes: ``200 {"id": "fake_run_<n>", "output": <input as text>,
"thread_id": <the given one or a new one>}``. A pending run answers ``202`` with ``Location: /runs/<id>``,
then ``202`` to ``GET /runs/<id>`` until its polls (or its ``done_after`` seconds) are used up, then its
final reply; ``DELETE /runs/<id>`` cancels it (``204``, then ``410`` to GETs). ``answered()`` lists each
request with the status it got and the fake run it is about: when a run started and was seen done.

With ``token=`` and/or ``signing_secret=``, every request must carry ``Authorization: Bearer <token>``
and/or ``X-Routines-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<METHOD>.<path and
query>.<body>">`` with ``t`` within 300 s of the fake's ``clock``, or gets ``401`` (no script
consumed). The check is written here from the protocol, not imported from ``routines``, so the backend's
signing is tested against it.

As a process, for soak tests (prints ``fake agent ready on http://127.0.0.1:<port>``, logs every answered
request as a JSON line)::

    python tests/fake_agent.py --port 0 --fail-rate 0.2 --slow-rate 0.05 --pending-rate 0.2 --log calls.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import itertools
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import IO, Any, Literal, NamedTuple, TypeAlias
from urllib.parse import unquote, urlsplit

__all__ = ["Answered", "Call", "Chaos", "FakeAgent", "Headers", "Reply"]

_INVOCATION_PATH = re.compile(r"^.*/agents/([^/]+)/invocations$")
_RUN_PATH = re.compile(r"^/runs/([^/]+)$")
_SIGNATURE = re.compile(r"^t=(?P<t>[0-9]{1,12}),v1=(?P<v1>[0-9a-f]{64})$")
SIGNATURE_MAX_AGE = 300


class Headers(dict[str, str]):
    """Request headers: stored under lower-case names, looked up in any case (``h["Idempotency-Key"]``)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((name.lower(), value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


@dataclass(frozen=True)
class Call:
    """One request the fake agent received."""

    method: str
    path: str  # with the query string, as sent
    kind: Literal["start", "poll", "cancel", "other"]  # POST invocations, GET / DELETE /runs/<id>
    agent: str | None  # for polls and cancels, the agent of the run
    headers: Headers  # any case to look up; lower case when iterated
    body: Any  # the parsed JSON body; None when empty or not JSON
    raw_body: bytes
    received_at: float  # time.time()
    run: str | None = None  # the fake run id a poll or cancel is about

    @property
    def idempotency_key(self) -> str | None:
        key: str | None = self.headers.get("idempotency-key")
        return key

    @property
    def attempt(self) -> int | None:
        return self.body.get("attempt") if isinstance(self.body, dict) else None

    @property
    def input(self) -> Any:
        return self.body.get("input") if isinstance(self.body, dict) else None


@dataclass(frozen=True)
class Answered:
    """One request with the status the fake agent answered it (decided on arrival: a slow reply is
    listed before it is sent) and the fake run it is about: the one a ``202`` start began, or the one a
    poll or cancel named."""

    call: Call
    status: int
    run: str | None


@dataclass(frozen=True)
class Reply:
    """What the fake agent answers to one invocation.

    ``body`` None means: echo for a 200, ``{"error": "scripted <status>"}`` otherwise; ``bytes`` are
    sent as they are; anything else as JSON. ``delay`` seconds pass before the answer; with ``trickle``
    the body then goes out one byte every ``trickle`` seconds (an agent holding the call open). For ``202``:
    ``polls`` GETs answer 202 before the run completes (or, when set, ``done_after`` seconds after the
    start), then the GET answers ``final`` (default: echo 200); ``location`` picks the Location form,
    and ``headers`` (e.g. Retry-After) go on the first 202 and on every pending poll.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    polls: int = 1
    done_after: float | None = None
    final: Reply | None = None
    location: Literal["relative", "absolute", "none"] = "relative"
    trickle: float = 0.0

    @classmethod
    def ok(cls, output: Any = None, *, thread_id: str | None = None, **fields: Any) -> Reply:
        """200 with ``output`` (any JSON); echo when ``output`` is None and no other field is given."""
        if output is None and thread_id is None and not fields:
            return cls()
        body = {"output": output, **fields}
        if thread_id is not None:
            body["thread_id"] = thread_id
        return cls(body=body)

    @classmethod
    def error(cls, status: int, *, retry_after: float | str | None = None, body: Any = None) -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(status=status, headers=headers, body=body)

    @classmethod
    def raw(cls, status: int, data: bytes | str, content_type: str = "text/plain") -> Reply:
        data = data.encode() if isinstance(data, str) else data
        return cls(status=status, body=data, headers={"Content-Type": content_type})

    @classmethod
    def slow(cls, seconds: float, then: Reply | None = None) -> Reply:
        """``then`` (default: echo) after ``seconds``: a slow agent, or one that outlives a timeout."""
        return replace(then or cls(), delay=seconds)

    @classmethod
    def trickling(cls, interval: float, then: Reply | None = None) -> Reply:
        """``then`` (default: echo) with its body sent one byte every ``interval`` seconds."""
        return replace(then or cls(), trickle=interval)

    @classmethod
    def pending(
        cls,
        polls: int = 1,
        *,
        done_after: float | None = None,
        final: Reply | None = None,
        retry_after: float | str | None = None,
        location: Literal["relative", "absolute", "none"] = "relative",
    ) -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return cls(
            status=202, polls=polls, done_after=done_after, final=final, location=location, headers=headers
        )


Scripted: TypeAlias = "Reply | int | tuple[Any, ...] | Callable[[Call], Any]"


def as_reply(scripted: Scripted, call: Call) -> Reply:
    """Turn a script entry (a Reply, a shorthand or a callable) into a Reply for ``call``."""
    if callable(scripted) and not isinstance(scripted, Reply):
        return as_reply(scripted(call), call)
    if isinstance(scripted, Reply):
        return scripted
    if isinstance(scripted, int):
        return Reply.pending() if scripted == 202 else Reply(status=scripted)
    if isinstance(scripted, tuple) and len(scripted) == 2:
        first, second = scripted
        if first == "sleep":
            return Reply.slow(float(second))
        if isinstance(first, int) and isinstance(second, Mapping):
            base = Reply.pending() if first == 202 else Reply(status=first)
            return replace(base, headers=dict(second))
    raise TypeError(f"not a scripted reply: {scripted!r}")


@dataclass
class _Run:
    agent: str
    request: dict[str, Any]
    pending: Reply
    started_at: float
    polls_left: int
    cancelled: bool = False

    def done(self, now: float) -> bool:
        if self.pending.done_after is not None:
            return now >= self.started_at + self.pending.done_after
        return self.polls_left <= 0


class _Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    delay: float = 0.0  # slept by the handler thread, outside the lock
    trickle: float = 0.0  # seconds between the body's bytes
    run: str | None = None  # the fake run a 202 start began


class FakeAgent:
    """A scriptable HTTP agent on 127.0.0.1 (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        token: str | None = None,
        signing_secret: str | None = None,
        default: Scripted | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log: IO[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._token = token
        self._secret = signing_secret.encode() if signing_secret else None
        self.clock = clock  # unix seconds, for the signature's timestamp window
        self._default: Scripted = default if default is not None else Reply()
        self._log = log
        self._cond = threading.Condition()
        self._calls: list[Call] = []
        self._answered: list[Answered] = []
        self._scripts: dict[str, deque[Scripted]] = {}
        self._defaults: dict[str, Scripted] = {}
        self._runs: dict[str, _Run] = {}
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._host = host
        self._server = _Server((host, port), _Handler)
        self._server.agent = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> FakeAgent:
        if self._thread is None:
            # A short poll interval, so that stop() (server.shutdown) returns at once.
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="fake-agent",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; slow replies still sleeping are cut short. Idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- scripting ----------------------------------------------------------------------------------

    def script(self, agent: str, replies: Iterable[Scripted]) -> None:
        """Queue replies for the next invocations of ``agent`` (appended to what is queued)."""
        with self._cond:
            self._scripts.setdefault(agent, deque()).extend(replies)

    def set_default(self, agent: str, reply: Scripted) -> None:
        """What ``agent`` answers once its script is used up (instead of the server's default)."""
        with self._cond:
            self._defaults[agent] = reply

    def reset(self) -> None:
        """Forget calls, scripts, agent defaults and runs."""
        with self._cond:
            self._calls.clear()
            self._answered.clear()
            self._scripts.clear()
            self._defaults.clear()
            self._runs.clear()

    # -- inspection ---------------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every request received so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._calls)

    def calls_for(self, agent: str | None = None, kind: str | None = None) -> list[Call]:
        with self._cond:
            return [c for c in self._calls if _matches(c, agent, kind)]

    def answered(self, agent: str | None = None, kind: str | None = None) -> list[Answered]:
        """The requests answered so far (see ``Answered``), in arrival order."""
        with self._cond:
            return [a for a in self._answered if _matches(a.call, agent, kind)]

    def starts(self, agent: str | None = None) -> list[Call]:
        """The invocations (POSTs) received, optionally of one agent."""
        return self.calls_for(agent, "start")

    def duplicate_starts(self) -> dict[tuple[str | None, int | None], int]:
        """``(idempotency key, attempt)`` pairs that started more than once, with their count."""
        counts: dict[tuple[str | None, int | None], int] = {}
        for call in self.starts():
            key = (call.idempotency_key, call.attempt)
            counts[key] = counts.get(key, 0) + 1
        return {key: n for key, n in counts.items() if n > 1}

    def cancelled(self) -> list[str]:
        """Ids of the fake runs cancelled by a DELETE."""
        with self._cond:
            return [run_id for run_id, run in self._runs.items() if run.cancelled]

    def wait_for_calls(
        self, n: int, timeout: float = 5.0, *, agent: str | None = None, kind: str | None = None
    ) -> list[Call]:
        """Block until at least ``n`` matching requests arrived; return them. Raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [c for c in self._calls if _matches(c, agent, kind)]
                remaining = deadline - time.monotonic()
                if len(found) >= n:
                    return found
                if remaining <= 0:
                    seen = [(c.method, c.agent, c.kind) for c in self._calls]
                    raise TimeoutError(f"{len(found)} of {n} calls (agent={agent}, kind={kind}); seen {seen}")
                self._cond.wait(remaining)

    # -- serving (called from the handler threads) --------------------------------------------------

    def _handle(self, method: str, path: str, headers: Headers, raw: bytes) -> tuple[Call, _Answer]:
        body = _parse_json(raw)
        bare = urlsplit(path).path
        invocation = _INVOCATION_PATH.match(bare) if method == "POST" else None
        run_match = _RUN_PATH.match(bare)
        with self._cond:
            run_id = run_match.group(1) if run_match else None
            run = self._runs.get(run_id) if run_id else None
            kind: Literal["start", "poll", "cancel", "other"] = "other"
            agent = None
            if invocation:
                kind, agent = "start", unquote(invocation.group(1))
            elif run_match and method in ("GET", "DELETE"):
                kind = "poll" if method == "GET" else "cancel"
                agent = run.agent if run else None
            call = Call(method, path, kind, agent, headers, body, raw, time.time(), run_id)
            self._calls.append(call)
            self._cond.notify_all()
            try:
                answer = self._answer(call, run)
            except Exception as exc:  # a scripted callable failed: say so rather than drop the connection
                traceback.print_exc()
                answer = _json(500, {"error": f"fake agent failed: {exc!r}"})
            self._answered.append(Answered(call, answer.status, answer.run or run_id))
            return call, answer

    def _answer(self, call: Call, run: _Run | None) -> _Answer:
        refusal = self._refuse(call)
        if refusal is not None:
            return refusal
        if call.kind == "start" and call.agent is not None:
            if not isinstance(call.body, dict) or "input" not in call.body:
                return _json(400, {"error": "body must be a JSON object with an input"})
            reply = as_reply(self._next(call.agent), call)
            if reply.status == 202:
                return self._begin(call.agent, call.body, reply)
            return self._render(reply, call.body)
        if call.kind in ("poll", "cancel"):
            if run is None or call.run is None:
                return _json(404, {"error": f"no run {call.run}"})
            return self._poll(call.run, run) if call.kind == "poll" else self._cancel(run)
        return _json(404, {"error": f"no route for {call.method} {call.path}"})

    def _refuse(self, call: Call) -> _Answer | None:
        if self._token is not None and call.headers.get("authorization") != f"Bearer {self._token}":
            return _json(401, {"error": "missing or wrong bearer token"})
        if self._secret is not None:
            problem = self._signature_problem(call)
            if problem:
                return _json(401, {"error": problem})
        return None

    def _signature_problem(self, call: Call) -> str | None:
        assert self._secret is not None
        match = _SIGNATURE.match(call.headers.get("x-routines-signature", ""))
        if match is None:
            return "missing or malformed signature"
        timestamp, digest = match.group("t"), match.group("v1")
        if abs(self.clock() - int(timestamp)) > SIGNATURE_MAX_AGE:
            return "signature timestamp too old or in the future"
        message = f"{timestamp}.{call.method}.{call.path}.".encode() + call.raw_body
        expected = hmac.new(self._secret, message, hashlib.sha256).hexdigest()
        return None if hmac.compare_digest(digest, expected) else "wrong signature"

    def _next(self, agent: str) -> Scripted:
        queue = self._scripts.get(agent)
        if queue:
            return queue.popleft()
        return self._defaults.get(agent, self._default)

    def _begin(self, agent: str, request: dict[str, Any], reply: Reply) -> _Answer:
        run_id = f"fake_run_{next(self._ids)}"
        self._runs[run_id] = _Run(agent, request, reply, time.time(), reply.polls)
        headers = dict(reply.headers)
        if any(name.lower() == "location" for name in headers):
            pass  # a Location scripted as a header wins
        elif reply.location == "relative":
            headers["Location"] = f"/runs/{run_id}"
        elif reply.location == "absolute":
            headers["Location"] = f"{self.url}/runs/{run_id}"
        answer = _json(202, {"id": run_id, "status": "running"}, reply.delay)
        return answer._replace(headers={**answer.headers, **headers}, run=run_id)

    def _poll(self, run_id: str, run: _Run) -> _Answer:
        if run.cancelled:
            return _json(410, {"error": f"run {run_id} was cancelled"})
        if not run.done(time.time()):
            run.polls_left -= 1
            answer = _json(202, {"id": run_id, "status": "running"})
            return answer._replace(headers={**answer.headers, **run.pending.headers})
        return self._render(run.pending.final or Reply(), run.request, run_id)

    def _cancel(self, run: _Run) -> _Answer:
        run.cancelled = True
        return _Answer(204, {}, b"")

    def _render(self, reply: Reply, request: dict[str, Any], run_id: str | None = None) -> _Answer:
        if isinstance(reply.body, bytes):
            headers = {"Content-Type": "application/octet-stream", **reply.headers}
            return _Answer(reply.status, headers, reply.body, reply.delay, reply.trickle)
        if reply.body is not None:
            payload = reply.body
        elif reply.status == 200:
            payload = {
                "id": run_id or f"fake_run_{next(self._ids)}",
                "output": _as_text(request.get("input")),
                "thread_id": request.get("thread_id") or f"thread_{uuid.uuid4().hex[:12]}",
            }
        else:
            payload = {"error": f"scripted {reply.status}"}
        answer = _json(reply.status, payload, reply.delay)
        return answer._replace(headers={**answer.headers, **reply.headers}, trickle=reply.trickle)

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _record(self, call: Call, answer: _Answer) -> None:
        if self._log is None:
            return
        line = {
            "t": call.received_at,
            "method": call.method,
            "path": call.path,
            "kind": call.kind,
            "agent": call.agent,
            "status": answer.status,
            "delay": answer.delay + answer.trickle * len(answer.body),  # until the answer was whole
            "idempotency_key": call.idempotency_key,
            "attempt": call.attempt,
            "run_id": call.body.get("run_id") if isinstance(call.body, dict) else None,
        }
        with self._cond:
            self._log.write(json.dumps(line) + "\n")
            self._log.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: FakeAgent

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up is no error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients pool connections as they would in production
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait ~40 ms for an ACK
    server: _Server

    def _serve(self) -> None:
        agent = self.server.agent
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = Headers(self.headers.items())
        call, answer = agent._handle(self.command, self.path, headers, raw)
        if answer.delay:
            agent._wait(answer.delay)
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if answer.trickle:
                self.wfile.flush()
                for i in range(len(answer.body)):
                    if agent._stopping.is_set():
                        break
                    self.wfile.write(answer.body[i : i + 1])
                    self.wfile.flush()
                    agent._wait(answer.trickle)
            else:
                self.wfile.write(answer.body)
        except ConnectionError:  # the client gave up on a slow reply
            self.close_connection = True
        agent._record(call, answer)

    do_POST = do_GET = do_DELETE = do_PUT = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _json(status: int, payload: Any, delay: float = 0.0) -> _Answer:
    return _Answer(status, {"Content-Type": "application/json"}, json.dumps(payload).encode(), delay)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _matches(call: Call, agent: str | None, kind: str | None) -> bool:
    return (agent is None or call.agent == agent) and (kind is None or call.kind == kind)


@dataclass
class Chaos:
    """A random behaviour for soak tests: failures (500, 503, 429 + Retry-After), slow and pending runs."""

    fail_rate: float = 0.0
    slow_rate: float = 0.0
    pending_rate: float = 0.0
    slow_seconds: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    trickle_rate: float = 0.0  # answers sent a byte at a time, over about slow_seconds
    huge_id_rate: float = 0.0  # answers whose thread_id and id are far too long to store

    def __call__(self, call: Call) -> Reply:
        roll = self.rng.random()
        if roll < self.fail_rate:
            return self.rng.choice([Reply.error(500), Reply.error(503), Reply.error(429, retry_after=2)])
        roll -= self.fail_rate
        if roll < self.slow_rate:
            return Reply.slow(self.slow_seconds)
        roll -= self.slow_rate
        if roll < self.pending_rate:
            return Reply.pending(polls=self.rng.randint(1, 3), retry_after=1)
        roll -= self.pending_rate
        if roll < self.trickle_rate:
            return Reply.trickling(self.slow_seconds / 100)  # an echo is about 100 bytes
        roll -= self.trickle_rate
        if roll < self.huge_id_rate:
            return Reply.ok("huge ids", thread_id="t" * 600, id="r" * 5000)
        return Reply()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake HTTP agent for Routines tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (see the ready line)")
    parser.add_argument("--token")
    parser.add_argument("--signing-secret")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of 500 / 503 / 429 answers")
    parser.add_argument("--slow-rate", type=float, default=0.0, help="share of answers after --slow-seconds")
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--pending-rate", type=float, default=0.0, help="share of 202 + polling runs")
    parser.add_argument(
        "--trickle-rate", type=float, default=0.0, help="share of answers sent a byte at a time"
    )
    parser.add_argument("--huge-id-rate", type=float, default=0.0, help="share of answers with huge ids")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log", help="append every answered request to this file as a JSON line")
    args = parser.parse_args(argv)

    chaos = Chaos(
        args.fail_rate,
        args.slow_rate,
        args.pending_rate,
        args.slow_seconds,
        random.Random(args.seed),
        args.trickle_rate,
        args.huge_id_rate,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.log, "a", encoding="utf-8")) if args.log else None
        agent = stack.enter_context(
            FakeAgent(
                token=args.token,
                signing_secret=args.signing_secret,
                default=chaos,
                host=args.host,
                port=args.port,
                log=log,
            )
        )
        print(f"fake agent ready on {agent.url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
