"""Tick cost against the number of routines (docs/guarantees.md #5).

For N routines seeded in Azurite (1k, 10k, 50k; ``--quick``: 1k, 10k), exactly 100 of them due before
the tick's horizon and the rest a month or more away, this runs ``scheduler.tick`` several times per N
and reports the storage requests of one tick (counted with the ``storage_clients`` hook) and its wall
time (median). The 100 due routines fire every two minutes (``20 */2 * * * *``) and each tick is given a
``now`` two minutes after the previous one, so every tick finds the same 100 due without re-seeding.
Ticks of the different N are interleaved (N1, N2, N3, N1, ...) so load from other processes hits all
N alike. The due-index range query is also timed alone.

Targets: requests per tick independent of N; tick time at 50k within 1.5x of 1k.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import common
from common import say

from routines import scheduler
from routines.runtime import storage_clients
from routines.store.tables import TableStore

DUE = 100
DUE_CRON = "20 */2 * * * *"


def population(n: int, first_due: datetime, now: datetime) -> list[Any]:
    far = common.second_cron(now + timedelta(days=40))
    due = common.ScheduleTrigger(type="schedule", cron_expression=DUE_CRON)
    routines = []
    for i in range(n):
        if i < DUE:
            routines.append(common.make_routine(common.routine_id(1, i), due, first_due, now))
        else:
            # spread far fires over a month, as a real population would be
            when = now + timedelta(days=40, seconds=i * 37 % (30 * 86400))
            routines.append(common.make_routine(common.routine_id(2, i), far, when, now))
    return routines


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: p.add_argument(
            "--profile", action="store_true", help="profile one tick per N with pyinstrument (bench/out/)"
        ),
    )
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 50_000]
    reps = 3 if args.quick else 5
    say(f"tick cost: N = {sizes}, {DUE} due per tick, {reps} ticks per N")
    say(common.machine_line())
    wall_now = datetime.now(UTC)
    # First due fire: second 20 of an even minute at least 5 minutes ahead (the ticks use synthetic
    # times from there on, two minutes apart; no consumer reads the queue).
    start = (wall_now + timedelta(minutes=5)).replace(second=20, microsecond=0)
    if start.minute % 2:
        start += timedelta(minutes=1)
    results: dict[int, dict[str, Any]] = {}
    with common.azurite() as emulator:
        counter = common.RequestCounter()
        apps: dict[int, tuple[TableStore, Any]] = {}
        for n in sizes:
            env = common.app_env(emulator.connection_string, f"tick{n}", f"tick-{n}")
            tables, queue = storage_clients(common.settings(env), hook=counter)
            store = TableStore(tables, f"tick{n}")
            store.ensure_tables()
            queue.ensure()
            routines = population(n, start, wall_now)
            seconds = common.seed(tables.get_table_client(store.routines_table), routines)
            say(
                f"  seeded {n:>6} routines ({len(routines) * 3} rows) in {seconds:5.1f} s "
                f"({n / seconds:,.0f} routines/s)"
            )
            apps[n] = (store, queue)
            results[n] = {
                "n": n,
                "seed_seconds": seconds,
                "ticks": [],
                "requests": [],
                "kinds": None,
                "query_seconds": [],
            }
        for rep in range(reps):
            now = start - timedelta(seconds=15) + timedelta(minutes=2 * rep)
            for n in sizes:
                store, queue = apps[n]
                counter.reset()
                began = time.perf_counter()
                report = scheduler.tick(store, queue, now, owner="bench")
                elapsed = time.perf_counter() - began
                requests = counter.total()
                assert (report.due, report.enqueued, report.advanced) == (DUE, DUE, DUE), report
                results[n]["ticks"].append(elapsed)
                results[n]["requests"].append(requests)
                results[n]["kinds"] = counter.by_kind()
                began = time.perf_counter()
                found = store.due_entries(scheduler.horizon(now + timedelta(minutes=2)))
                results[n]["query_seconds"].append(time.perf_counter() - began)
                assert len(found) == DUE
                say(f"  tick {rep + 1}/{reps} N={n:>6}: {requests} requests, {elapsed * 1000:7.1f} ms")
        if args.profile:
            from pyinstrument import Profiler

            for n in sizes:
                store, queue = apps[n]
                now = start - timedelta(seconds=15) + timedelta(minutes=2 * reps)
                profiler = Profiler(interval=0.0005)
                profiler.start()
                scheduler.tick(store, queue, now, owner="bench")
                profiler.stop()
                path = common.OUT / f"tick_cost_profile_{n}.txt"
                path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
                say(f"  profile of one tick at N={n}: {path}")

    for r in results.values():
        r["tick_median"] = common.median(r["ticks"])
        r["query_median"] = common.median(r["query_seconds"])
    small, large = results[sizes[0]], results[sizes[-1]]
    # The same tick (same rep) makes the same requests at every N; the first tick of a process reads
    # the lease row before writing it (later ones renew it with one conditional write, when the
    # store remembers its ETag), so compare rep by rep.
    same_requests = all(len({r["requests"][rep] for r in results.values()}) == 1 for rep in range(reps))
    ratio = large["tick_median"] / small["tick_median"]
    ratio_met = ratio <= 1.5
    common.save_json("tick_cost", results)

    rows = [
        (
            f"{r['n']:,}",
            f"{r['seed_seconds']:.0f} s",
            " / ".join(str(q) for q in r["requests"]),
            f"{r['tick_median'] * 1000:.0f} ms",
            f"{min(r['ticks']) * 1000:.0f}-{max(r['ticks']) * 1000:.0f} ms",
            f"{r['query_median'] * 1000:.1f} ms",
            f"{r['tick_median'] / small['tick_median']:.2f}x",
        )
        for r in results.values()
    ]
    headers = (
        "routines",
        "seeded in",
        "requests of each tick",
        "tick (median)",
        "tick (min-max)",
        "due query alone",
        "tick vs smallest N",
    )
    kinds = ", ".join(f"{k} {v}" for k, v in large["kinds"].items())
    plot(results, sizes)
    say()
    say(common.table(headers, rows))
    say(f"requests of one tick: {kinds}")
    say(
        f"requests per tick independent of N: {same_requests}; tick time at {sizes[-1]:,} = {ratio:.2f}x "
        f"of {sizes[0]:,} (target <= 1.5x): {'met' if ratio_met else 'MISSED'}"
    )
    if args.no_doc:
        return
    common.write_section(
        "tick_cost",
        f"""
