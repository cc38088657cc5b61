"""Flow control end to end (README "Flow control"): devhost workers as real processes on Azurite, two
on one storage like two instances of the app, calling the fake HTTP agent, which logs every call.
What is asserted is counted at the agent (starts, and runs in flight from their start to the poll
that saw them done) and read back through the HTTP API and the store; nothing is timed.

Two pairs of workers share the session's Azurite: ``main`` runs the concurrency, rate-limit and
schedule scenarios, all created when the module starts so that they run side by side; ``kills`` runs
the two scenarios that kill a worker, one after the other, while ``main`` works. A message a worker
has taken stays invisible ``VISIBILITY`` seconds (the host's ten minutes otherwise), so what a killed
worker held comes back within the test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from routines import limits
from routines.azurite import free_ports
from routines.store.tables import TableStore
from tests.fake_agent import Call, FakeAgent, Reply
from tests.helpers import request_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parent.parent
VISIBILITY = 15  # seconds a taken message stays invisible: a killed worker's messages come back
TERMINAL = {"succeeded", "failed", "cancelled", "skipped", "missed"}
DEADLINE = 240.0  # generous: a loaded 2-core machine, a 45 s lease to wait out

# A devhost worker: ``python -c BOOT <visibility> <devhost args>``. With FLOWE2E_DIE_KEY set, the
# first give-back of a permit of that key (across workers: a marker file decides) kills the worker
# with SIGKILL instead: a worker dying after a run's final write and before its permit went back.
BOOT = """
import os, signal, sys
import routines.devhost as devhost, routines.devhost.queues as queues
from routines import limits
queues.PROCESSING_VISIBILITY_SECONDS = int(sys.argv.pop(1))
die_key, mark = os.environ.get("FLOWE2E_DIE_KEY"), os.environ.get("FLOWE2E_DIE_MARK")
give_back = limits.give_back
def dying_give_back(store, queue, key, run_id):
    if key == die_key:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            print(f"flowe2e: SIGKILL before giving back {run_id}'s permit of {key}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    give_back(store, queue, key, run_id)
if die_key:
    limits.give_back = dying_give_back
sys.exit(devhost.main(sys.argv[1:]))
"""


class Worker:
    """One devhost process, its output in ``<workdir>/<name>.log``; it calls the agent at
    ``<agent>/<name>``, so the path of a start names the worker that made it."""

    def __init__(self, name: str, env: dict[str, str], log: Path, *, timers: bool) -> None:
        self.name, self.log, self.timers = name, log, timers
        port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", BOOT, str(VISIBILITY), "--port", str(port)]
        if not timers:
            command.append("--no-timers")
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        wait_for(
            lambda: "devhost ready on" in self.output() or self.popen.poll() is not None,
            60,
            f"worker {self.name} to start",
        )
        assert self.popen.poll() is None, self.output()[-3000:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Pair:
    """Two workers on one storage (their own tables and queue): ``a`` also runs the timers (the
    minute tick, the repair pass every 15 s), ``b`` only dispatches (``--no-timers``)."""

    def __init__(self, name: str, connection: str, agent: FakeAgent, workdir: Path, **env: str) -> None:
        self.name, self.agent, self.workdir = name, agent, workdir
        prefix = "t" + uuid.uuid4().hex[:12]
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("ROUTINES_", "APPLICATIONINSIGHTS_", "OTEL_", "AzureWebJobs"))
            },
            "AzureWebJobsStorage": connection,
            "ROUTINES_TABLE_PREFIX": prefix,
            "ROUTINES_QUEUE_NAME": "q" + uuid.uuid4().hex[:16],
            "ROUTINES_AGENT_BACKEND": "http",
            "ROUTINES_MIN_INTERVAL_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.store = TableStore(TableServiceClient.from_connection_string(connection), prefix)
        self.workers: dict[str, Worker] = {}  # by role, the current incarnation
        self.gone: list[Worker] = []
        self._incarnation = itertools.count(1)

    def start(self, *roles: str) -> None:
        started = [self._spawn(role) for role in roles]
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(Worker.wait_ready, started))

    def _spawn(self, role: str) -> Worker:
        name = f"{self.name}-{role}{next(self._incarnation)}"
        env = {**self.env, "ROUTINES_AGENT_ENDPOINT": f"{self.agent.url}/{name}"}
        worker = Worker(name, env, self.workdir / f"{name}.log", timers=role == "a")
        self.workers[role] = worker
        return worker

    def worker_of(self, call: Call) -> tuple[str, Worker]:
        """The role and worker whose start ``call`` is."""
        name = call.path.split("/")[1]
        return next((role, w) for role, w in self.workers.items() if w.name == name)

    def restart(self, role: str) -> None:
        """The worker of ``role`` is dead (killed): start a new one in its place."""
        old = self.workers[role]
        assert not old.alive()
        self.gone.append(old)
        self.start(role)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The management API, through any live worker."""
        worker = next(w for w in self.workers.values() if w.alive())
        status, _, answer = request_json(
            method, f"{worker.url}/api{path}", body, {"Content-Type": "application/json"}
        )
        return status, answer

    def create(self, name: str, agent: str, **fields: Any) -> str:
        body = {
            "name": name,
            "trigger": {"type": "schedule", "cron_expression": "*/2 * * * * *", "time_zone": "UTC"},
            "actions": [{"type": "invocation", "agent_id": agent, "input": name}],
            "overlap_policy": "allow_all",
            **fields,
        }
        status, created = self.call("POST", "/routines", body)
        assert status == 201, created
        return str(created["id"])

    def routine(self, rid: str) -> dict[str, Any]:
        status, routine = self.call("GET", f"/routines/{rid}")
        assert status == 200, routine
        return dict(routine)

    def runs(self, *rids: str) -> list[dict[str, Any]]:
        """Every run of the routines, oldest scheduled first."""
        found: list[dict[str, Any]] = []
        for rid in rids:
            continuation = ""
            while True:
                status, page = self.call("GET", f"/routines/{rid}/runs?limit=200{continuation}")
                assert status == 200, page
                found.extend(page["items"])
                if not page["continuation"]:
                    break
                continuation = f"&continuation={page['continuation']}"
        return sorted(found, key=lambda run: run["scheduled_for"])

    def finished_runs(self, rids: list[str], count: int) -> list[dict[str, Any]]:
        """The routines' runs once there are ``count`` of them, all terminal (within DEADLINE)."""

        def done() -> list[dict[str, Any]] | None:
            runs = self.runs(*rids)
            return runs if len(runs) >= count and all(r["status"] in TERMINAL for r in runs) else None

        return wait_for(done, DEADLINE, f"{count} finished runs", lambda: _statuses(self.runs(*rids)))

    def permits(self, key: str) -> limits.Permits | None:
        return self.store.get_limit(limits.Permits, key)

    def permits_given_back(self, key: str) -> limits.Permits:
        """The key's permits row once nobody holds or waits for a permit (within DEADLINE)."""

        def empty() -> limits.Permits | None:
            permits = self.permits(key)
            return permits if permits is not None and not permits.holders and not permits.waiters else None

        return wait_for(empty, DEADLINE, f"every permit of {key} given back", lambda: repr(self.permits(key)))

    def stop(self) -> None:
        for worker in [*self.workers.values(), *self.gone]:
            worker.stop()


def _statuses(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['id']}={r['status']}" for r in runs)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- what the agent saw -------------------------------------------------------------------------


def in_flight(agent: FakeAgent, name: str) -> list[tuple[Call, float | None]]:
    """Each start of agent ``name`` with the arrival of the poll that saw its run done (for a start
    answered at once, its own arrival; None: never seen done)."""
    done: dict[str | None, float] = {}
    for answer in agent.answered(name, "poll"):
        if answer.status == 200:
            done.setdefault(answer.run, answer.call.received_at)
    return [
        (a.call, done.get(a.run) if a.status == 202 else a.call.received_at)
        for a in agent.answered(name, "start")
    ]


def most_at_once(flights: list[tuple[Call, float | None]]) -> int:
    """The most runs under way at the agent at one instant, each from its start to the poll that saw
    it done (``in_flight``; a run ending when another starts is not counted with it)."""
    ends = [done for _, done in flights if done is not None]
    assert len(ends) == len(flights), f"a run the agent never saw done: {spans(flights)}"
    events = sorted([(call.received_at, 1) for call, _ in flights] + [(end, -1) for end in ends])
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


def spans(flights: list[tuple[Call, float | None]]) -> str:
    return "; ".join(f"{call.body['run_id']} {call.received_at:.2f}-{done}" for call, done in flights)


def most_in_window(times: list[float], seconds: float) -> int:
    """The most of ``times`` inside one window ``[t, t + seconds)``."""
    ordered = sorted(times)
    return max((sum(1 for u in ordered if t <= u < t + seconds) for t in ordered), default=0)


# --- the fleet ----------------------------------------------------------------------------------

CONCURRENT_ROUTINES, CONCURRENT_FIRES, CONCURRENT_LIMIT = 5, 10, 2
RATE_ROUTINES, RATE_FIRES, RATE_LIMIT, RATE_PERIOD = 3, 3, 3, 10


@dataclass
class Fleet:
    agent: FakeAgent
    main: Pair
    kills: Pair
    concurrent: list[str]  # routine ids
    rated: list[str]
    three: str
    ends: str
    end_at: datetime
    broken: str


@pytest.fixture(scope="module")
def fleet(azurite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("flow")
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(FakeAgent())
        main = Pair("main", azurite.connection_string, agent, workdir)
        kills = Pair(
            "kills",
            azurite.connection_string,
            agent,
            workdir,
            FLOWE2E_DIE_KEY="leak",
            FLOWE2E_DIE_MARK=str(workdir / "died-once"),
        )
        stack.callback(main.stop)
        stack.callback(kills.stop)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda pair: pair.start("a", "b"), (main, kills)))

        agent.set_default("conc", Reply.pending(polls=1))  # 202, then done at its first poll
        agent.set_default("broken", 400)  # not retriable
        concurrency = {"key": "c2", "limit": CONCURRENT_LIMIT}
        concurrent = [
            main.create(f"conc-{i}", "conc", concurrency=concurrency, max_fires=CONCURRENT_FIRES)
            for i in range(CONCURRENT_ROUTINES)
        ]
        rate = {"key": "r3", "limit": RATE_LIMIT, "period_seconds": RATE_PERIOD}
        rated = [
            main.create(f"rate-{i}", "rate", rate_limit=rate, max_fires=RATE_FIRES)
            for i in range(RATE_ROUTINES)
        ]
        three = main.create("three", "three", max_fires=3)
        end_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)
        ends = main.create("ends", "ends", end_at=end_at.isoformat())
        broken = main.create(
            "broken",
            "broken",
            trigger={"type": "schedule", "cron_expression": "*/3 * * * * *", "time_zone": "UTC"},
            pause_after_failures=2,
            retry_policy={"max_attempts": 1},
        )
        yield Fleet(agent, main, kills, concurrent, rated, three, ends, end_at, broken)


