"""Soak: Routines under faults for minutes, then docs/guarantees.md checked from the records.

``.venv/bin/python bench/soak.py [--minutes 10] [--routines 50] [--seed 1] [--keep]``

It starts, all on 127.0.0.1: Azurite with persistent data (a temporary folder), the fake agent as a
process (``tests/fake_agent.py``: random 500 / 503 / 429 + Retry-After, replies slower than the
routines' ``timeout_seconds``, 202-pending runs), and two devhost processes on the same storage and
queue: ``a`` runs the timers (the only tick source, like the Functions host's singleton timer) and
dispatches, ``b`` only dispatches. It creates ``--routines`` routines firing every 3 to 6 seconds
(6-field crons, ``ROUTINES_MIN_INTERVAL_SECONDS=1``) with short retries (4 attempts, 1-3 s apart, or
exponential), ``timeout_seconds`` 3 and a mix of overlap policies. Then, during the chaos phase:

* SIGKILLs worker ``b`` and starts it again (a new incarnation each time);
* restarts Azurite (same ports, same data), away from the minute tick;
* injects duplicate queue messages: copies of visible messages (peeked), copies of messages it takes
  for two seconds (so the original is redelivered too), and fire messages built like the scheduler's
  for fires already enqueued, to arrive together with the originals or after their run;
* injects unreadable messages (not JSON; not base64), which must go to the poison queue;
* fails storage requests at the workers' SDK transport (``bench/storage_faults.py``): 1% refused, 1%
  applied with the answer lost, and every request refused 3 s of every 40 s;
* edits routines through the API while they fire (``churn``): creates one-shot timers 2-8 s ahead and
  second-level crons, PATCHes a cron to another, disables and enables again, deletes, and dispatches
  by hand. Each change is recorded with the server's ``updated_at``, so the checker knows which
  schedule held when;
* the agent also trickles some answers a byte at a time (past the timeout) and returns ids far too
  long to store on others (the attempt fails with a clear error; nothing breaks).

A calm phase follows (no faults: what a killed worker held comes back and finishes), then every routine
is disabled through the API, in-flight work drains (until no run is open and every enqueued fire
reached a worker, bounded), and it checks:

* every fire of each routine's history (the schedule in force from each create, PATCH, enable to the
  next PATCH, disable or delete) is exactly one run, allowing the documented exceptions: fires that
  reached a worker only after the schedule that made them ended (docs/guarantees.md #4: the worker logged
  dropping them as stale, or as of a deleted routine, after the change), fires coalesced by a tick that
  found them past (only in a window no successful tick planned ahead), fires recorded ``missed``, and
  fires of the schedule an edit (PATCH, enable, disable, DELETE) replaced that were due while the edit
  was in flight: the server stamps an edit before its write lands, and the client cannot know when it
  landed, so such a fire may run or not; every timer ran once at its ``at`` and ended ``completed``;
* every run is terminal; no scheduled run at a time no schedule held; every manual dispatch has its
  run; no dispatch message in the poison queue;
* at most one agent start per (idempotency key, attempt). Each worker incarnation calls the agent under
  its own path prefix (``/a``, ``/b1``, ``/b2``...), so the agent's call log says who started what. A
  second start of an attempt is a *takeover after kill*, not a violation, only when every earlier start
  came from an incarnation that was SIGKILLed, was still unanswered or answered less than
  ``RECORD_WINDOW`` seconds before that kill (the worker died before it could record the outcome: the
  at-least-once boundary of the README's design notes), and the takeover came from another incarnation
  at least a lease later (``timeout_seconds`` + 30 s, less ``LEASE_SLACK``). Anything else is a
  duplicate start.

It prints a table and exits 1 on any violation. One knob differs from the Functions host: a message a
worker takes stays invisible ``PROCESSING_VISIBILITY`` seconds (the devhost's default is the host's ten
minutes, renewed while processing), so what a killed worker held comes back within the run.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from azure.core.exceptions import AzureError  # noqa: E402
from azure.data.tables import TableServiceClient  # noqa: E402
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy  # noqa: E402

from routines import schedule, scheduler  # noqa: E402
from routines.azurite import Azurite, free_ports  # noqa: E402
from routines.messages import DispatchMessage  # noqa: E402
from routines.models import Run, RunStatus  # noqa: E402
from routines.store.tables import TableStore  # noqa: E402

PROCESSING_VISIBILITY = 20  # seconds a taken message stays invisible in the soak's devhosts
TIMEOUT_SECONDS = 3
LEASE = 45  # the dispatcher's attempt lease (decide.LEASE)
LEASE_SLACK = 3.0  # the claim precedes the agent call by a storage write or two
RECORD_WINDOW = 10.0  # an answer this close before a kill may not have been recorded yet
CALM_SECONDS = 50  # no faults before the disable: what a killed worker held comes back and finishes
# At most this long, after the disable, for open runs to finish and for every fire already enqueued
# (up to the next minute tick's horizon, ~70 s ahead) to reach a worker and be dropped as stale.
DRAIN_SECONDS = 240
CRONS = ("*/3 * * * * *", "*/4 * * * * *", "*/5 * * * * *", "*/6 * * * * *")
OVERLAPS = ("skip", "buffer_one", "allow_all")
RETRIES = (
    {"max_attempts": 4, "delays_seconds": [1, 2, 3]},
    {"max_attempts": 3, "backoff": "exponential", "initial_delay_seconds": 1, "max_delay_seconds": 4},
)
OPEN = (RunStatus.queued, RunStatus.running, RunStatus.retrying)
TICK_LINE = re.compile(r"tick: \d+ due, \d+ fires enqueued")
STALE_LINE = re.compile(
    r"dropping (?:stale )?fire (\d{4}-\d\d-\d\d[ T][\d:.]+(?:Z|[+-]\d\d:\d\d)?) "
    r"of (?:deleted )?routine (rt_\w+)"
)
CHURN_CRONS = ("*/2 * * * * *", "*/7 * * * * *", "1,4,9 * * * * *")
ASCTIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) ")


def say(text: str) -> None:
    print(text, flush=True)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- processes ------------------------------------------------------------------------------------


class Process:
    """A child process whose output goes to a file; ``wait_ready`` waits for a line in it."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, marker: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if marker in line:
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not ready; its output:\n{self.log.read_text(errors='replace')[-3000:]}"
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 40.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


