"""A peer: the on-time workload through APScheduler 3, and what each system loses when killed.

APScheduler 3 runs in its own process: ``BackgroundScheduler`` with a ``SQLAlchemyJobStore`` on a SQLite
file and a ``ThreadPoolExecutor`` of 16 threads (the devhost's batch size), one ``DateTrigger`` job per
fire, ``misfire_grace_time`` 3600 s and ``coalesce`` (Routines' catch-up defaults), each job POSTing to
the same fake agent (a separate process) as Routines does. Routines runs as in ``on_time.py``: tick →
queue → one devhost worker process → dispatcher → agent.

1. On time: 100 and 1,000 fires due in the same second, lag = agent call received - scheduled time.
2. Kill and restart: fires spread over 20 s (10 per second), the scheduler process (APScheduler) or the
   devhost worker (Routines) SIGKILLed at 10 s and restarted at 12 s; the agent takes 0.5 s to answer,
   so calls are in flight at the kill. Counted: fires delivered (at least one agent call), lost (none),
   duplicated (more than one call). Routines' runs must all end ``succeeded``: the attempts in flight at
   the kill are taken over by the repair pass (run every 15 s here, as the app's timer does) once their
   45 s lease has lapsed, so this waits up to 3 minutes (``--quick``: it does not wait; in-flight fires
   are then reported as pending).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import common
from common import say

SPAN = 20  # seconds over which the kill workload's fires are spread
PER_SECOND = 10
KILL_AT, RESTART_AT = 10, 12
AGENT_DELAY = 0.5

# --- the APScheduler side ----------------------------------------------------------------------------

_client: Any = None
_client_lock = threading.Lock()


def call_agent(url: str, fire_id: str, scheduled: str) -> None:
    """The job: one POST to the agent, like Routines' HTTP backend (idempotency key = fire id + time)."""
    global _client
    import httpx

    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=30)
    key = f"{fire_id}:{scheduled}"
    _client.post(
        f"{url}/agents/noop/invocations",
        headers={"Idempotency-Key": key},
        json={
            "routine_id": fire_id,
            "idempotency_key": key,
            "scheduled_for": scheduled,
            "attempt": 1,
            "type": "invocation",
            "input": {"n": fire_id},
        },
    )


def child(db: str, url: str, plan: str | None) -> None:
    """The APScheduler process: optionally add the jobs of ``plan`` (``id@epoch,...`` file), then run."""
    import logging

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.date import DateTrigger

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{db}")},
        executors={"default": ThreadPoolExecutor(16)},
        job_defaults={"misfire_grace_time": 3600, "coalesce": True, "max_instances": 1},
        timezone=UTC,
    )
    if plan:
        for line in Path(plan).read_text().split():
            fire_id, epoch = line.split("@")
            when = datetime.fromtimestamp(int(epoch), UTC)
            scheduled = when.isoformat().replace("+00:00", "Z")
            scheduler.add_job(
                "apscheduler_peer:call_agent",
                DateTrigger(run_date=when),
                id=fire_id,
                args=[url, fire_id, scheduled],
                replace_existing=True,
            )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scheduler.start()
    print("apscheduler ready", flush=True)
    stop.wait()
    scheduler.shutdown(wait=False)