# --- the scenarios that kill a worker (first: ``main`` works meanwhile) -------------------------


def test_a_worker_killed_while_its_run_holds_the_permit_leaks_nothing(fleet: Fleet) -> None:
    """Limit 1, four runs of two routines; the worker calling the agent for the first is SIGKILLed
    mid-call. That run's attempt is taken over once its lease lapses, and the others follow one by one."""
    agent, pair = fleet.agent, fleet.kills
    agent.script("slow", [Reply.slow(120)])  # the first start hangs: its worker is killed during it
    agent.set_default("slow", Reply.pending(polls=1))
    concurrency = {"key": "k1", "limit": 1}
    rids = [pair.create(f"kill-{i}", "slow", concurrency=concurrency, max_fires=2) for i in range(2)]

    [first] = agent.wait_for_calls(1, timeout=60, agent="slow", kind="start")
    held = first.body["run_id"]
    permits = pair.permits("k1")
    assert permits is not None and permits.holders == {held: first.body["routine_id"]}, permits
    role, victim = pair.worker_of(first)
    victim.kill()
    killed_at = time.time()
    pair.restart(role)

    runs = pair.finished_runs(rids, 4)
    assert [r["status"] for r in runs] == ["succeeded"] * 4, _statuses(runs)
    starts = agent.starts("slow")
    by_run = {r["id"]: [c for c in starts if c.body["run_id"] == r["id"]] for r in runs}
    # The killed start is taken over once its lease lapsed: the same attempt started again after the
    # kill; every other run started once.
    assert [len(calls) for run_id, calls in by_run.items() if run_id != held] == [1, 1, 1], by_run
    again = by_run[held]
    assert len(again) == 2 and again[1].received_at > killed_at
    assert {(c.idempotency_key, c.attempt) for c in again} == {(again[0].idempotency_key, 1)}
    # One run at a time at the agent, the dead one counted until its worker died.
    flights = [(call, killed_at if call == first else done) for call, done in in_flight(agent, "slow")]
    assert most_at_once(flights) == 1, spans(flights)
    waited = [r for r in runs if r["id"] != held]
    assert all(r["wait_reason"] == "waited for a permit of concurrency key k1" for r in waited), waited
    pair.permits_given_back("k1")