# A devhost whose queue poller keeps a taken message invisible PROCESSING_VISIBILITY seconds.
_DEVHOST = (
    "import os, sys, routines.devhost as devhost, routines.devhost.queues as queues; "
    "queues.PROCESSING_VISIBILITY_SECONDS = int(sys.argv.pop(1)); "
    "seed = os.environ.get('SOAK_STORAGE_FAULTS'); "
    "seed and __import__('bench.storage_faults', fromlist=['install']).install(int(seed)); "
    "sys.exit(devhost.main(sys.argv[1:]))"
)


class Api:
    """The management API of one devhost, with retries for the moments storage is being restarted."""

    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body: Any = None, attempts: int = 20) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(attempts):
            request = urllib.request.Request(
                self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    raw = response.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == attempts - 1:
                    raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None
            except OSError:
                if attempt == attempts - 1:
                    raise
            time.sleep(1.0)
        raise AssertionError("unreachable")


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Kill:
    incarnation: str
    at: float


@dataclass
class Soak:
    minutes: float
    routines: int
    seed: int
    workdir: Path
    keep: bool = False
    rng: random.Random = field(init=False)
    events: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    azurite_restarts: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)  # routine id -> created routine
    disabled_at: dict[str, datetime] = field(default_factory=dict)
    # routine id -> [(server time, trigger in force from then or None, what)], in order
    history: dict[str, list[tuple[datetime, dict[str, Any] | None, str]]] = field(default_factory=dict)
    # routine id -> [(sent, answered, the trigger in force before)]: edits in flight. The server's
    # instant of an edit (``updated_at``) is taken before its write lands, so a fire of the old
    # schedule due while the request was in flight may run or not: whichever landed first won.
    fuzzy: dict[str, list[tuple[datetime, datetime, dict[str, Any] | None]]] = field(default_factory=dict)
    dispatched: dict[str, str] = field(default_factory=dict)  # manual run id -> routine id
    churned: Counter[str] = field(default_factory=Counter)
    drained: bool = False
    drain_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.prefix = "soak" + uuid.uuid4().hex[:10]
        self.queue_name = "soak-" + uuid.uuid4().hex[:12]
        self.calls_log = self.workdir / "agent-calls.jsonl"
        self.workers: dict[str, Process] = {}
        self.worker_seq = 0
        self._lock = threading.Lock()

    # -- setup -----------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.t0:6.1f}s"
        self.events.append(f"{stamp} {text}")
        say(f"  [{stamp}] {text}")

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.azurite = Azurite(self.workdir / "azurite").start()
        self._connect()
        self._start_agent()
        self._start_workers()

    def _connect(self) -> None:
        self.connection = self.azurite.connection_string
        self.store = TableStore(TableServiceClient.from_connection_string(self.connection), self.prefix)
        self.queue = QueueClient.from_connection_string(
            self.connection,
            self.queue_name,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )
        self.raw_queue = QueueClient.from_connection_string(self.connection, self.queue_name)
        # No decode policy: the host moves an undecodable message to poison as it came.
        self.poison = QueueClient.from_connection_string(self.connection, f"{self.queue_name}-poison")

    def _start_agent(self) -> None:
        env = self._env()
        env.pop("ROUTINES_AGENT_ENDPOINT", None)
        self.agent = Process(
            "agent",
            [
                sys.executable,
                str(ROOT / "tests" / "fake_agent.py"),
                *("--port", "0", "--seed", str(self.seed), "--log", str(self.calls_log)),
                *("--fail-rate", "0.15", "--slow-rate", "0.04", "--slow-seconds", "5"),
                *("--pending-rate", "0.2", "--trickle-rate", "0.02", "--huge-id-rate", "0.01"),
            ],
            self.workdir / "agent.log",
            env,
        )
        self.agent_url = self.agent.wait_ready("fake agent ready on").rsplit(" ", 1)[-1].strip()

    def _start_workers(self) -> None:
        self.api = Api(self._start_worker("a", timers=True) + "/api")
        self._start_worker("b1", timers=False)
        self.log(f"Azurite on {self.azurite.queue_port}, agent {self.agent_url}, workers a (timers) and b1")

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ROUTINES_", "APPLICATIONINSIGHTS_", "OTEL_", "AzureWebJobs"))
        }
        env.update(
            {
                "AzureWebJobsStorage": self.connection,
                "ROUTINES_TABLE_PREFIX": self.prefix,
                "ROUTINES_QUEUE_NAME": self.queue_name,
                "ROUTINES_AGENT_BACKEND": "http",
                "ROUTINES_MIN_INTERVAL_SECONDS": "1",
                "PYTHONUNBUFFERED": "1",
                "TZ": "UTC",
            }
        )
        return env

    def _start_worker(self, incarnation: str, *, timers: bool) -> str:
        port = free_ports(1)[0]
        env = {
            **self._env(),
            "ROUTINES_AGENT_ENDPOINT": f"{self.agent_url}/{incarnation}",
            "SOAK_STORAGE_FAULTS": str(self.seed * 1000 + len(self.workers)),
            "SOAK_FAULTS_OFF_FILE": str(self.workdir / "faults-off"),
        }
        command = [sys.executable, "-c", _DEVHOST, str(PROCESSING_VISIBILITY), "--port", str(port)]
        if not timers:
            command.append("--no-timers")
        process = Process(incarnation, command, self.workdir / f"devhost-{incarnation}.log", env)
        process.wait_ready("devhost ready on")
        self.workers[incarnation] = process
        return f"http://127.0.0.1:{port}"

    def create_routines(self) -> None:
        for index in range(self.routines):
            actions: list[dict[str, Any]] = [
                {"type": "invocation", "agent_id": "echo", "input": {"n": index}},
            ]
            if index % 5 == 4:  # a second action: its own idempotency key, <key>/1
                actions.append({"type": "response", "agent_id": "echo", "input": "and then"})
            body = {
                "name": f"soak-{index:03d}",
                "trigger": {"type": "schedule", "cron_expression": CRONS[index % len(CRONS)]},
                "actions": actions,
                "retry_policy": RETRIES[index % len(RETRIES)],
                "overlap_policy": OVERLAPS[index % len(OVERLAPS)],
                "timeout_seconds": TIMEOUT_SECONDS,
            }
            self._created(self._create(body))
        self.log(f"created {self.routines} routines")

    def _created(self, routine: dict[str, Any]) -> None:
        self.created[routine["id"]] = routine
        self.history[routine["id"]] = [(utc(routine["created_at"]), routine["trigger"], "create")]

    def _changed(self, routine: dict[str, Any], what: str, sent: datetime) -> None:
        self._in_flight(routine["id"], sent)
        trigger = routine["trigger"] if routine["state"] == "enabled" else None
        self.history[routine["id"]].append((utc(routine["updated_at"]), trigger, what))
        self.churned[what] += 1

    def _in_flight(self, routine_id: str, sent: datetime) -> None:
        """An edit of ``routine_id`` sent at ``sent`` has just been answered."""
        before = self.history[routine_id][-1][1]
        self.fuzzy.setdefault(routine_id, []).append((sent, datetime.now(UTC), before))

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(self.api.call("POST", "/routines", body))
        except RuntimeError as exc:
            if ": 409 " not in str(exc):
                raise
            # Names are unique to this soak: an earlier try landed, its answer was lost (a 503 is
            # "outcome unknown" for a POST), and the retry found the name taken. Take that one.
            return self._by_name(str(body["name"]))

    def _live(self) -> list[str]:
        """Cron routines not deleted (enabled or disabled): what churn edits and the end disables."""
        return sorted(
            rid
            for rid, changes in self.history.items()
            if changes[-1][2] != "delete" and self.created[rid]["trigger"]["type"] == "schedule"
        )

    def churn(self) -> None:
        """One API edit while routines fire; what it changed goes into ``history``."""
        action = self.rng.choice(["timer", "cron", "patch", "toggle", "toggle", "delete", "dispatch"])
        name = f"churn-{action}-{uuid.uuid4().hex[:8]}"
        actions = [{"type": "invocation", "agent_id": "echo", "input": {"churn": action}}]
        common = {"actions": actions, "timeout_seconds": TIMEOUT_SECONDS, "retry_policy": RETRIES[0]}
        try:
            if action == "timer":
                at = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(2, 8))
                trigger = {"type": "timer", "at": at.isoformat(timespec="milliseconds")}
                self._created(self._create({"name": name, "trigger": trigger, **common}))
                self.churned["timer created"] += 1
            elif action == "cron":
                trigger = {"type": "schedule", "cron_expression": self.rng.choice(CHURN_CRONS)}
                body = {"name": name, "trigger": trigger, "overlap_policy": self.rng.choice(OVERLAPS)}
                self._created(self._create({**body, **common}))
                self.churned["cron created"] += 1
            else:
                rid = self.rng.choice(self._live())
                sent = datetime.now(UTC)
                if action == "patch":
                    trigger = {"type": "schedule", "cron_expression": self.rng.choice(CHURN_CRONS + CRONS)}
                    routine = self.api.call("PATCH", f"/routines/{rid}", {"trigger": trigger})
                    self._changed(routine, "patch", sent)
                elif action == "toggle":
                    enabled = self.history[rid][-1][1] is not None
                    verb = "disable" if enabled else "enable"
                    self._changed(self.api.call("POST", f"/routines/{rid}/{verb}"), verb, sent)
                elif action == "delete":
                    self.api.call("DELETE", f"/routines/{rid}")
                    self._in_flight(rid, sent)
                    self.history[rid].append((sent, None, "delete"))
                    self.churned["delete"] += 1
                elif self.history[rid][-1][1] is not None:  # dispatch, on an enabled routine
                    run = self.api.call("POST", f"/routines/{rid}/dispatch", {})
                    self.dispatched[run["id"]] = rid
                    self.churned["dispatch"] += 1
        except (RuntimeError, OSError) as exc:  # storage restarting: this edit did not happen
            self.log(f"churn {action} skipped: {str(exc)[:120]}")

    # -- faults ----------------------------------------------------------------------------------
    def _by_name(self, name: str) -> dict[str, Any]:
        continuation = ""
        while True:
            page = self.api.call("GET", f"/routines?limit=200{continuation}")
            for routine in page["items"]:
                if routine["name"] == name:
                    return dict(routine)
            if not page["continuation"]:
                raise RuntimeError(f"routine {name} answered 409 on create but is not listed")
            continuation = f"&continuation={page['continuation']}"

    def kill_worker(self) -> None:
        victim = next(name for name in reversed(self.workers) if name.startswith("b"))
        process = self.workers.pop(victim)
        process.kill()
        with self._lock:
            self.kills.append(Kill(victim, time.time()))
        self.log(f"SIGKILLed worker {victim}")
        time.sleep(self.rng.uniform(1.0, 4.0))
        self.worker_seq = int(victim[1:]) + 1
        self._start_worker(f"b{self.worker_seq}", timers=False)
        self.log(f"started worker b{self.worker_seq}")

    def restart_azurite(self) -> None:
        started = time.monotonic()
        self.azurite.restart()
        self.azurite_restarts += 1
        self.log(f"restarted Azurite ({time.monotonic() - started:.1f} s down)")

    def inject(self) -> None:
        """One round of duplicates: copies of visible messages, of a taken one, and synthetic fires."""
        try:
            for message in list(self.queue.peek_messages(max_messages=32))[:3]:
                self.queue.send_message(message.content)
                self.injected["copy of a visible message"] += 1
            for message in self.queue.receive_messages(max_messages=1, visibility_timeout=2):
                self.queue.send_message(message.content)  # the original comes back in 2 s
                self.injected["copy of a taken message (+ its redelivery)"] += 1
            now = datetime.now(UTC)
            crons = sorted(rid for rid, r in self.created.items() if r["trigger"]["type"] == "schedule")
            for routine_id in self.rng.sample(crons, 3):  # churn creates timers too: they have no cron
                routine = self.created[routine_id]
                cron = schedule.parse_cron(routine["trigger"]["cron_expression"])
                upcoming = cron.next_after(now + timedelta(seconds=1))
                self._send_fire(routine, upcoming, (upcoming - now).total_seconds())
                self.injected["fire duplicate, due with the original"] += 1
                past = now - timedelta(seconds=self.rng.uniform(3, 15))
                recent = cron.next_after(past)
                if recent < now and recent >= utc(routine["created_at"]):
                    self._send_fire(routine, recent, 0)
                    self.injected["fire duplicate, after its run"] += 1
        except AzureError as exc:  # Azurite restarting: skip this round
            self.log(f"injection round skipped: {type(exc).__name__}")

    def _send_fire(self, routine: dict[str, Any], when: datetime, delay: float) -> None:
        message = scheduler.fire_message(routine["id"], when, 1, "schedule", routine["name"])
        self.queue.send_message(message.encode(), visibility_timeout=max(0, int(delay)) or None)

    def inject_poison(self) -> None:
        try:
            self.queue.send_message("not a dispatch message {")
            self.raw_queue.send_message("%%% not base64 %%%")
            self.injected["unreadable message"] += 2
        except AzureError as exc:
            self.log(f"poison injection skipped: {type(exc).__name__}")

    def chaos(self, until: float) -> None:
        """Kills, Azurite restarts, duplicates and unreadable messages until ``until`` (monotonic)."""
        start = time.monotonic()
        window = until - start
        count = max(1, round(window / 150))
        kills = [start + window * (i + 0.2) / count for i in range(count)]
        restarts = [self._off_the_minute(start + window * (i + 0.65) / count, until) for i in range(count)]
        next_poison = time.monotonic() + 5
        while time.monotonic() < until:
            now = time.monotonic()
            if kills and now >= kills[0]:
                kills.pop(0)
                self.kill_worker()
            elif restarts and now >= restarts[0]:
                restarts.pop(0)
                self.restart_azurite()
            else:
                self.inject()
                self.churn()
                self.churn()
                if now >= next_poison:
                    self.inject_poison()
                    next_poison = now + 60
                time.sleep(self.rng.uniform(2.0, 5.0))

    @staticmethod
    def _off_the_minute(target: float, latest: float) -> float:
        """The monotonic time nearest ``target`` (and before ``latest``) when the wall clock is 15-35 s
        into a minute: an Azurite restart then never overlaps the minute tick."""
        offset = time.time() - time.monotonic()
        for shift in sorted(range(-25, 45), key=abs):
            moment = target + shift
            if 15 <= (moment + offset) % 60 <= 35 and time.monotonic() < moment < latest - 5:
                return moment
        return target

    # -- the end ---------------------------------------------------------------------------------
    def disable_all(self) -> None:
        for routine_id in self._live():
            sent = datetime.now(UTC)
            disabled = self.api.call("POST", f"/routines/{routine_id}/disable")
            self._in_flight(routine_id, sent)
            self.disabled_at[routine_id] = utc(disabled["updated_at"])
            self.history[routine_id].append((self.disabled_at[routine_id], None, "disable"))
        self.log("disabled every routine; edits while firing: " + json.dumps(dict(self.churned)))

    def open_runs(self) -> int:
        count = 0
        for routine_id in self.created:
            for status in OPEN:
                count += len(self.store.list_runs(routine_id, status, 200, None).items)
        return count

    def watched_fires(self) -> int:
        """Fires enqueued (or due to be re-sent by the repair pass) whose message has not been handled
        yet: after the disable each still ends, dropped as stale, but only once it reaches a worker."""
        everything = datetime.max.replace(tzinfo=UTC)
        return sum(1 for w in self.store.watched(everything, 5000) if w.routine_id in self.created)

    def drain(self) -> None:
        started = time.monotonic()
        deadline = started + DRAIN_SECONDS
        while time.monotonic() < deadline:
            try:
                remaining = self.open_runs() + self.watched_fires()
            except AzureError:
                remaining = -1
            if remaining == 0:
                self.drained = True
                break
            time.sleep(3)
        self.drain_seconds = time.monotonic() - started
        self.log(
            f"drain: {'nothing open' if self.drained else 'open runs or fires remain'} "
            f"after {self.drain_seconds:.0f} s"
        )
        time.sleep(2 * TIMEOUT_SECONDS)  # slow agent replies still being written to the call log

    def stop(self) -> None:
        for process in self.workers.values():
            process.stop()
        if hasattr(self, "agent"):
            self.agent.stop(10)
        if hasattr(self, "azurite"):
            self.azurite.stop()

    def save(self) -> None:
        """What ``recheck`` needs besides the Azurite data and the logs, in ``soak.json``."""
        state = {
            "minutes": self.minutes,
            "routines": self.routines,
            "seed": self.seed,
            "prefix": self.prefix,
            "queue_name": self.queue_name,
            "created": self.created,
            "disabled_at": {k: v.isoformat() for k, v in self.disabled_at.items()},
            "history": {
                k: [(t.isoformat(), trigger, what) for t, trigger, what in v] for k, v in self.history.items()
            },
            "fuzzy": {
                k: [(a.isoformat(), b.isoformat(), trigger) for a, b, trigger in v]
                for k, v in self.fuzzy.items()
            },
            "dispatched": self.dispatched,
            "churned": dict(self.churned),
            "kills": [[k.incarnation, k.at] for k in self.kills],
            "azurite_restarts": self.azurite_restarts,
            "injected": dict(self.injected),
            "drained": self.drained,
            "drain_seconds": self.drain_seconds,
            "events": self.events,
        }
        (self.workdir / "soak.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, workdir: Path) -> Soak:
        """A finished soak kept with ``--keep``, its Azurite started again on its data."""
        state = json.loads((workdir / "soak.json").read_text())
        soak = cls(state["minutes"], state["routines"], state["seed"], workdir, keep=True)
        soak.prefix, soak.queue_name = state["prefix"], state["queue_name"]
        soak.created = state["created"]
        soak.disabled_at = {k: utc(v) for k, v in state["disabled_at"].items()}
        soak.history = {
            k: [(utc(t), trigger, what) for t, trigger, what in v] for k, v in state["history"].items()
        }
        soak.fuzzy = {
            k: [(utc(a), utc(b), trigger) for a, b, trigger in v] for k, v in state["fuzzy"].items()
        }
        soak.dispatched = state["dispatched"]
        soak.churned = Counter(state["churned"])
        soak.kills = [Kill(name, at) for name, at in state["kills"]]
        soak.azurite_restarts = state["azurite_restarts"]
        soak.injected = Counter(state["injected"])
        soak.drained, soak.drain_seconds = state["drained"], state["drain_seconds"]
        soak.events = state["events"]
        soak.azurite = Azurite(workdir / "azurite").start()
        soak._connect()
        return soak

    def routine_state(self, routine_id: str) -> str:
        try:
            return self.store.get_routine(routine_id)[0].state.value
        except Exception as exc:  # reported as the state
            return type(exc).__name__

    def all_runs(self) -> dict[str, list[Run]]:
        runs: dict[str, list[Run]] = {}
        for routine_id in self.created:
            items: list[Run] = []
            continuation = None
            while True:
                page = self.store.list_runs(routine_id, None, 200, continuation)
                items.extend(page.items)
                continuation = page.continuation
                if not continuation:
                    break
            runs[routine_id] = items
        return runs

    def poisoned(self) -> tuple[int, list[str]]:
        """How many messages the poison queue holds, and the text of the first 32 (peeked)."""
        count = self.poison.get_queue_properties().approximate_message_count or 0
        texts = []
        for message in self.poison.peek_messages(max_messages=32):
            try:
                texts.append(base64.b64decode(str(message.content), validate=True).decode())
            except ValueError:
                texts.append(str(message.content))
        return count, texts


# --- the checks -----------------------------------------------------------------------------------


def _line_time(line: str) -> datetime | None:
    """When a devhost log line (text, TZ=UTC, or JSON) was written."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError, KeyError):
            return utc(json.loads(line)["time"])
        return None
    match = ASCTIME.match(line)
    if not match:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return stamp + timedelta(milliseconds=int(match.group(2)))


FAULTS_LINE = re.compile(r"storage faults injected so far: (\{.*\})")


def storage_faults(workdir: Path) -> str:
    """The last count each worker logged of the faults ``bench/storage_faults.py`` injected."""
    total: Counter[str] = Counter()
    for log in sorted(workdir.glob("devhost-*.log")):
        found = FAULTS_LINE.findall(log.read_text(errors="replace"))
        if found:
            total.update(ast.literal_eval(found[-1]))
    return ", ".join(f"{n} {kind}" for kind, n in sorted(total.items())) or "none logged"


def successful_ticks(log: Path) -> list[datetime]:
    """When the timer host finished a tick, from its log."""
    lines = log.read_text(errors="replace").splitlines()
    return [t for line in lines if TICK_LINE.search(line) and (t := _line_time(line))]


def stale_drops(logs: list[Path]) -> dict[tuple[str, datetime], datetime]:
    """(routine id, fire) -> when a worker dropped that fire as stale (docs/guarantees.md #4), from logs."""
    drops: dict[tuple[str, datetime], datetime] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            match = STALE_LINE.search(line)
            when = _line_time(line) if match else None
            if match and when:
                key = (match.group(2), utc(match.group(1).replace(" ", "T")))
                drops[key] = min(when, drops.get(key, when))
    return drops


def fires_between(trigger: dict[str, Any] | None, start: datetime, end: datetime) -> list[datetime]:
    """The fires of ``trigger`` (a cron or a timer; None: disabled) in ``[start, end)``."""
    if trigger is None:
        return []
    if trigger["type"] == "timer":
        at = utc(trigger["at"]).replace(microsecond=0)
        return [at] if start <= at < end else []
    cron = schedule.parse_cron(trigger["cron_expression"])
    found = []
    cursor = cron.next_after(start - timedelta(microseconds=1))
    while cursor < end:
        found.append(cursor)
        cursor = cron.next_after(cursor)
    return found


def in_flight_fires(edits: list[tuple[datetime, datetime, dict[str, Any] | None]]) -> set[datetime]:
    """The fires of the schedule an edit replaced, due while the edit was in flight (from sent to
    answered): each ran or not depending on whether its worker read the routine before the write
    landed (docs/guarantees.md #4)."""
    return {
        fire
        for sent, answered, before in edits
        for fire in fires_between(before, sent, answered + timedelta(microseconds=1))
    }


def planned_ahead(fire: datetime, since: datetime, ticks: list[datetime]) -> bool:
    """Whether ``fire`` was enqueued ahead of time by the API call that set its schedule (at
    ``since``) or by a successful tick (so it cannot have been coalesced with others)."""
    if fire < scheduler.horizon(since + scheduler.LOOKAHEAD_MARGIN):
        return True
    return any(tick <= fire < scheduler.horizon(tick) for tick in ticks)


def missed_span(run: Run) -> tuple[datetime, datetime] | None:
    match = re.search(r"between (\S+) and (\S+):", run.error_message or "")
    return (utc(match.group(1)), utc(match.group(2))) if match else None


@dataclass
class Report:
    rows: list[tuple[str, Any]]
    violations: list[str]
    details: list[str]


def check(soak: Soak) -> Report:
    runs = soak.all_runs()
    ticks = successful_ticks(soak.workdir / "devhost-a.log")
    drops = stale_drops(sorted(soak.workdir.glob("devhost-*.log")))
    calls = [json.loads(line) for line in soak.calls_log.read_text().splitlines() if line.strip()]
    by_status: Counter[str] = Counter()
    expected = lost = dropped = coalesced = missed = unexpected = duplicate_runs = stuck = 0
    details: list[str] = []
    scheduled: dict[str, datetime] = {}  # idempotency key -> scheduled time, for the lag figures
    never = datetime.max.replace(tzinfo=UTC)
    timers_wrong = manual_missing = ambiguous = raced = 0
    for routine_id, changes in soak.history.items():
        in_flight = in_flight_fires(soak.fuzzy.get(routine_id, []))
        # Fire -> (the schedule's start, its end): what was due while each schedule held.
        fires: dict[datetime, tuple[datetime, datetime]] = {}
        for (start, trigger, _), following in zip(changes, [*changes[1:], None], strict=True):
            end = following[0] if following else never
            for fire in fires_between(trigger, start, end):
                fires[fire] = (start, end)
        expected += len(fires)
        by_time: dict[datetime, list[Run]] = defaultdict(list)
        for run in runs[routine_id]:
            if run.trigger.value == "manual":
                continue
            by_time[run.scheduled_for].append(run)
            scheduled[run.idempotency_key] = run.scheduled_for
        spans = [s for r in runs[routine_id] if r.status is RunStatus.missed and (s := missed_span(r))]
        for when, found in by_time.items():
            if len(found) > 1:
                duplicate_runs += 1
                details.append(f"duplicate runs {routine_id} {when}: {[r.id for r in found]}")
            if when not in fires and when in in_flight:
                raced += 1
            elif when not in fires:
                unexpected += len(found)
                details.append(f"run at a time no schedule held {routine_id} {when}: {found[0].status.value}")
        for fire, (start, end) in sorted(fires.items()):
            if fire in by_time:
                continue
            dropped_at = drops.get((routine_id, fire))
            if any(first <= fire < last for first, last in spans):
                missed += 1
            elif dropped_at is not None and end != never and dropped_at >= end - timedelta(seconds=1):
                dropped += 1  # reached a worker after its schedule ended: not run (docs/guarantees.md #4)
            elif fire in in_flight:
                ambiguous += 1
            elif not planned_ahead(fire, start, ticks):
                coalesced += 1
            else:
                lost += 1
                details.append(f"lost fire {routine_id} {fire.isoformat()}")
        trigger = changes[0][1]
        if trigger and trigger["type"] == "timer":
            state = soak.routine_state(routine_id)
            if state != "completed" or len(by_time) != 1:
                timers_wrong += 1
                details.append(f"timer {routine_id}: {state}, {len(by_time)} runs")
    for run_id, routine_id in soak.dispatched.items():
        found = [r for r in runs[routine_id] if r.id == run_id]
        if not found:
            manual_missing += 1
            details.append(f"manual run {run_id} of {routine_id} not found")
    for routine_runs in runs.values():
        for run in routine_runs:
            by_status[run.status.value] += 1
            if not run.status.terminal:
                stuck += 1
                details.append(
                    f"stuck run {run.id} of {run.routine_id} ({run.status.value}, {run.scheduled_for})"
                )

    starts = [c for c in calls if c["kind"] == "start"]
    duplicates, takeovers = classify_starts(starts, soak.kills, details)
    lags = sorted(
        c["t"] - scheduled[c["idempotency_key"]].timestamp()
        for c in starts
        if c.get("attempt") == 1 and c.get("idempotency_key") in scheduled
    )
    poison_count, poisoned = soak.poisoned()
    poisoned_dispatch = 0
    for text in poisoned:
        with contextlib.suppress(ValueError):
            DispatchMessage.decode(text)
            poisoned_dispatch += 1
            details.append(f"dispatch message in the poison queue: {text[:200]}")

    kinds = Counter(c["kind"] for c in calls)
    statuses = Counter(str(c["status"]) for c in starts)
    violations = [
        f"{name}: {value}"
        for name, value in (
            ("lost fires", lost),
            ("stuck runs", stuck),
            ("duplicate starts", duplicates),
            ("duplicate runs", duplicate_runs),
            ("runs at a time no schedule held", unexpected),
            ("timers not run once and completed", timers_wrong),
            ("manual dispatches without their run", manual_missing),
            ("dispatch messages in the poison queue", poisoned_dispatch),
        )
        if value
    ]
    if not soak.drained:
        violations.append("open runs or unhandled fires after the drain deadline")

    def pct(q: float) -> str:
        return f"{lags[min(len(lags) - 1, int(q * len(lags)))]:.2f}" if lags else "-"

    rows: list[tuple[str, Any]] = [
        ("duration (fires window)", f"{soak.minutes:g} min, {soak.routines} routines, 2 workers"),
        ("faults", f"{len(soak.kills)} worker SIGKILLs, {soak.azurite_restarts} Azurite restarts"),
        ("storage faults injected at the SDK transport", storage_faults(soak.workdir)),
        ("messages injected", ", ".join(f"{n} {k}" for k, n in sorted(soak.injected.items())) or "none"),
        ("API edits while firing", ", ".join(f"{n} {k}" for k, n in sorted(soak.churned.items())) or "none"),
        ("fires expected", expected),
        ("runs", sum(by_status.values())),
        *((f"  {status}", by_status[status]) for status in sorted(by_status)),
        ("fires dropped after their schedule ended (docs/guarantees.md #4)", dropped),
        (
            "fires of a replaced schedule due while its edit was in flight: run / not run",
            f"{raced} / {ambiguous}",
        ),
        ("fires coalesced (tick found them past)", coalesced),
        ("fires recorded missed", missed),
        ("agent calls", f"{len(calls)}: " + ", ".join(f"{n} {k}s" for k, n in sorted(kinds.items()))),
        ("agent start answers", ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items()))),
        ("dispatch lag, first start (p50 / p99 / max s)", f"{pct(0.5)} / {pct(0.99)} / {pct(1.0)}"),
        (
            "poison queue",
            f"{poison_count} messages, {len(poisoned)} read: {poisoned_dispatch} dispatch messages",
        ),
        ("takeovers after kill", takeovers),
        ("duplicate starts", duplicates),
        ("lost fires", lost),
        ("stuck runs", stuck),
        ("duplicate runs / runs at a time no schedule held", f"{duplicate_runs} / {unexpected}"),
        ("timers wrong / manual runs missing", f"{timers_wrong} / {manual_missing}"),
        ("drain after disable", f"{soak.drain_seconds:.0f} s"),
    ]
    return Report(rows, violations, details)


