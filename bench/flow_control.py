"""Flow control: storage requests per fire with a rate limit, and the wait behind a freed permit.

1. Requests per fire (``requests_per_fire.measure``: tick, receive in batches of 16,
   ``Dispatcher.handle``, delete; every storage request counted with the ``storage_clients`` hook),
   in one run: plain, a concurrency key that never makes a fire wait, a rate limit that never makes
   a fire wait, a rate limit that makes half the fires wait, and both a key and a rate limit. The
   extra requests over plain are listed by phase and kind.
2. The wait behind a freed permit, through the real path: N routines on one concurrency key of limit 1
   fire in the same second (``scheduler.tick``, devhost worker processes with the ``host.json`` queue
   settings, the repair pass every 15 s as the app's timer runs it); the fake agent, a process, takes a
   fixed time to answer, so the runs queue. For each run after the first: from the previous run's end
   (its ``ended_at``, and the agent's answer in the agent's log) to the next run's agent start (the
   agent's log), with 1 and 2 workers.

Targets: a rate limit costs at most 3 storage requests per fire over plain; a run waiting for a permit
starts within 2 s of the release (p99).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import common
from azure.data.tables import TableServiceClient
from common import say
from on_time import RoutinesApp
from requests_per_fire import PHASES, measure

from routines import limits
from routines.models import Concurrency, RateLimit, Run, RunStatus
from routines.runtime import AzureQueue
from routines.store.tables import TableStore
from tests.fake_agent import FakeAgent

AGENT_SECONDS = 0.7  # every agent call of the wake-up part takes this long
EXTRA_TARGET = 3.0
WAKE_TARGET = 2.0
STALL_SECONDS = 30.0  # no run of the key started for this long (the agent takes 0.7 s): it is stuck


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- 1. requests per fire --------------------------------------------------------------------------


def per_kind(result: dict[str, Any]) -> dict[str, float]:
    """Requests per fire by ``phase kind``."""
    return {
        f"{phase} {kind}": n / result["fires"]
        for phase in PHASES
        for kind, n in result["kinds"][phase].items()
    }


def extra_kinds(result: dict[str, Any], plain: dict[str, Any]) -> str:
    mine, base = per_kind(result), per_kind(plain)
    diffs = {k: mine.get(k, 0.0) - base.get(k, 0.0) for k in {*mine, *base}}
    shown = [f"{k} {d:+.2f}" for k, d in sorted(diffs.items()) if abs(d) >= 0.005]
    return ", ".join(shown) or "none"


def _limit_row(row: Any) -> str:
    kind = row if isinstance(row, type) else type(row)
    return "the key's permits row" if kind is limits.Permits else "the key's starts row"


# What each store call (one storage request each) and each queue send is for, named from its arguments.
WHAT: dict[tuple[type, str], Callable[..., str]] = {
    (TableStore, "get_routine"): lambda *a: "read the routine",
    (TableStore, "get_run"): lambda *a: "read the run",
    (TableStore, "get_slot"): lambda *a: "read the overlap slot",
    (TableStore, "get_limit"): lambda kind, key: f"read {_limit_row(kind)}",
    (TableStore, "put_limit"): lambda row: f"{'insert' if row.etag is None else 'write'} {_limit_row(row)}",
    (TableStore, "write_run"): lambda run, etag, slot=None: (
        f"{'insert' if etag is None else 'write'} the run{' with its slot' if slot else ''}"
        f" ({RunStatus(run.status).value})"
    ),
    (TableStore, "unwatch"): lambda *a: "delete the watch",
    (AzureQueue, "send"): lambda message, delay_seconds=0: (
        f"send a {message.kind} message{' (delayed)' if delay_seconds >= 1 else ''}"
    ),
}


@contextlib.contextmanager
def store_calls() -> Iterator[Counter[str]]:
    """Count the dispatch path's store calls and queue sends by what they are for (``WHAT``), in
    this process, while the block runs: the bench wraps the methods, Routines' code is unchanged."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    originals = {(cls, name): getattr(cls, name) for cls, name in WHAT}
    own = {(cls, name) for cls, name in WHAT if name in vars(cls)}

    def wrapper(cls: type, name: str) -> Callable[..., Any]:
        original, what = originals[(cls, name)], WHAT[(cls, name)]

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                counts[what(*args, **kwargs)] += 1
            return original(self, *args, **kwargs)

        return counted

    for cls, name in WHAT:
        setattr(cls, name, wrapper(cls, name))
    try:
        yield counts
    finally:
        for (cls, name), original in originals.items():
            if (cls, name) in own:
                setattr(cls, name, original)
            else:
                delattr(cls, name)  # inherited: uncover the base class's again