# Found here first: a redelivery of a finished run used to drop its watch without giving its permit
# back (``decide._handed_over`` now does both), so the permit stayed with a finished run for ever.
def test_a_worker_dying_between_a_runs_end_and_its_give_back_leaks_nothing(fleet: Fleet) -> None:
    """Limit 1, two runs; the worker ending the first dies after the run's final write, before its
    permit is given back. The permit must still come back, and the second run start."""
    agent, pair = fleet.agent, fleet.kills
    rid = pair.create("leak", "leak", concurrency={"key": "leak", "limit": 1}, max_fires=2)
    # The worker that ends the first run dies before giving its permit back (BOOT's hook).
    died = wait_for(
        lambda: next((role for role, w in pair.workers.items() if not w.alive()), None),
        60,
        "the worker ending the first run to die",
    )
    first = agent.starts("leak")[0].body["run_id"]
    pair.restart(died)

    def started_or_leaked() -> str | None:
        if len(agent.starts("leak")) >= 2:
            return "started"
        # The run is over and its watch gone, yet it still holds the permit: nothing looks at it again.
        run = next(r for r in pair.runs(rid) if r["id"] == first)
        permits = pair.permits("leak")
        watched = {w.run_id for w in pair.store.watched(datetime.now(UTC) + timedelta(days=1), 1000)}
        if run["status"] in TERMINAL and first not in watched and permits and first in permits.holders:
            return f"leaked: {first} is {run['status']}, unwatched, and still holds {permits}"
        return None

    outcome = wait_for(started_or_leaked, DEADLINE, "the second run to start, or the permit to leak")
    assert outcome == "started", outcome
    runs = pair.finished_runs([rid], 2)
    assert [r["status"] for r in runs] == ["succeeded"] * 2, _statuses(runs)
    pair.permits_given_back("leak")