def classify_starts(starts: list[dict[str, Any]], kills: list[Kill], details: list[str]) -> tuple[int, int]:
    """(duplicate starts, takeovers after kill) among agent starts grouped by (key, attempt)."""
    killed_at = {kill.incarnation: kill.at for kill in kills}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for call in starts:
        groups[(call["idempotency_key"], call["attempt"])].append(call)
    duplicates = takeovers = 0
    for key, group in groups.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda c: c["t"])
        last = group[-1]
        earlier_ok = True
        for call in group[:-1]:
            who = incarnation(call["path"])
            died = killed_at.get(who)
            answered = call["t"] + (call.get("delay") or 0.0)
            earlier_ok = earlier_ok and (
                died is not None
                and call["t"] <= died
                and answered >= died - RECORD_WINDOW
                and incarnation(last["path"]) != who
                and last["t"] >= call["t"] + LEASE - LEASE_SLACK
            )
        if earlier_ok:
            takeovers += len(group) - 1
        else:
            duplicates += len(group) - 1
            shown = [(incarnation(c["path"]), round(c["t"], 2), c["status"]) for c in group]
            details.append(f"duplicate start of {key}: {shown}")
    return duplicates, takeovers


def incarnation(path: str) -> str:
    return path.split("/", 2)[1] if path.count("/") >= 2 else "?"