def extra_calls(result: dict[str, Any], plain: dict[str, Any]) -> str:
    mine, base = result["calls"], plain["calls"]
    diffs = {
        k: (mine.get(k, 0) / result["fires"]) - (base.get(k, 0) / plain["fires"]) for k in {*mine, *base}
    }
    shown = [
        f"{k} {d:+.2f}"
        for k, d in sorted(diffs.items(), key=lambda kv: (-abs(round(kv[1], 2)), kv[0]))
        if abs(d) >= 0.005
    ]
    return ", ".join(shown) or "none"


def max_in_window(times: list[float], period: float) -> int:
    """The most of ``times`` falling in any ``period`` s (a sliding window)."""
    ordered = sorted(times)
    most, left = 0, 0
    for right, t in enumerate(ordered):
        while t - ordered[left] >= period:
            left += 1
        most = max(most, right - left + 1)
    return most


def shortest_span(times: list[float], n: int) -> float:
    """The shortest time in which ``n`` of ``times`` fell (at least the period, if the limit held)."""
    ordered = sorted(times)
    return min((ordered[i + n - 1] - ordered[i] for i in range(len(ordered) - n + 1)), default=float("nan"))


def requests_part(connection: str, fires: int) -> list[dict[str, Any]]:
    wait_limit, wait_period = fires // 2, 30  # the first half starts well within 30 s
    variants: list[tuple[str, str, dict[str, Any], int | None]] = [
        ("plain (overlap skip, no flow control)", "plain", {}, None),
        (
            "concurrency key, limit 1000 (no fire waits)",
            "ckey",
            {"concurrency": Concurrency(key="c", limit=1000)},
            None,
        ),
        (
            "rate limit 1000 per 60 s (no fire waits)",
            "rate",
            {"rate_limit": RateLimit(key="r", limit=1000, period_seconds=60)},
            None,
        ),
        (
            f"rate limit {wait_limit} per {wait_period} s (half the fires wait)",
            "ratewait",
            {"rate_limit": RateLimit(key="w", limit=wait_limit, period_seconds=wait_period)},
            wait_period,
        ),
        (
            "concurrency key 1000 + rate limit 1000 per 60 s",
            "both",
            {
                "concurrency": Concurrency(key="b", limit=1000),
                "rate_limit": RateLimit(key="b", limit=1000, period_seconds=60),
            },
            None,
        ),
    ]
    out = []
    with FakeAgent() as agent:
        for label, name, fields, period in variants:
            with store_calls() as calls:
                result = measure(connection, agent, name, fires, agent_name=name, timeout=180, **fields)
            result["calls"] = dict(calls)
            starts = agent.starts(name)
            keys = {(c.idempotency_key, c.attempt) for c in starts}
            assert len(starts) == fires == len(keys), (name, len(starts), len(keys))
            times = [c.received_at for c in starts]
            store = TableStore(TableServiceClient.from_connection_string(connection), f"rpf{name}")
            runs = [store.list_runs(common.routine_id(7, i), None, 5, None).items[0] for i in range(fires)]
            waited = [r.waited_seconds for r in runs if r.wait_reason]
            result.update(
                label=label,
                window=max(times) - min(times),
                max_in_period=max_in_window(times, period) if period else None,
                span=shortest_span(times, fields["rate_limit"].limit + 1) if period else None,
                limit=fields["rate_limit"].limit if "rate_limit" in fields else None,
                period=period,
                waited=len(waited),
                max_waited=max(waited, default=0.0),
                succeeded=sum(r.status == RunStatus.succeeded for r in runs),
            )
            say(
                f"  {label}: {result['per_fire']:.2f} per fire, starts over {result['window']:.1f} s, "
                f"idle receives {result['idle_receives']} · load {load()}"
            )
            out.append(result)
    return out


