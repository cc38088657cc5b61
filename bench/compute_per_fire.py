"""Function time per fire for a short and a long agent run (docs/guarantees.md #6).

The agent (the fake agent) answers 202 and completes N s later (1 s and 60 s; ``--quick``: 1 s and
15 s); it sends no Retry-After, so Routines polls at its default interval. One fire each, all at once:

- **Routines**: a worker loop that mirrors the devhost (receive batches of 16, one thread per message,
  delete on success) calls ``Dispatcher.handle`` for the fire and then for each ``poll`` message; the
  fire's function time is the sum over its messages of the handler's wall time (and of its thread's CPU
  time), with its messages and storage requests counted.
- **Blocking baseline**: one handler that reads the routine, inserts the run, starts the agent and then
  waits for it in the same call (GET every second until done), then writes the outcome.
- **What-if, poll back-off** (a bench-side wrapper of the HTTP backend, not Routines' code): the same
  Routines path with the next poll delayed by max(1 s, time since the start ÷ 2), to size the fix
  suggested when the target is missed.

Target: the 60 s run costs at most 1.2x the function time of the 1 s run.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import common
from azure.storage.queue import QueueClient
from common import say

from routines.agents.base import AgentCall, AgentOutcome
from routines.agents.http import HttpAgentBackend
from routines.dispatcher import Dispatcher
from routines.messages import DispatchMessage
from routines.models import ActionResult, Run, RunStatus, RunTrigger, idempotency_key, scheduled_run_id
from routines.runtime import storage_clients
from routines.store.tables import TableStore
from tests.fake_agent import FakeAgent, Reply

BATCH = 16


@dataclass
class Cost:
    wall: float = 0.0
    cpu: float = 0.0
    messages: int = 0
    requests: int = 0


class ThreadTagCounter:
    """A request hook that charges each storage request to the tag of the thread making it."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.counts: dict[str, int] = defaultdict(int)

    def __call__(self, request: Any) -> None:
        tag = getattr(self.local, "tag", None)
        if tag:
            with self.lock:
                self.counts[tag] += 1


class PollBackoff:
    """What-if: an HTTP backend whose pending runs are polled after max(1 s, elapsed / 2)."""

    def __init__(self, inner: HttpAgentBackend) -> None:
        self.inner = inner

    def start(self, call: AgentCall) -> AgentOutcome:
        return self._stretch(call, self.inner.start(call))

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        return self._stretch(call, self.inner.poll(call, handle))

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        self.inner.cancel(call, handle)

    @staticmethod
    def _stretch(call: AgentCall, outcome: AgentOutcome) -> AgentOutcome:
        if outcome.done or call.deadline is None:
            return outcome
        started = call.deadline - timedelta(seconds=600)  # deadline = attempt start + timeout_seconds
        elapsed = (datetime.now(UTC) - started).total_seconds()
        return replace(outcome, poll_after=max(outcome.poll_after, elapsed / 2))


def worker_loop(
    connection: str,
    queue_name: str,
    dispatchers: dict[str, Dispatcher],
    counter: ThreadTagCounter,
    costs: dict[str, Cost],
    done: threading.Event,
    timeout: float,
) -> None:
    """Mirror of the devhost's queue poller: batches of 16, a thread per message, delete on success."""
    queue = QueueClient.from_connection_string(connection, queue_name)
    idle = 0.0
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        while not done.is_set() and time.monotonic() < deadline:
            messages = list(
                next(
                    queue.receive_messages(
                        messages_per_page=BATCH, max_messages=BATCH, visibility_timeout=600
                    ).by_page(),
                    [],
                )
            )
            if not messages:
                idle = min(max(idle * 2, 0.1), 1.0)
                done.wait(idle)
                continue
            idle = 0.0

            def handle(message: Any) -> None:
                body = base64.b64decode(message.content)
                routine_id = DispatchMessage.decode(body).routine_id
                counter.local.tag = routine_id
                with common.Timer() as timer:
                    dispatchers[routine_id].handle(body)
                counter.local.tag = None
                cost = costs[routine_id]
                cost.wall += timer.wall
                cost.cpu += timer.cpu
                cost.messages += 1
                queue.delete_message(message.id, message.pop_receipt)

            list(pool.map(handle, messages))