def table(report: Report) -> str:
    width = max(len(name) for name, _ in report.rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in report.rows]
    verdict = "OK: no violation" if not report.violations else "VIOLATIONS: " + "; ".join(report.violations)
    return "\n".join([*lines, f"  {verdict}"])


# --- entry points ---------------------------------------------------------------------------------


def run(
    minutes: float = 10.0,
    routines: int = 50,
    seed: int = 1,
    workdir: Path | None = None,
    keep: bool = False,
) -> Report:
    """Run the whole soak and return its report (``report.violations`` empty when all guarantees held)."""
    scratch = Path(tempfile.mkdtemp(prefix="routines-soak-")) if workdir is None else workdir
    scratch.mkdir(parents=True, exist_ok=True)
    soak = Soak(minutes, routines, seed, scratch, keep)
    report = None
    try:
        soak.start()
        soak.create_routines()
        fires_end = soak.t0 + 10 + minutes * 60  # about minutes of fires after the routines exist
        calm_from = max(time.monotonic() + 20, fires_end - CALM_SECONDS)
        soak.chaos(until=calm_from)
        (soak.workdir / "faults-off").touch()  # the workers' storage faults stop too
        soak.log("calm: no more faults")
        while time.monotonic() < fires_end:
            time.sleep(1)
        soak.disable_all()
        soak.drain()
        soak.save()
        report = check(soak)
        if report.details:
            (scratch / "details.txt").write_text("\n".join(report.details) + "\n")
        return report
    finally:
        soak.stop()
        if keep or workdir is not None or report is None or report.violations:
            say(f"  logs and data kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def recheck(workdir: Path) -> Report:
    """Check a kept soak again (its Azurite data, logs and ``soak.json``), e.g. after changing a check."""
    soak = Soak.load(workdir)
    try:
        return check(soak)
    finally:
        soak.azurite.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long routines fire (default 10)")
    parser.add_argument("--routines", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1, help="seed of the agent's faults and the injections")
    parser.add_argument("--keep", action="store_true", help="keep the logs, call log and Azurite data")
    parser.add_argument("--recheck", type=Path, metavar="DIR", help="check a kept soak again, run nothing")
    args = parser.parse_args(argv)
    if args.recheck:
        report = recheck(args.recheck)
    else:
        say(f"Routines soak: {args.minutes:g} min, {args.routines} routines, seed {args.seed}")
        report = run(args.minutes, args.routines, args.seed, keep=args.keep)
    say(table(report))
    for line in report.details[:50]:
        say(f"    {line}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