# --- 2. the wait behind a freed permit --------------------------------------------------------------


def runs_of(app: RoutinesApp, ids: list[str], deadline: float) -> dict[str, Run]:
    """Each routine's (one) run as stored once every one is terminal, or at ``deadline``."""
    latest: dict[str, Run] = {}
    while True:
        for rid in ids:
            if rid not in latest or not RunStatus(latest[rid].status).terminal:
                page = app.store.list_runs(rid, None, 5, None)
                if page.items:
                    latest[rid] = page.items[0]
        done = len(latest) == len(ids) and all(RunStatus(r.status).terminal for r in latest.values())
        if done or time.time() >= deadline:
            return latest
        time.sleep(0.5)


def wake_part(
    connection: str, agent: common.AgentProcess, workers: int, count: int, round_: int
) -> dict[str, Any]:
    """``count`` routines on a fresh key of limit 1, due in the same second, behind ``workers``
    devhost processes. Stops waiting when no run has started for ``STALL_SECONDS``."""
    name = f"wake{workers}w{round_}"
    app = RoutinesApp(connection, agent, name, workers)
    for host in app.hosts:
        host.log.unlink(missing_ok=True)
    app.start().start_repair()
    key = Concurrency(key=f"wake-{workers}-{round_}", limit=1)
    stalled = False
    try:
        when = common.tick_window(lead=20)
        ids = app.seed_due(0x60 + 16 * workers + round_, count, when, concurrency=key)
        report = app.tick()
        assert report.enqueued == count, report
        common.wait_until(when.timestamp())
        first: dict[str, common.AgentLine] = {}
        calls: list[common.AgentLine] = []
        progress = time.time()
        while len(first) < count:
            calls = [c for c in agent.starts() if c.routine_id in set(ids)]
            seen = len(first)
            first = {}
            for call in sorted(calls, key=lambda c: c.t):
                first.setdefault(call.routine_id, call)
            if len(first) > seen:
                progress = time.time()
            elif time.time() - progress > STALL_SECONDS:
                stalled = True
                break
            time.sleep(0.5)
        runs = runs_of(app, ids, time.time() + (5 if stalled else 60))
        permits = app.store.get_limit(limits.Permits, key.key)
    finally:
        app.stop()
    warnings = sum(
        host.log.read_text(encoding="utf-8", errors="replace").count("kept changing") for host in app.hosts
    )
    by_run = {r.id: r for r in runs.values()}
    holders = [by_run[h] for h in (permits.holders if permits else {}) if h in by_run]
    ordered = sorted(first.values(), key=lambda c: c.t)
    gaps: dict[str, list[float]] = {"from_end": [], "from_answer": [], "to_handled": [], "to_call": []}
    overlaps = 0
    for prev, nxt in itertools.pairwise(ordered):
        answered = prev.t + prev.delay
        overlaps += nxt.t < answered
        gaps["from_answer"].append(nxt.t - answered)
        ended, started = runs.get(prev.routine_id), runs.get(nxt.routine_id)
        if ended and ended.ended_at and started and started.started_at:
            gaps["from_end"].append(nxt.t - ended.ended_at.timestamp())
            gaps["to_handled"].append(started.started_at.timestamp() - ended.ended_at.timestamp())
            gaps["to_call"].append(nxt.t - started.started_at.timestamp())
    statuses = dict(Counter(RunStatus(run.status).value for run in runs.values()))
    # When the last fire wrote itself into the line (it waited from then until its start), against
    # the first run's end: positive when the line was still being formed at the first release.
    joined = [
        r.started_at.timestamp() - r.waited_seconds
        for r in runs.values()
        if r.started_at and r.waited_seconds
    ]
    first_run = runs.get(ordered[0].routine_id) if ordered else None
    first_end = first_run.ended_at.timestamp() if first_run and first_run.ended_at else float("nan")
    return {
        "workers": workers,
        "round": round_ + 1,
        "count": count,
        "started": len(first),
        "stalled": stalled,
        "holders": [f"{r.id} ({RunStatus(r.status).value})" for r in holders],
        "duplicates": len(calls) - len(first),
        "overlaps": overlaps,
        "statuses": statuses,
        "warnings": warnings,
        "first_lag": ordered[0].t - ordered[0].scheduled_for if ordered else float("nan"),
        "window": ordered[-1].t - ordered[0].t if ordered else float("nan"),
        # the share of the time from the first start to the last answer that the one permit was used
        "busy": (
            sum(c.delay for c in ordered) / (ordered[-1].t + ordered[-1].delay - ordered[0].t)
            if ordered
            else float("nan")
        ),
        "gaps": {k: common.lag_summary(v) for k, v in gaps.items()},
        "later": common.lag_summary(gaps["from_end"][1:]),  # without the first release
        "seated": max(joined) - first_end if joined else float("nan"),
        "raw": gaps,
        "load": load(),
    }


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    args = common.arguments(__doc__.split("\n")[0])
    fires = 50 if args.quick else 200
    count = 20 if args.quick else 100
    rounds = 1 if args.quick else 2
    say(f"flow control: {fires} fires per request-count variant; {count} runs on a key of limit 1")
    machine = common.machine_line()  # the load before the run, for the document
    say(machine)
    with common.azurite() as emulator:
        conn = emulator.connection_string
        say("1. requests per fire")
        variants = requests_part(conn, fires)
        say(f"2. wait behind a freed permit (agent answers after {AGENT_SECONDS} s)")
        agent = common.AgentProcess(
            common.OUT / "flow_control_agent.jsonl", "--slow-rate", "1", "--slow-seconds", str(AGENT_SECONDS)
        )
        wakes = []
        try:
            for workers in (1, 2):
                for round_ in range(rounds):
                    w = wake_part(conn, agent, workers, count, round_)
                    g = w["gaps"]["from_end"]
                    say(
                        f"  {workers} worker(s), round {round_ + 1}: {w['started']}/{count} started"
                        f"{' (STALLED)' if w['stalled'] else ''}, end -> next start p50 {g['p50']:.2f} s, "
                        f"p99 {g['p99']:.2f} s, max {g['max']:.2f} s; overlaps {w['overlaps']}, runs "
                        f"{w['statuses']}, permit held by {w['holders']} · load {w['load']}"
                    )
                    wakes.append(w)
        finally:
            agent.stop()
    common.save_json("flow_control", {"requests": variants, "wake": wakes})
    report(args, variants, wakes, fires, machine)