def blocking_fire(
    store: TableStore, backend: HttpAgentBackend, routine_id: str, counter: ThreadTagCounter, cost: Cost
) -> None:
    """The baseline: one handler that starts the agent and waits for it synchronously."""
    counter.local.tag = routine_id
    with common.Timer() as timer:
        routine, _ = store.get_routine(routine_id)
        now = datetime.now(UTC)
        scheduled = now.replace(microsecond=0)
        run = Run(
            id=scheduled_run_id(routine_id, scheduled),
            routine_id=routine_id,
            trigger=RunTrigger.schedule,
            scheduled_for=scheduled,
            status=RunStatus.running,
            attempt=1,
            started_at=now,
            idempotency_key=idempotency_key(routine_id, scheduled),
            actions=[ActionResult(index=0)],
        )
        etag = store.insert_run(run)
        action = routine.actions[0]
        call = AgentCall(
            routine_id=routine_id,
            run_id=run.id,
            idempotency_key=run.idempotency_key,
            scheduled_for=scheduled,
            attempt=1,
            action_index=0,
            action_type=action.type,
            input=action.input,
            agent_id=action.agent_id,
            agent_name=None,
            agent_version=None,
            thread_id=None,
            max_thread_messages=None,
            traceparent=None,
            deadline=now + timedelta(seconds=routine.timeout_seconds),
        )
        outcome = backend.start(call)
        while not outcome.done:
            time.sleep(max(1.0, outcome.poll_after))
            outcome = backend.poll(call, outcome.handle or {})
        final = run.model_copy(deep=True)
        final.status, final.ended_at = RunStatus.succeeded, datetime.now(UTC)
        final.actions[0].status, final.actions[0].output = RunStatus.succeeded, outcome.output
        store.replace_run(final, etag)
    counter.local.tag = None
    cost.wall, cost.cpu, cost.messages = timer.wall, timer.cpu, 1


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: p.add_argument(
            "--profile", action="store_true", help="pyinstrument the handler of one 200 fire (bench/out/)"
        ),
    )
    short, long = 1, 15 if args.quick else 60
    say(f"compute per fire: agent runs of {short} s and {long} s (202, then done)")
    say(common.machine_line())
    with common.azurite() as emulator, FakeAgent() as agent:
        conn = emulator.connection_string
        counter = ThreadTagCounter()
        env = common.app_env(conn, "cpf", "cpf-q", agent.url)
        tables, queue = storage_clients(common.settings(env), hook=counter)
        store = TableStore(tables, "cpf")
        store.ensure_tables()
        queue.ensure()
        backend = HttpAgentBackend(agent.url)
        what_if = PollBackoff(backend)
        now = datetime.now(UTC)
        cases = {  # label -> (routine id, agent seconds, kind)
            f"Routines, {short} s run": (common.routine_id(60, 1), short, "routines"),
            f"Routines, {long} s run": (common.routine_id(60, 2), long, "routines"),
            f"blocking baseline, {short} s run": (common.routine_id(60, 3), short, "blocking"),
            f"blocking baseline, {long} s run": (common.routine_id(60, 4), long, "blocking"),
            f"what-if poll back-off, {short} s run": (common.routine_id(60, 5), short, "what-if"),
            f"what-if poll back-off, {long} s run": (common.routine_id(60, 6), long, "what-if"),
        }
        routines = []
        for rid, seconds, _ in cases.values():
            agent.set_default(f"a{rid[3:]}", Reply.pending(done_after=seconds))
            routines.append(
                common.make_routine(
                    rid, common.EVERY_SECOND, now + timedelta(days=30), now, agent=f"a{rid[3:]}"
                )
            )
        common.seed(tables.get_table_client(store.routines_table), routines)
        costs: dict[str, Cost] = defaultdict(Cost)
        dispatchers = {
            rid: Dispatcher(store, queue, what_if if kind == "what-if" else backend)
            for rid, _, kind in cases.values()
        }
        done = threading.Event()
        worker = threading.Thread(
            target=worker_loop,
            args=(conn, "cpf-q", dispatchers, counter, costs, done, long + 120),
            daemon=True,
        )
        worker.start()
        scheduled = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        for rid, _, kind in cases.values():
            if kind != "blocking":
                queue.send(
                    DispatchMessage(
                        kind="fire",
                        routine_id=rid,
                        scheduled_for=scheduled,
                        routine_version=1,
                        attempt=1,
                        run_id=scheduled_run_id(rid, scheduled),
                    )
                )
        blockers = [
            threading.Thread(target=blocking_fire, args=(store, backend, rid, counter, costs[rid]))
            for rid, _, kind in cases.values()
            if kind == "blocking"
        ]
        for blocker in blockers:
            blocker.start()
        deadline = time.monotonic() + long + 120
        ids = [rid for rid, _, kind in cases.values() if kind != "blocking"]
        while time.monotonic() < deadline:
            finished = [store.list_runs(rid, RunStatus.succeeded, 1, None).items for rid in ids]
            if all(finished):
                break
            time.sleep(1)
        done.set()
        worker.join(30)
        for blocker in blockers:
            blocker.join(long + 60)
        for rid in costs:
            costs[rid].requests = counter.counts.get(rid, 0)
        profile_path = None
        if args.profile:
            profile_path = profile_one(store, queue, backend, agent, tables)
        backend.close()

    results = {
        label: {"agent_seconds": seconds, "kind": kind, **vars(costs[rid])}
        for label, (rid, seconds, kind) in cases.items()
    }
    common.save_json("compute_per_fire", results)
    labels = list(results)

    def ratio(kind: str) -> float:
        pair = [r for r in results.values() if r["kind"] == kind]
        return float(pair[1]["wall"]) / float(pair[0]["wall"])

    routines_ratio, blocking_ratio, what_if_ratio = ratio("routines"), ratio("blocking"), ratio("what-if")
    cpu_ratio = results[labels[1]]["cpu"] / results[labels[0]]["cpu"]
    met = routines_ratio <= 1.2
    headers = ("case", "messages", "function wall time", "function CPU time", "storage requests")
    rows = [
        (label, r["messages"], f"{r['wall'] * 1000:.0f} ms", f"{r['cpu'] * 1000:.0f} ms", r["requests"])
        for label, r in results.items()
    ]
    say()
    say(common.table(headers, rows))
    say(
        f"Routines {long} s / {short} s: wall {routines_ratio:.1f}x, CPU {cpu_ratio:.1f}x (target <= 1.2x): "
        f"{'met' if met else 'MISSED'}; blocking {blocking_ratio:.1f}x; what-if back-off {what_if_ratio:.1f}x"
    )
    if profile_path:
        say(f"profile of one handled 200 fire: {profile_path}")
    if args.no_doc:
        return
    common.write_section(
        "compute_per_fire",
        f"""
## 6. Function time per fire vs agent duration (`bench/compute_per_fire.py`{" --quick" if args.quick else ""})

{common.machine_line()}

One fire per case, all at the same time; the agent answers 202 and is done {short} s or {long} s later,
with no `Retry-After`. Routines: a worker loop mirroring the devhost (batches of 16, a thread per
message) runs `Dispatcher.handle` for the fire and each `poll` message; function time = the sum of the
handler's wall (and thread CPU) time over the fire's messages. Blocking baseline: one handler that
starts the agent and waits for it (GET every second). What-if: Routines with the next poll delayed by
max(1 s, elapsed ÷ 2), via a bench-side wrapper of the HTTP backend (not Routines' code).

{common.table(headers, rows)}

- {long} s run within 1.2x of the {short} s run's function time: {common.verdict(met)}
  ({routines_ratio:.1f}x wall, {cpu_ratio:.1f}x CPU; blocking baseline {blocking_ratio:.1f}x; with the
  back-off what-if {what_if_ratio:.1f}x).
""",
    )


