"""On time: 100 and 1,000 routines due in the same second, through the real path.

``scheduler.tick`` (the body of the ``tick`` timer trigger, called here rather than waiting for the
devhost's minute timer) enqueues every fire with a visibility delay; devhost worker processes
(``python -m routines.devhost --no-timers``, the queue trigger with the ``host.json`` settings) receive
them and run ``Dispatcher.handle``; the fake agent, a separate process, logs when each call arrives.
Lag = agent call received - scheduled time, from the agent's log.

Targets: p99 ≤ 1 s for 100 simultaneous fires, ≤ 2.5 s for 1,000.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import common
from common import say

from routines import scheduler
from routines.runtime import storage_clients
from routines.store.tables import TableStore

TARGETS = {100: 1.0, 1000: 2.5}


class RoutinesApp:
    """One Routines app on Azurite: its tables and queue, ``workers`` devhost processes, the agent."""

    def __init__(self, connection: str, agent: common.AgentProcess, name: str, workers: int = 1) -> None:
        self.connection = connection
        self.agent = agent
        self.env = common.app_env(connection, name, name.lower() + "-q", agent.url)
        self.tables, self.queue = storage_clients(common.settings(self.env))
        self.store = TableStore(self.tables, name)
        self.store.ensure_tables()
        self.queue.ensure()
        self.hosts = [common.Devhost(self.env, common.OUT / f"{name}_worker{i}.log") for i in range(workers)]
        self._repairing = threading.Event()

    def start(self) -> RoutinesApp:
        for host in self.hosts:
            host.start(wait=False)
        for host in self.hosts:
            host.wait_ready()
        return self

    def stop(self) -> None:
        self._repairing.set()
        for host in self.hosts:
            host.stop()

    def start_repair(self, every: float = 15.0) -> RoutinesApp:
        """Run the repair pass every ``every`` s, as the app's ``repair`` timer does (the workers run
        with ``--no-timers``), until ``stop``."""
        from routines.repair import repair

        def loop() -> None:
            while not self._repairing.wait(every):
                try:
                    repair(self.store, self.queue, datetime.now(UTC), timedelta(seconds=90), "bench-repair")
                except Exception as exc:  # a storage blip: the next pass tries again
                    common.say(f"  repair pass failed: {exc}")

        threading.Thread(target=loop, name="repair", daemon=True).start()
        return self

    def seed_due(self, group: int, count: int, when: datetime, **fields: Any) -> list[str]:
        now = datetime.now(UTC)
        routines = [
            common.make_routine(common.routine_id(group, i), common.second_cron(when), when, now, **fields)
            for i in range(count)
        ]
        common.seed(self.tables.get_table_client(self.store.routines_table), routines)
        return [r.id for r in routines]

    def tick(self) -> scheduler.TickReport:
        return scheduler.tick(self.store, self.queue, datetime.now(UTC), owner="bench")


def routines_on_time(
    app: RoutinesApp, count: int, group: int, lead: float = 20, profile: str | None = None
) -> dict[str, Any]:
    """``count`` fires due in the same second through tick → queue → devhost → dispatcher → agent.
    ``profile``: py-spy the first worker for 10 s from a second before the fires are due (to that file)."""
    when = common.tick_window(lead)
    ids = set(app.seed_due(group, count, when))
    started = time.perf_counter()
    report = app.tick()
    tick_seconds = time.perf_counter() - started
    assert report.enqueued == count, report
    assert time.time() < when.timestamp() - 1, "the tick must end before the fires are due"
    deadline = when.timestamp() + 60 + count / 5
    calls: list[common.AgentLine] = []
    spy = None
    if profile and app.hosts[0].process is not None:
        common.wait_until(when.timestamp() - 1)
        spy = common.py_spy(app.hosts[0].process.pid, common.OUT / profile, 10)
    common.wait_until(when.timestamp())
    while time.time() < deadline:
        calls = [c for c in app.agent.starts() if c.routine_id in ids]
        if len({c.routine_id for c in calls}) >= count:
            break
        time.sleep(0.25)
    if spy is not None:
        spy.wait(60)
    first: dict[str, common.AgentLine] = {}
    for call in sorted(calls, key=lambda c: c.t):
        first.setdefault(call.routine_id, call)
    lags = [c.t - c.scheduled_for for c in first.values()]
    return {
        "count": count,
        "delivered": len(first),
        "duplicates": len(calls) - len(first),
        "tick_seconds": tick_seconds,
        "lags": lags,
        **common.lag_summary(lags),
    }


def plot(series: dict[str, list[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 4))
    top = max((max(v) for v in series.values() if v), default=1.0)
    bins = [i * top / 40 for i in range(41)]
    for label, lags in series.items():
        hist.hist(lags, bins=bins, alpha=0.55, label=label)
        ordered = sorted(lags)
        cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    hist.set_xlabel("lag: agent called - scheduled time (s)")
    hist.set_ylabel("fires")
    hist.legend(fontsize=8)
    cdf.set_xlabel("lag (s)")
    cdf.set_ylabel("share of fires")
    cdf.axhline(0.99, color="grey", linestyle="--", linewidth=1)
    cdf.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    common.IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(common.IMG / path, dpi=110)
    plt.close(fig)


def lag_row(label: str, r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        label,
        r["count"],
        r["delivered"],
        r["duplicates"],
        f"{r['p50']:.2f}",
        f"{r['p95']:.2f}",
        f"{r['p99']:.2f}",
        f"{r['max']:.2f}",
        f"{r['min']:.2f}",
    )


LAG_HEADERS = ("run", "fires", "delivered", "duplicates", "p50 s", "p95 s", "p99 s", "max s", "min s")


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: (
            p.add_argument(
                "--workers",
                type=int,
                nargs="+",
                default=None,
                help="devhost worker counts to run (default: 1 and 2; --quick: 1)",
            ),
            p.add_argument("--profile", action="store_true", help="py-spy the first worker during the 1,000"),
        ),
    )
    worker_counts = args.workers or ([1] if args.quick else [1, 2])
    sizes = [100, 1000]
    say(f"on time: {sizes} fires due in the same second, worker processes {worker_counts}")
    say(common.machine_line())
    results: list[tuple[int, dict[str, Any]]] = []
    with common.azurite() as emulator:
        agent = common.AgentProcess(common.OUT / "on_time_agent.jsonl")
        try:
            for workers in worker_counts:
                app = RoutinesApp(emulator.connection_string, agent, f"ontime{workers}w", workers).start()
                try:
                    for group, count in enumerate(sizes, start=30 + 10 * workers):
                        profile = f"on_time_{count}_{workers}w_profile" if args.profile else None
                        r = routines_on_time(app, count, group, profile=profile)
                        results.append((workers, r))
                        say(
                            f"  {workers} worker(s), {count} fires: p50 {r['p50']:.2f} s, "
                            f"p95 {r['p95']:.2f} s, "
                            f"p99 {r['p99']:.2f} s, max {r['max']:.2f} s, delivered {r['delivered']}, "
                            f"tick {r['tick_seconds']:.1f} s"
                        )
                finally:
                    app.stop()
        finally:
            agent.stop()
    common.save_json("on_time", [{"workers": w, **r} for w, r in results])
    plot(
        {f"{r['count']} fires, {w} worker{'s' if w > 1 else ''}": r["lags"] for w, r in results},
        "on_time.png",
        "Routines: lag of simultaneous fires (tick → queue → devhost → agent)",
    )
    rows = [lag_row(f"{w} worker{'s' if w > 1 else ''}", r) for w, r in results]
    checks = [
        (w, r["count"], r["p99"] <= TARGETS[r["count"]] and r["delivered"] == r["count"]) for w, r in results
    ]
    say()
    say(common.table(LAG_HEADERS, rows))
    for w, count, met in checks:
        say(f"{count} fires, {w} worker(s): p99 <= {TARGETS[count]} s {'met' if met else 'MISSED'}")
    if args.no_doc:
        return
    lines = "\n".join(
        f"- {count} simultaneous fires, {w} worker{'s' if w > 1 else ''}: p99 ≤ {TARGETS[count]} s "
        f"{common.verdict(met)}."
        for w, count, met in checks
    )
    common.write_section(
        "on_time",
        f"""
## 4. On time: simultaneous fires (`bench/on_time.py`{" --quick" if args.quick else ""})

{common.machine_line()}

N routines due in the same second, through the real path: `scheduler.tick` (the `tick` timer's body,
called directly instead of waiting for the minute timer) enqueues each fire with a visibility delay;
devhost worker processes (`--no-timers`, host.json queue settings: batch 16, new batch at 8 in flight)
run `Dispatcher.handle`; the fake agent, a separate process, logs when each call arrives. Lag = call
received - scheduled time.

{common.table(LAG_HEADERS, rows)}

{lines}

![lag distribution](img/on_time.png)
""",
    )


if __name__ == "__main__":
    main()