def num(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def trio(s: dict[str, float]) -> str:
    return f"{num(s['p50'])} / {num(s['p99'])} / {num(s['max'])}"


def plural(workers: int) -> str:
    return f"{workers} worker{'s' if workers > 1 else ''}"


def wake_met(w: dict[str, Any]) -> bool:
    return bool(
        w["gaps"]["from_end"]["p99"] <= WAKE_TARGET
        and w["started"] == w["count"]
        and w["overlaps"] == 0
        and w["statuses"] == {"succeeded": w["count"]}
    )


def request_lines(fires: int, variants: list[dict[str, Any]]) -> tuple[str, str]:
    """Part 1 printed, and its part of the document."""
    plain, _, rate, ratewait, _ = variants
    over = {v["name"]: v["per_fire"] - plain["per_fire"] for v in variants}
    headers = ("variant", "tick", "receive", "dispatch", "delete", "total per fire", "over plain")
    rows = [
        (
            v["label"],
            *(f"{v['per_phase'][p]:.2f}" for p in PHASES),
            f"**{v['per_fire']:.2f}**",
            f"{over[v['name']]:+.2f}",
        )
        for v in variants
    ]
    rate_met = over["rate"] <= EXTRA_TARGET
    retries = sum(n for what, n in ratewait["calls"].items() if what.startswith("send a retry"))
    waited = ratewait["waited"]
    per_waiting = (ratewait["per_fire"] - rate["per_fire"]) * fires / waited if waited else float("nan")
    whats = {v["name"]: f"{extra_calls(v, plain)}; by kind: {extra_kinds(v, plain)}" for v in variants[1:]}
    table = common.table(headers, rows)
    span_text = ""
    if ratewait["max_in_period"] > ratewait["limit"]:
        span_text = (
            f" (start {ratewait['limit'] + 1} reached the agent {ratewait['span']:.3f} s after the first: "
            "a start is logged in the window at the `now` its handler began with, before the reads and "
            "the two writes that come before the agent call, so calls reach the agent up to that much "
            "closer together than the window says)"
        )
    printed = "\n".join(
        [
            table,
            *(f"  {v['name']} over plain, per fire: {whats[v['name']]}" for v in variants[1:]),
            f"rate limit where fires wait: {waited} runs waited (at most {ratewait['max_waited']:.1f} s), "
            f"{retries} retry messages ({retries / max(waited, 1):.2f} per waiting run), {per_waiting:.2f} "
            f"more requests per waiting run; most starts in any {ratewait['period']} s: "
            f"{ratewait['max_in_period']} (limit {ratewait['limit']}; the shortest span of limit + 1 starts: "
            f"{ratewait['span']:.3f} s); succeeded {ratewait['succeeded']}",
            f"rate limit, nothing waits: {over['rate']:+.2f} per fire over plain: "
            f"{'met' if rate_met else 'MISSED'}",
        ]
    )
    doc = f"""
**Requests per fire.** As in [section 2](#2-storage-requests-per-fire-benchrequests_per_firepy), every
variant in the same run: {fires} routines due in the same second, one `scheduler.tick`, the messages
received in batches of 16, each passed to `Dispatcher.handle` (one thread) and deleted; every storage
request counted with the `storage_clients` hook, divided by the number of fires. Agent: the fake
agent, 200 at once. Each variant has keys of its own.

{table}

What the requests over plain are for, per fire: the dispatch path's store calls and queue sends
(one storage request each), counted by what they do with wrappers the bench puts around `TableStore`
and `AzureQueue`; then the same by kind of request, from the hook.

- Concurrency key: {whats["ckey"]}.
- Rate limit, nothing waits: {whats["rate"]}.
- Rate limit, fires wait: {whats["ratewait"]}.
- Key and rate limit: {whats["both"]}.

- A rate limit costs at most {EXTRA_TARGET:.0f} requests per fire over plain when nothing waits:
  {common.verdict(rate_met)} ({over["rate"]:+.2f}): a read of the key's `limits:starts:<key>` row (the
  window, and its etag) and an etag-conditional write of it with the new start (an insert for the
  key's first start).
- A concurrency key costs {over["ckey"]:+.2f} (the target of +3 is {common.verdict(over["ckey"] <= 3)}):
  taking a permit is a read and a conditional write of `limits:permits:<key>`, giving it back another
  read and write, as the row has changed since the take whenever another run took, waited or gave
  back. What bounds it: the row lives in partition `limits` and the run in its routine's, so neither
  write can ride in the run's own entity-group transaction, and a conditional write needs the row's
  current etag. Going under +3 would take a release that writes on the etag remembered from the take
  (it saves the read only when nothing happened on the key in between), or a row per permit (taken by
  an insert-if-absent, given back by a delete, no reads), at the cost of the line of waiters.
- Both on one routine: {over["both"]:+.2f}, the sum: two rows, each read and written on its own.
- Half the fires over the limit ({ratewait["limit"]} starts per {ratewait["period"]} s): {waited} runs
  waited (at most {ratewait["max_waited"]:.1f} s) and all {ratewait["succeeded"]} succeeded; the most
  agent starts in any {ratewait["period"]} s were {ratewait["max_in_period"]}{span_text}. Each waiting
  run cost {per_waiting:.2f} requests more than a run that did not wait: its step written `pending` (in the
  fire's own run insert), a delayed retry message (send, receive share, delete), and on its arrival
  the routine, the run and the starts row read again, then the lease written (a wait again costs the
  message, the reads and a write once more); the final write reads the overlap slot, whose etag the
  fire's message knew but did not store. {retries} retry messages
  for {waited} waiting runs: every run told to wait is given the same instant, when the oldest start
  leaves the window (`limits.take` returns `recent[-limit][0] + period`), so they all come back
  together, and one that finds the window still full waits again, for the next start to leave it
  ({retries - waited} such waits again here).
"""
    return printed, doc


def round_facts(w: dict[str, Any]) -> str:
    seated = (
        ""
        if math.isnan(w["seated"])
        else f"the last fire joined the line {w['seated']:.2f} s after the first run's end; "
    )
    statuses = ", ".join(f"{n} {status}" for status, n in w["statuses"].items())
    return (
        f"{plural(w['workers'])}, round {w['round']}: the first run started {w['first_lag']:.2f} s after its "
        f"time, the last {w['window']:.1f} s after the first; {seated}runs at the end: {statuses}; agent "
        f"calls overlapping another {w['overlaps']}, duplicate starts {w['duplicates']}, releases given up "
        f'after lost races ("kept changing" in the worker logs) {w["warnings"]}; load after {w["load"]}.'
    )


def wake_lines(wakes: list[dict[str, Any]]) -> tuple[str, str]:
    """Part 2 printed, and its part of the document."""
    headers = (
        "workers",
        "round",
        "runs started",
        "waits measured",
        "end of a run → next agent start: p50 s",
        "p99 s",
        "max s",
        "the first release",
        "p99 after the first",
        "agent answer → next start: p50 / p99 / max s",
        "end → next run handled: p50 / p99 / max s",
        "handled → agent start: p50 / p99 s",
        "permit in use",
    )
    rows = [
        (
            w["workers"],
            w["round"],
            f"{w['started']} of {w['count']}{' (**stalled**)' if w['stalled'] else ''}",
            w["gaps"]["from_end"]["n"],
            num(w["gaps"]["from_end"]["p50"]),
            f"**{num(w['gaps']['from_end']['p99'])}**",
            num(w["gaps"]["from_end"]["max"]),
            num(w["raw"]["from_end"][0]) if w["raw"]["from_end"] else "-",
            num(w["later"]["p99"]),
            trio(w["gaps"]["from_answer"]),
            trio(w["gaps"]["to_handled"]),
            f"{num(w['gaps']['to_call']['p50'])} / {num(w['gaps']['to_call']['p99'])}",
            "-" if w["stalled"] else f"{w['busy']:.0%}",
        )
        for w in wakes
    ]
    facts = "\n".join(f"- {round_facts(w)}" for w in wakes)
    counts = sorted({w["workers"] for w in wakes})
    verdicts = [(n, all(wake_met(w) for w in wakes if w["workers"] == n)) for n in counts]
    table = common.table(headers, rows)
    printed = "\n".join(
        [
            table,
            facts,
            *(
                f"{plural(w['workers'])}, round {w['round']}: STALLED after {w['started']} of {w['count']} "
                f"starts; the permit is held by {w['holders']}"
                for w in wakes
                if w["stalled"]
            ),
            *(
                f"{plural(n)}: p99 end -> next start <= {WAKE_TARGET} s {'met' if m else 'MISSED'}"
                for n, m in verdicts
            ),
        ]
    )
    one = next((w for w in wakes if w["workers"] == 1 and not w["stalled"]), wakes[0])
    stalls = [w for w in wakes if w["stalled"]]
    stall_text = ""
    if stalls:
        where = ", ".join(f"{plural(w['workers'])}, round {w['round']}" for w in stalls)
        stall_text = f"""
**Stalled: a permit lost for good** ({where}). After {", ".join(str(w["started"]) for w in stalls)}
start(s), no run of the key started for {STALL_SECONDS:.0f} s; the permits row still named as its
holder a run that had ended ({"; ".join(", ".join(w["holders"]) for w in stalls)}), and the worker
logs held {", ".join(str(w["warnings"]) for w in stalls)} "kept changing" warning(s). The release
(`limits.give_back`) tries the row's conditional write 10 times in a row; the first run ended while
the other fires (up to 16 at once per worker) were writing themselves into the line of the same row,
all 10 writes lost their race, and `give_back` logged the warning and returned. The run's final
effects then went on to `Unwatch`, so the repair pass, which gives back the permit of a finished run
it finds through its watch, never sees it, and nothing else frees a permit whose holder has ended:
each waiting run looks again every 5 minutes, finds 1 of 1 taken, and waits again. The key stays
blocked.
"""
    verdict_lines = "\n".join(
        f"- A run behind a freed permit starts within {WAKE_TARGET:.0f} s of the release (p99), "
        f"{plural(n)}: {common.verdict(m)}."
        for n, m in verdicts
    )
    later = [w["later"]["p99"] for w in wakes if not w["stalled"]]
    firsts = [w["raw"]["from_end"][0] for w in wakes if w["raw"]["from_end"]]
    doc = f"""
**The wait behind a freed permit.** {wakes[0]["count"]} routines on one concurrency key of limit 1 (a
fresh key each round), due in the same second, through the real path: `scheduler.tick` enqueues the
fires; devhost worker processes (`--no-timers`, host.json queue settings: batch 16, a new batch at 8
in flight, polling back-off to 1 s) run the dispatcher; the repair pass runs every 15 s beside them,
as the app's timer does; the fake agent, a process, answers every call after {AGENT_SECONDS} s, so
the runs queue for the permit. For each run after the first: from the previous run's end (its
`ended_at`; and its agent answer, from the agent's log) to the next run's agent call (the agent's
log). "End → next run handled" ends at the next run's `started_at`, set when its handler began (so it
covers the final write, the release and the wake-up message's time in the queue); "handled → agent
start" is the rest (the reads, the claim write). "Permit in use": agent time ÷ (last answer - first
call). A round stops waiting when no run has started for {STALL_SECONDS:.0f} s.

{table}

{facts}

{verdict_lines}
{stall_text}
**The first release** ({", ".join(f"{x:.2f}" for x in firsts)} s; after it, p99
{", ".join(f"{x:.2f}" for x in later)} s) comes while the line is still being formed (the last fire
joined it {", ".join(num(w["seated"]) for w in wakes if not w["stalled"])} s after the first run's
end). The {wakes[0]["count"]} fires are handled up to 16 at once per worker, and each writes itself
into the line with a read and a conditional write of the one permits row, read again on every lost
race; the release has to win that row too, and a worker with more than 8 messages in flight does not
fetch the next batch (`newBatchThreshold`), so the wake-up message waits behind the burst. With under
a hundred waits in a round, the p99 is its longest wait.

**After it**, the permit passes at once: the ending run's `ReleasePermit`, after its final write,
runs `limits.give_back`: one read and one conditional write of the permits row hand the permit to the
first in line, and that run's start message is sent with no delay. What remains is the queue: a
worker finds the message at its next poll. The devhost's poller (`QueuePoller._run`,
`routines/devhost/queues.py`, the host.json queue semantics) restarts its idle back-off at each receive
that brings messages, then waits 0.1, 0.2, 0.4, 0.8 s, then 1 s (`maxPollingInterval`) between empty
polls. With one worker its last receive with a message was the previous run's start message, one
agent call ({AGENT_SECONDS} s) and a few writes before the release, so the release falls inside the
0.8 s wait that began 0.7 s after that receive and the message waits out the rest of it: about the
same time every time (p50 {one["gaps"]["from_end"]["p50"]:.2f} s). With two workers the idle one polls
once a second at a phase of its own and the first to poll takes it. The bound is
`maxPollingInterval` plus the handling (tens of ms); it is also why one permit is in use only
{one["busy"]:.0%} of the time with one worker: a key of limit L runs at most L ÷ (agent time + the
wake-up) runs a second. The worker that gives a permit back could start the run it hands it to
itself (as `_advance` starts one of several ready steps and sends messages for the others) instead of
going through the queue.
"""
    return printed, doc


def report(
    args: Any, variants: list[dict[str, Any]], wakes: list[dict[str, Any]], fires: int, machine: str
) -> None:
    requests_printed, requests_doc = request_lines(fires, variants)
    wake_printed, wake_doc = wake_lines(wakes)
    say()
    say(requests_printed)
    say()
    say(wake_printed)
    if args.no_doc:
        return
    quick = " --quick" if args.quick else ""
    common.write_section(
        "flow_control",
        f"""
## 10. Flow control: requests per fire, and the wait behind a freed permit (`bench/flow_control.py`{quick})

{machine}

{requests_doc.strip()}

{wake_doc.strip()}
""",
    )


if __name__ == "__main__":
    main()