# --- the scenarios of ``main`` (started with the module) ------------------------------------------


def test_a_concurrency_key_holds_its_limit_across_routines_and_workers(fleet: Fleet) -> None:
    """Five routines sharing a key of limit 2, ten fires each every 2 s, each agent run taking a
    second of polls: fifty runs compete for two permits on two workers."""
    agent, pair = fleet.agent, fleet.main
    count = CONCURRENT_ROUTINES * CONCURRENT_FIRES
    runs = pair.finished_runs(fleet.concurrent, count)
    assert len(runs) == count and {r["status"] for r in runs} == {"succeeded"}, _statuses(runs)
    flights = in_flight(agent, "conc")
    started = sorted(call.body["run_id"] for call, _ in flights)
    assert started == sorted(r["id"] for r in runs)  # one start each
    # Never more than the limit under way at the agent; and the limit was reached (the key was busy).
    assert most_at_once(flights) == CONCURRENT_LIMIT, spans(flights)
    waited = [r for r in runs if r["wait_reason"] == "waited for a permit of concurrency key c2"]
    assert waited and all(r["waited_seconds"] > 0 for r in waited), waited
    served = {call.path.split("/")[1] for call, _ in flights}
    assert served == {w.name for w in pair.workers.values()}  # both workers started agent runs
    for rid in fleet.concurrent:
        routine = pair.routine(rid)
        assert routine["state"] == "completed" and routine["fire_count"] == CONCURRENT_FIRES, routine
    pair.permits_given_back("c2")


