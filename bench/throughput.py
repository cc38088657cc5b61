"""Dispatch throughput with 1, 2 and 4 worker processes, as a share of what Azurite allows.

Workers are real devhost processes (``python -m routines.devhost --no-timers``) consuming one queue
with the ``host.json`` queue settings (batch 16, a new batch at 8 in flight, polling back-off up to
1 s), calling the fake agent as a process (200 at once). For each worker count, M routines are seeded
and M fire messages are enqueued, delayed so that they all surface at once after the workers are up;
throughput is the rate of agent calls from the first to the last, and every run is checked to have
succeeded.

The ceiling, measured in the same run: the raw Azurite request rate (bare SDK calls doing the dispatch
path's request mix — send, receive, delete, point read, two-row transaction, point read, two-row
transaction — from 1, 2 and 4 processes; the best counts) divided by the storage requests one fire
costs on the dispatch side (receive share + dispatch + delete, counted with the request hook on a
small calibration run). Target: at least half of that ceiling, and rising with workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import common
from common import say

from routines import scheduler
from routines.messages import DispatchMessage
from routines.models import scheduled_run_id
from routines.runtime import storage_clients
from routines.store.tables import TableStore

WORKER_COUNTS = (1, 2, 4)


# --- the raw Azurite rate ------------------------------------------------------------------------------


def _raw_child(
    connection: str, table_name: str, queue_name: str, threads: int, seconds: float, results: Any
) -> None:
    from azure.core import MatchConditions
    from azure.data.tables import TableServiceClient, UpdateMode
    from azure.storage.queue import QueueClient

    service = TableServiceClient.from_connection_string(connection)
    table = service.get_table_client(table_name)
    queue = QueueClient.from_connection_string(connection, queue_name)
    counts = [0] * threads
    start = time.monotonic() + 0.2
    stop = start + seconds

    def loop(index: int) -> None:
        pk = f"p{uuid.uuid4().hex[:10]}"
        table.upsert_entity({"PartitionKey": pk, "RowKey": "routine", "Data0": "x" * 600})
        n = 0
        while time.monotonic() < start:
            time.sleep(0.01)
        i = 0
        while time.monotonic() < stop:
            queue.send_message("eyJ2IjoxfQ==")
            for message in queue.receive_messages(max_messages=1, visibility_timeout=30):
                queue.delete_message(message.id, message.pop_receipt)
                n += 1
            table.get_entity(pk, "routine")
            created = table.submit_transaction(
                [
                    ("create", {"PartitionKey": pk, "RowKey": f"run{i}", "Data0": "y" * 500}),
                    ("create", {"PartitionKey": pk, "RowKey": f"slot{i}", "Holder": "h"}),
                ]
            )
            table.get_entity(pk, f"slot{i}")
            table.submit_transaction(
                [
                    (
                        "update",
                        {"PartitionKey": pk, "RowKey": f"run{i}", "Data0": "z" * 500},
                        {
                            "mode": UpdateMode.REPLACE,
                            "etag": created[0]["etag"],
                            "match_condition": MatchConditions.IfNotModified,
                        },
                    ),
                    ("delete", {"PartitionKey": pk, "RowKey": f"slot{i}"}),
                ]
            )
            n += 6
            i += 1
        counts[index] = n

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(sum(counts))


def raw_rate(connection: str, processes: int, threads: int, seconds: float) -> float:
    """Storage requests per second that ``processes`` x ``threads`` bare SDK clients get from Azurite."""
    from azure.data.tables import TableServiceClient
    from azure.storage.queue import QueueClient

    name = f"raw{uuid.uuid4().hex[:8]}"
    TableServiceClient.from_connection_string(connection).create_table(name)
    QueueClient.from_connection_string(connection, name).create_queue()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    children = [
        context.Process(target=_raw_child, args=(connection, name, name, threads, seconds, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    total = sum(results.get(timeout=seconds + 120) for _ in children)
    for child in children:
        child.join(30)
    return float(total) / seconds


class SurfaceAt:
    """A queue whose every message surfaces at ``moment`` (the delay is computed at each send; whole
    seconds, so within the second before it)."""

    def __init__(self, queue: Any, moment: float) -> None:
        self.queue, self.moment = queue, moment

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        self.queue.send(message, max(0.0, self.moment - time.time()))


def handler_cost(connection: str, agent_url: str, policy: str, fires: int = 60) -> dict[str, float]:
    """Wall and CPU milliseconds of ``Dispatcher.handle`` per fire (200 agent), one thread, no contention:
    where a worker's time goes, for the default overlap policy (two-row transactions with the slot) and
    for ``allow_all`` (single-row writes)."""
    from routines.agents.http import HttpAgentBackend
    from routines.dispatcher import Dispatcher
    from routines.models import OverlapPolicy

    name = f"hc{policy.replace('_', '')}"
    tables, queue = storage_clients(common.settings(common.app_env(connection, name, f"{name}-q", agent_url)))
    store = TableStore(tables, name)
    store.ensure_tables()
    queue.ensure()
    now = datetime.now(UTC)
    routines = [
        common.make_routine(
            common.routine_id(95, i),
            common.EVERY_SECOND,
            now + timedelta(days=30),
            now,
            overlap_policy=OverlapPolicy(policy),
        )
        for i in range(fires + 10)
    ]
    common.seed(tables.get_table_client(store.routines_table), routines)
    backend = HttpAgentBackend(agent_url)
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
    for body in bodies[:10]:  # warm up connections
        dispatcher.handle(body)
    with common.Timer() as timer:
        for body in bodies[10:]:
            dispatcher.handle(body)
    backend.close()
    return {"wall_ms": timer.wall * 1000 / fires, "cpu_ms": timer.cpu * 1000 / fires}


# --- one worker count ----------------------------------------------------------------------------------


def run_workers(
    connection: str,
    agent: common.AgentProcess,
    workers: int,
    fires: int,
    group: int,
    azurite_pid: int,
    profile: bool = False,
) -> dict[str, Any]:
    prefix, queue_name = f"thr{workers}w{group}", f"thr-{workers}w-{group}"
    env = common.app_env(connection, prefix, queue_name, agent.url)
    tables, queue = storage_clients(common.settings(env))
    store = TableStore(tables, prefix)
    store.ensure_tables()
    queue.ensure()
    now = datetime.now(UTC)
    # Fires of an every-second schedule: any whole second is a valid fire (the staleness check), and
    # the due index points a month away so no tick would touch them.
    routines = [
        common.make_routine(common.routine_id(group, i), common.EVERY_SECOND, now + timedelta(days=30), now)
        for i in range(fires)
    ]
    common.seed(tables.get_table_client(store.routines_table), routines)
    hosts = [
        common.Devhost(env, common.OUT / f"throughput_{workers}w_{i}.log").start(wait=False)
        for i in range(workers)
    ]
    spy = None
    try:
        for host in hosts:
            host.wait_ready()
        surface = time.time() + 3 + fires / 250  # after the enqueue below
        scheduled = datetime.fromtimestamp(int(surface) - 1, UTC)
        messages = [
            (
                DispatchMessage(
                    kind="fire",
                    routine_id=r.id,
                    scheduled_for=scheduled,
                    routine_version=1,
                    attempt=1,
                    run_id=scheduled_run_id(r.id, scheduled),
                ),
                0.0,
            )
            for r in routines
        ]
        scheduler.send_all(SurfaceAt(queue, int(surface) + 1), messages)
        cpu_before = {
            "azurite": common.cpu_seconds(azurite_pid),
            "workers": sum(common.cpu_seconds(h.process.pid) for h in hosts if h.process),
            "agent": common.cpu_seconds(agent.process.pid),
        }
        if profile and hosts[0].process is not None:
            common.wait_until(int(surface) + 1)
            spy = common.py_spy(hosts[0].process.pid, common.OUT / f"throughput_{workers}w_profile", 8)
        ids = {r.id for r in routines}
        deadline = time.monotonic() + 60 + fires / 5
        mine: list[common.AgentLine] = []
        while time.monotonic() < deadline:
            mine = [line for line in agent.starts() if line.routine_id in ids]
            if len(mine) >= fires:
                break
            time.sleep(0.2)
        cpu_after = {
            "azurite": common.cpu_seconds(azurite_pid),
            "workers": sum(common.cpu_seconds(h.process.pid) for h in hosts if h.process),
            "agent": common.cpu_seconds(agent.process.pid),
        }
        # Every run must have succeeded: give the last final writes up to 30 s. A run whose final write
        # failed (e.g. a connection reset) stays leased for timeout_seconds + 30 s: counted, not waited.
        succeeded = 0
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            succeeded = sum(
                1
                for _ in tables.get_table_client(store.runs_table).query_entities(
                    "Status eq @s", parameters={"s": "succeeded"}, select=["RowKey"]
                )
            )
            if succeeded >= fires:
                break
            time.sleep(2)
    finally:
        if spy is not None:
            spy.wait(60)
        for host in hosts:
            host.stop()
    times = sorted(line.t for line in mine)
    window = times[-1] - times[0] if len(times) > 1 else float("nan")
    duplicates = len(mine) - len({line.routine_id for line in mine})
    return {
        "workers": workers,
        "fires": fires,
        "agent_calls": len(mine),
        "duplicates": duplicates,
        "succeeded": succeeded,
        "window_seconds": window,
        "fires_per_second": (len(times) - 1) / window if window else float("nan"),
        "first_call_lag": times[0] - (int(surface) + 1) if times else float("nan"),
        "cpu": {k: cpu_after[k] - cpu_before[k] for k in cpu_before},
    }


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: p.add_argument(
            "--profile", action="store_true", help="py-spy the first worker for 8 s of each run (bench/out/)"
        ),
    )
    fires = 400 if args.quick else 1500
    raw_seconds = 5 if args.quick else 10
    rounds = 1 if args.quick else 2
    say(f"throughput: {fires} fires per worker count {WORKER_COUNTS}")
    say(common.machine_line())
    import requests_per_fire

    from tests.fake_agent import FakeAgent

    with common.azurite() as emulator:
        conn = emulator.connection_string
        with FakeAgent() as in_process_agent:
            calibration = requests_per_fire.measure(conn, in_process_agent, "thrcal", 48)
            costs = {
                policy: handler_cost(conn, in_process_agent.url, policy) for policy in ("skip", "allow_all")
            }
        for policy, cost in costs.items():
            say(
                f"  Dispatcher.handle alone, overlap {policy}: {cost['wall_ms']:.1f} ms wall, "
                f"{cost['cpu_ms']:.1f} ms CPU per fire (one thread)"
            )
        per_fire = calibration["per_phase"]
        dispatch_side = per_fire["receive"] + per_fire["dispatch"] + per_fire["delete"]
        say(
            f"  dispatch-side storage requests per fire: {dispatch_side:.2f} "
            f"(receive {per_fire['receive']:.2f} + dispatch {per_fire['dispatch']:.2f} "
            f"+ delete {per_fire['delete']:.2f})"
        )
        raw: dict[str, float] = {}
        for processes, threads in ((1, 16), (2, 16), (4, 8)):
            raw[f"{processes}x{threads}"] = raw_rate(conn, processes, threads, raw_seconds)
            say(
                f"  raw Azurite rate, {processes} process(es) x {threads} threads: "
                f"{raw[f'{processes}x{threads}']:.0f} requests/s"
            )
        best = max(raw.values())
        ceiling = best / dispatch_side
        say(f"  ceiling: {best:.0f} requests/s / {dispatch_side:.2f} = {ceiling:.0f} fires/s")
        agent = common.AgentProcess(common.OUT / "throughput_agent.jsonl")
        runs = []
        # Worker counts interleaved over rounds (1, 2, 4, 1, 2, 4): load from other processes on the
        # machine hits every count alike; the best round of each count is the one reported as its rate.
        order = [(r, w) for r in range(rounds) for w in WORKER_COUNTS]
        try:
            for group, (round_, workers) in enumerate(order, start=10):
                result = run_workers(
                    conn, agent, workers, fires, group, common.azurite_pid(emulator), profile=args.profile
                )
                result["round"] = round_ + 1
                result["share_of_ceiling"] = result["fires_per_second"] / ceiling
                runs.append(result)
                say(
                    f"  {workers} worker(s): {result['fires_per_second']:.1f} fires/s "
                    f"({result['share_of_ceiling']:.0%} of the ceiling), "
                    f"{result['succeeded']}/{fires} succeeded, "
                    f"{result['duplicates']} duplicate agent calls, CPU s: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in result["cpu"].items())
                )
        finally:
            agent.stop()
    common.save_json(
        "throughput",
        {"raw": raw, "dispatch_side": dispatch_side, "ceiling": ceiling, "runs": runs, "handler_cost": costs},
    )
    cost_table = common.table(
        ("overlap policy", "wall", "CPU"),
        [(p, f"{c['wall_ms']:.1f} ms", f"{c['cpu_ms']:.1f} ms") for p, c in costs.items()],
    )

    best_of = {w: max(r["fires_per_second"] for r in runs if r["workers"] == w) for w in WORKER_COUNTS}
    half = all(rate / ceiling >= 0.5 for rate in best_of.values())
    per_count = "; ".join(
        f"{w} worker{'s' if w > 1 else ''} {share:.0%} {common.verdict(share >= 0.5)}"
        for w, share in ((w, best_of[w] / ceiling) for w in WORKER_COUNTS)
    )
    rates = [best_of[w] for w in WORKER_COUNTS]
    rising = all(b >= a * 0.98 for a, b in itertools.pairwise(rates))
    summary = ", ".join(
        f"{w} worker{'s' if w > 1 else ''} {best_of[w]:.1f}/s ({best_of[w] / ceiling:.0%})"
        for w in WORKER_COUNTS
    )
    headers = (
        "round",
        "workers",
        "fires",
        "succeeded",
        "fires/s",
        "share of ceiling",
        "window",
        "CPU s: Azurite / workers / agent",
    )
    rows = [
        (
            r["round"],
            r["workers"],
            r["fires"],
            r["succeeded"],
            f"{r['fires_per_second']:.1f}",
            f"{r['share_of_ceiling']:.0%}",
            f"{r['window_seconds']:.1f} s",
            " / ".join(f"{r['cpu'][k]:.1f}" for k in ("azurite", "workers", "agent")),
        )
        for r in runs
    ]
    say()
    say(common.table(headers, rows))
    say(f"best of each: {summary}")
    say(
        f"at least half the ceiling: {'met' if half else 'MISSED'}; rising with workers: "
        f"{'met' if rising else 'MISSED'}"
    )
    if args.no_doc:
        return
    raw_text = ", ".join(f"{k}: {v:.0f}/s" for k, v in raw.items())
    common.write_section(
        "throughput",
        f"""