class ApsProcess:
    def __init__(self, db: Path, url: str, plan: dict[str, float] | None, log: Path) -> None:
        args = [common.PYTHON, __file__, "--child", str(db), url]
        if plan is not None:
            plan_file = db.with_suffix(".plan")
            plan_file.write_text("\n".join(f"{k}@{int(v)}" for k, v in plan.items()))
            args.append(str(plan_file))
        self._log = open(log, "a", encoding="utf-8")  # noqa: SIM115 - open while it runs
        self.process = subprocess.Popen(
            args,
            cwd=common.ROOT / "bench",
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        common._wait_for_line(self.process, r"apscheduler ready", 120, "APScheduler")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        common.stop_process(self.process)
        self._log.close()


def aps_on_time(agent: common.AgentProcess, count: int, tag: str, lead: float = 25) -> dict[str, Any]:
    db = common.OUT / f"aps_{tag}.sqlite"
    db.unlink(missing_ok=True)
    when = common.tick_window(lead)
    plan = {f"ap_{tag}_{i:05d}": when.timestamp() for i in range(count)}
    process = ApsProcess(db, agent.url, plan, common.OUT / f"aps_{tag}.log")
    try:
        assert time.time() < when.timestamp() - 1, "APScheduler took too long to store its jobs"
        calls = wait_for_calls(agent, set(plan), when.timestamp() + 60 + count / 5)
    finally:
        process.stop()
    first = first_calls(calls)
    lags = [c.t - c.scheduled_for for c in first.values()]
    return {
        "count": count,
        "delivered": len(first),
        "duplicates": len(calls) - len(first),
        "lags": lags,
        **common.lag_summary(lags),
    }


def wait_for_calls(agent: common.AgentProcess, ids: set[str], deadline: float) -> list[common.AgentLine]:
    calls: list[common.AgentLine] = []
    while time.time() < deadline:
        calls = [c for c in agent.starts() if c.routine_id in ids]
        if len({c.routine_id for c in calls}) >= len(ids):
            break
        time.sleep(0.25)
    return calls


def first_calls(calls: list[common.AgentLine]) -> dict[str, common.AgentLine]:
    first: dict[str, common.AgentLine] = {}
    for call in sorted(calls, key=lambda c: c.t):
        first.setdefault(call.routine_id, call)
    return first


def kill_window() -> datetime:
    """A whole second ~15 s ahead such that the workload's last fire is before the tick's horizon."""
    now = datetime.now(UTC)
    if now.second > 30:
        common.wait_until(
            (now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1)).timestamp()
        )
        now = datetime.now(UTC)
    return (now + timedelta(seconds=15)).replace(microsecond=0)


def kill_counts(agent: common.AgentProcess, schedule: dict[str, float]) -> dict[str, Any]:
    calls = [c for c in agent.starts() if c.routine_id in schedule]
    first = first_calls(calls)
    per_fire: dict[str, int] = {}
    for call in calls:
        per_fire[call.routine_id] = per_fire.get(call.routine_id, 0) + 1
    late = [c.t - c.scheduled_for for c in first.values()]
    return {
        "fires": len(schedule),
        "delivered": len(first),
        "lost": len(schedule) - len(first),
        "duplicated": sum(1 for n in per_fire.values() if n > 1),
        "extra_calls": len(calls) - len(first),
        "max_lag": max(late) if late else float("nan"),
        "late_over_5s": sum(1 for lag in late if lag > 5),
    }