def test_a_rate_limit_delays_starts_past_the_limit_and_drops_none(fleet: Fleet) -> None:
    """Three routines sharing a limit of 3 starts in 10 s, three fires each every 2 s: nine starts
    asked for within seconds, spread over three periods."""
    agent, pair = fleet.agent, fleet.main
    count = RATE_ROUTINES * RATE_FIRES
    runs = pair.finished_runs(fleet.rated, count)
    assert len(runs) == count and {r["status"] for r in runs} == {"succeeded"}, _statuses(runs)
    starts = agent.starts("rate")
    assert sorted(c.body["run_id"] for c in starts) == sorted(r["id"] for r in runs)  # one start each
    # The instants the limiter counted (each step's start) hold the limit in any period, exactly...
    counted = {r["id"]: _utc(r["actions"][0]["started_at"]).timestamp() for r in runs}
    ms = 0.001  # the API shows milliseconds
    assert most_in_window(list(counted.values()), RATE_PERIOD - ms) <= RATE_LIMIT, sorted(counted.values())
    # ...and the agent saw each start after it was counted, one run write and a request later
    # (0.02-0.2 s here). So a window of the whole period at the agent may hold one start more, by
    # that much (4 in 9.96 s was seen); none of the period less a second for it holds more.
    for call in starts:
        assert call.received_at >= counted[call.body["run_id"]] - ms, call
    arrivals = [c.received_at for c in starts]
    assert most_in_window(arrivals, RATE_PERIOD - 1.0) <= RATE_LIMIT, sorted(arrivals)
    waited = [r for r in runs if r["wait_reason"] == "waited for the rate limit of key r3"]
    assert waited and all(r["waited_seconds"] > 0 for r in waited), runs


def test_max_fires_end_at_and_pause_after_failures_end_their_routines(fleet: Fleet) -> None:
    """Read back through the API: a routine with max_fires 3, one with end_at 6 s after its creation
    (both every 2 s) and one whose agent answers 400 with pause_after_failures 2 and one attempt."""
    agent, pair = fleet.agent, fleet.main
    # max_fires 3: three runs, then completed.
    runs = pair.finished_runs([fleet.three], 3)
    three = pair.routine(fleet.three)
    assert three["state"] == "completed" and three["fire_count"] == len(runs) == 3, three
    assert [r["status"] for r in runs] == ["succeeded"] * 3, _statuses(runs)
    assert len({c.idempotency_key for c in agent.starts("three")}) == len(agent.starts("three")) == 3

    # end_at: every fire up to it (every 2 s), none after, then completed.
    ends = pair.routine(fleet.ends)
    assert ends["state"] == "completed" and ends["fire_count"] >= 1, ends
    ended = pair.finished_runs([fleet.ends], ends["fire_count"])
    times = [_utc(r["scheduled_for"]) for r in ended]
    assert len(ended) == ends["fire_count"] and times[-1] <= fleet.end_at < times[-1] + timedelta(seconds=2)
    assert all(later - sooner == timedelta(seconds=2) for sooner, later in itertools.pairwise(times)), times
    assert {r["status"] for r in ended} == {"succeeded"} and len(agent.starts("ends")) == len(ended)

    # pause_after_failures 2, each run failing at once: disabled for its failures.
    broken = wait_for(
        lambda: (r := pair.routine(fleet.broken))["state"] == "disabled" and r,
        DEADLINE,
        "the failing routine to be paused",
        lambda: repr(pair.routine(fleet.broken)),
    )
    assert broken["disabled_reason"] == "failures" and broken["next_fire_at"] is None, broken
    failing = pair.runs(fleet.broken)
    failed = [r for r in failing if r["status"] == "failed"]
    assert len(failed) >= 2 and failing[:2] == failed[:2], _statuses(failing)
    assert {r["status"] for r in failing} <= {"failed", "cancelled"}, _statuses(failing)
    assert len(agent.starts("broken")) == len(failed)  # one attempt each