## 3. Dispatch throughput (`bench/throughput.py`{" --quick" if args.quick else ""})

{common.machine_line()}

Workers: real devhost processes (`python -m routines.devhost --no-timers`), all consuming one queue with
the `host.json` settings (batch 16, new batch at 8 in flight, polling back-off to 1 s); agent: the fake
agent as a process (200 at once). Per worker count, {fires} fire messages are enqueued to surface in the
same second; throughput is agent calls per second from the first to the last. Every run must end
`succeeded` (checked in the runs table, 30 s after the last agent call). Worker counts are interleaved
over {rounds} round(s) so that load from other processes hits them alike; each count's best round is
its rate.

Ceiling, measured in the same run: the raw Azurite request rate with bare SDK clients doing the
dispatch path's request mix ({raw_text}; best {best:.0f} requests/s) ÷ {dispatch_side:.2f} storage
requests per fire on the dispatch side (receive share + dispatch + delete, counted with the hook) =
**{ceiling:.0f} fires/s**.

{common.table(headers, rows)}

Best of each: {summary}.

- At least half the ceiling: {common.verdict(half)} ({per_count}).
- Rising with workers: {common.verdict(rising)}.

CPU seconds are those used by each process from the enqueue to the last agent call (Azurite's Node
process, the devhost workers together, the fake agent); the machine has 2 cores for all of them.

Where a worker's time goes: `Dispatcher.handle` alone, one thread, 200 agent, per fire:

{cost_table}

With `skip` (the default) the run insert and the final write are two-row entity-group transactions
(run + overlap slot) plus one slot read; `allow_all` writes single rows.
""",
    )


if __name__ == "__main__":
    main()