def profile_one(
    store: TableStore, queue: Any, backend: HttpAgentBackend, agent: FakeAgent, tables: Any
) -> str:
    """pyinstrument over ``Dispatcher.handle`` of 30 fires answered 200 at once (CPU hot spots)."""
    from pyinstrument import Profiler

    now = datetime.now(UTC)
    routines = [
        common.make_routine(common.routine_id(61, i), common.EVERY_SECOND, now + timedelta(days=30), now)
        for i in range(30)
    ]
    common.seed(tables.get_table_client(store.routines_table), routines)
    dispatcher = Dispatcher(store, queue, backend)
    scheduled = now.replace(microsecond=0) - timedelta(seconds=1)
    bodies = [
        DispatchMessage(
            kind="fire",
            routine_id=r.id,
            scheduled_for=scheduled,
            routine_version=1,
            attempt=1,
            run_id=scheduled_run_id(r.id, scheduled),
        ).encode()
        for r in routines
    ]
    profiler = Profiler(interval=0.0002)
    cpu = time.thread_time()
    wall = time.perf_counter()
    profiler.start()
    for body in bodies:
        dispatcher.handle(body)
    profiler.stop()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    path = common.OUT / "compute_per_fire_handle_profile.txt"
    path.write_text(
        f"30 fires handled one by one: {wall * 1000 / 30:.1f} ms wall, {cpu * 1000 / 30:.1f} ms CPU "
        f"per fire\n\n" + profiler.output_text(unicode=False, color=False)
    )
    return str(path)


if __name__ == "__main__":
    main()