def aps_kill(agent: common.AgentProcess) -> dict[str, Any]:
    db = common.OUT / "aps_kill.sqlite"
    db.unlink(missing_ok=True)
    t0 = kill_window()
    schedule = {f"ak_{i:04d}": t0.timestamp() + i // PER_SECOND for i in range(SPAN * PER_SECOND)}
    process = ApsProcess(db, agent.url, schedule, common.OUT / "aps_kill.log")
    common.wait_until(t0.timestamp() + KILL_AT)
    process.kill()
    common.wait_until(t0.timestamp() + RESTART_AT)
    process = ApsProcess(db, agent.url, None, common.OUT / "aps_kill.log")
    try:
        wait_for_calls(agent, set(schedule), t0.timestamp() + SPAN + 30)
        time.sleep(2)
    finally:
        process.stop()
    return kill_counts(agent, schedule)


# --- the Routines side ---------------------------------------------------------------------------------


def routines_kill_start(connection: str, agent: common.AgentProcess) -> dict[str, Any]:
    """Schedule the kill workload, kill the worker at 10 s and restart it at 12 s. Returns the state
    needed to finish counting later (the restarted worker keeps running)."""
    from on_time import RoutinesApp

    app = RoutinesApp(connection, agent, "kill", workers=1).start().start_repair()
    t0 = kill_window()
    now = datetime.now(UTC)
    routines = [
        common.make_routine(
            common.routine_id(80, i),
            common.second_cron(t0 + timedelta(seconds=i // PER_SECOND)),
            t0 + timedelta(seconds=i // PER_SECOND),
            now,
            timeout_seconds=30,
        )
        for i in range(SPAN * PER_SECOND)
    ]
    common.seed(app.tables.get_table_client(app.store.routines_table), routines)
    report = app.tick()
    assert report.enqueued == len(routines), report
    schedule = {r.id: (t0 + timedelta(seconds=i // PER_SECOND)).timestamp() for i, r in enumerate(routines)}
    common.wait_until(t0.timestamp() + KILL_AT)
    app.hosts[0].kill()
    killed_at = time.time()
    common.wait_until(t0.timestamp() + RESTART_AT)
    app.hosts[0].start()
    return {"app": app, "schedule": schedule, "t0": t0.timestamp(), "killed_at": killed_at}


def routines_kill_finish(state: dict[str, Any], agent: common.AgentProcess, wait: float) -> dict[str, Any]:
    from routines.models import RunStatus

    app, schedule = state["app"], state["schedule"]
    deadline = time.time() + wait
    statuses: dict[str, int] = {}
    try:
        while True:
            statuses = {}
            for rid in schedule:
                runs = app.store.list_runs(rid, None, 5, None).items
                status = runs[0].status.value if runs else "none"
                statuses[status] = statuses.get(status, 0) + 1
            if statuses.get(RunStatus.succeeded.value, 0) == len(schedule) or time.time() > deadline:
                break
            time.sleep(5)
    finally:
        app.stop()
    counts = kill_counts(agent, schedule)
    counts["runs"] = statuses
    counts["recovered_after"] = time.time() - state["killed_at"]
    # Fires not delivered whose messages are still in the queue (invisible: taken by the killed worker)
    # are pending, not lost: the queue hands them out again after the processing visibility timeout.
    waiting = app.queue.client.get_queue_properties().approximate_message_count
    counts["pending"] = min(counts["lost"], waiting)
    counts["lost"] -= counts["pending"]
    return counts


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        return
    args = common.arguments(__doc__.split("\n")[0])
    sizes = [100] if args.quick else [100, 1000]
    recovery_wait = 0 if args.quick else 180
    say(f"APScheduler peer: on time {sizes}; kill at {KILL_AT} s, restart at {RESTART_AT} s")
    say(common.machine_line())
    from on_time import RoutinesApp, routines_on_time

    on_time: list[tuple[str, dict[str, Any]]] = []
    with common.azurite() as emulator:
        fast = common.AgentProcess(common.OUT / "peer_agent.jsonl")
        slow = common.AgentProcess(
            common.OUT / "peer_slow_agent.jsonl", "--slow-rate", "1", "--slow-seconds", str(AGENT_DELAY)
        )
        try:
            say("  Routines: kill workload (worker SIGKILLed at 10 s, restarted at 12 s) ...")
            state = routines_kill_start(emulator.connection_string, slow)
            app = RoutinesApp(emulator.connection_string, fast, "peer", workers=1).start()
            try:
                for group, count in enumerate(sizes, start=70):
                    r = routines_on_time(app, count, group)
                    on_time.append(("Routines", r))
                    say(
                        f"  Routines, {count} fires: p50 {r['p50']:.2f} p99 {r['p99']:.2f} "
                        f"max {r['max']:.2f} s"
                    )
            finally:
                app.stop()
            for count in sizes:
                r = aps_on_time(fast, count, f"ot{count}")
                on_time.append(("APScheduler", r))
                say(
                    f"  APScheduler, {count} fires: p50 {r['p50']:.2f} p99 {r['p99']:.2f} "
                    f"max {r['max']:.2f} s"
                )
            say("  APScheduler: kill workload ...")
            aps = aps_kill(slow)
            say(f"  APScheduler kill: {aps}")
            say(f"  Routines: waiting up to {recovery_wait} s for in-flight fires to come back ...")
            left = max(0.0, state["t0"] + SPAN + 10 + recovery_wait - time.time())
            rts = routines_kill_finish(state, slow, left)
            say(f"  Routines kill: {rts}")
        finally:
            fast.stop()
            slow.stop()
    common.save_json("apscheduler_peer", {"on_time": on_time, "kill": {"Routines": rts, "APScheduler": aps}})
    from on_time import LAG_HEADERS, lag_row, plot

    plot(
        {f"{name}, {r['count']} fires": r["lags"] for name, r in on_time},
        "apscheduler_peer.png",
        "Lag of simultaneous fires: Routines (Azurite, 1 worker) vs APScheduler 3 (SQLite)",
    )
    lag_rows = [lag_row(name, r) for name, r in on_time]
    kill_headers = (
        "system",
        "fires",
        "delivered",
        "pending",
        "lost",
        "duplicated",
        "late > 5 s",
        "max lag",
        "runs at the end",
    )
    kill_rows = [
        (
            "Routines (worker killed)",
            rts["fires"],
            rts["delivered"],
            rts["pending"],
            rts["lost"],
            rts["duplicated"],
            rts["late_over_5s"],
            f"{rts['max_lag']:.0f} s",
            ", ".join(f"{k} {v}" for k, v in rts["runs"].items()),
        ),
        (
            "APScheduler (process killed)",
            aps["fires"],
            aps["delivered"],
            "-",
            aps["lost"],
            aps["duplicated"],
            aps["late_over_5s"],
            f"{aps['max_lag']:.0f} s",
            "-",
        ),
    ]
    say()
    say(common.table(LAG_HEADERS, lag_rows))
    say()
    say(common.table(kill_headers, kill_rows))
    if args.no_doc:
        return
    common.write_section(
        "apscheduler_peer",
        f"""
## 5. Peer: APScheduler 3 (`bench/apscheduler_peer.py`{" --quick" if args.quick else ""})

{common.machine_line()}

APScheduler 3 in its own process: `BackgroundScheduler`, `SQLAlchemyJobStore` on a SQLite file,
`ThreadPoolExecutor(16)`, one `DateTrigger` job per fire, `misfire_grace_time=3600`, `coalesce=True`;
each job POSTs to the same fake agent process Routines calls. Routines: tick → queue → one devhost
worker → dispatcher → agent, as in section 4.

**On time** (fires due in the same second; lag = agent call received - scheduled time):

{common.table(LAG_HEADERS, lag_rows)}

![lag, Routines vs APScheduler](img/apscheduler_peer.png)

**Kill and restart** ({SPAN * PER_SECOND} fires over {SPAN} s, {PER_SECOND} per second; SIGKILL at
{KILL_AT} s, restart at {RESTART_AT} s; the agent answers after {AGENT_DELAY} s so calls are in flight at
the kill):

{common.table(kill_headers, kill_rows)}

What each loses: APScheduler removes a `DateTrigger` job from its store when it hands it to the
executor, so jobs submitted but not finished when the process dies are gone; fires that fell due while
it was down run late on restart (within `misfire_grace_time`). Routines keeps every fire in the queue
until its run is written: fires due while the worker was down run when it is back; fires in flight
at the kill are taken over by the repair pass once their attempt's 45 s lease has lapsed (not after
the host's 10-minute processing visibility), and a fire whose agent call had already started is
started once more with the same `Idempotency-Key` (the documented at-least-once boundary).
"Pending" counts fires whose message the killed worker had taken and not finished, still invisible
in the queue when the script stopped waiting
({"it did not wait (`--quick`)" if args.quick else f"it waited up to {recovery_wait} s"}).
""",
    )


if __name__ == "__main__":
    main()