## 1. Tick cost vs number of routines (`bench/tick_cost.py`{" --quick" if args.quick else ""})

{common.machine_line()}

N routines seeded in Azurite (`codec.create_routine_ops` rows, up to 100 rows per entity-group
transaction), {DUE} due before the tick's horizon, the rest weeks away. {reps} ticks per N, interleaved
across N; each tick is given a `now` two minutes after the previous one and the {DUE} due routines fire
every two minutes, so every tick finds exactly {DUE} due. Requests are counted with the
`storage_clients` hook; "due query alone" times the due-index range query by itself.

{common.table(headers, rows)}

The last tick's requests: {kinds}: the lease renewal (the first tick of a process also reads the lease
row), one due-range query, one send per fire, one advance transaction per 33 fires.

- Requests per tick independent of N: {common.verdict(same_requests)}.
- Tick time at {sizes[-1]:,} within 1.5x of {sizes[0]:,}: {common.verdict(ratio_met)} ({ratio:.2f}x).

![tick cost vs N](img/tick_cost.png)
""",
    )


def plot(results: dict[int, dict[str, Any]], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = sizes
    med = [results[n]["tick_median"] * 1000 for n in xs]
    lo = [med[i] - min(results[n]["ticks"]) * 1000 for i, n in enumerate(xs)]
    hi = [max(results[n]["ticks"]) * 1000 - med[i] for i, n in enumerate(xs)]
    left.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, label="tick wall time (median, min-max)")
    left.plot(xs, [results[n]["query_median"] * 1000 for n in xs], marker="s", label="due-range query alone")
    left.axhline(med[0] * 1.5, color="grey", linestyle="--", linewidth=1, label="1.5x of smallest N")
    left.set_xscale("log")
    left.set_xlabel("routines (log scale)")
    left.set_ylabel("ms")
    left.set_ylim(bottom=0)
    left.set_title(f"Tick time, {DUE} due fires")
    left.legend(fontsize=8)
    right.plot(xs, [results[n]["requests"][-1] for n in xs], marker="o", label="steady-state tick")
    right.set_xscale("log")
    right.set_ylim(bottom=0, top=max(results[n]["requests"][0] for n in xs) * 1.3)
    right.set_xlabel("routines (log scale)")
    right.set_ylabel("storage requests")
    right.set_title("Storage requests per tick")
    fig.tight_layout()
    common.IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(common.IMG / "tick_cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
