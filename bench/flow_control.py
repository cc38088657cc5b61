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
    shown = [f"{k} {d:+.2f}" for k, d in sorted(diffs.items(), key=lambda kv: -abs(kv[1])) if abs(d) >= 0.005]
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


def requests_part(connection: str, fires: int) -> list[dict[str, Any]]:
    wait_limit, wait_period = fires // 2, 5
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
    """Each routine's (one) run, once every one is terminal or at ``deadline``."""
    done: dict[str, Run] = {}
    while time.time() < deadline and len(done) < len(ids):
        for rid in ids:
            if rid not in done:
                page = app.store.list_runs(rid, None, 5, None)
                if page.items and RunStatus(page.items[0].status).terminal:
                    done[rid] = page.items[0]
        time.sleep(0.5)
    return done


def wake_part(connection: str, agent: common.AgentProcess, workers: int, count: int) -> dict[str, Any]:
    name = f"wake{workers}w"
    app = RoutinesApp(connection, agent, name, workers).start().start_repair()
    try:
        when = common.tick_window(lead=20)
        key = Concurrency(key=f"wake-{workers}", limit=1)
        ids = app.seed_due(60 + workers, count, when, concurrency=key)
        report = app.tick()
        assert report.enqueued == count, report
        deadline = when.timestamp() + 60 + count * 5
        common.wait_until(when.timestamp())
        first: dict[str, common.AgentLine] = {}
        calls: list[common.AgentLine] = []
        while time.time() < deadline and len(first) < count:
            calls = [c for c in agent.starts() if c.routine_id in set(ids)]
            first = {}
            for call in sorted(calls, key=lambda c: c.t):
                first.setdefault(call.routine_id, call)
            time.sleep(0.5)
        runs = runs_of(app, ids, deadline + 30)
    finally:
        app.stop()
    warnings = sum(
        host.log.read_text(encoding="utf-8", errors="replace").count("kept changing") for host in app.hosts
    )
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
    waited = [r.waited_seconds for r in runs.values()]
    return {
        "workers": workers,
        "count": count,
        "started": len(first),
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
        "max_waited": max(waited, default=float("nan")),
        "gaps": {k: common.lag_summary(v) for k, v in gaps.items()},
        "raw": gaps,
        "load": load(),
    }


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    args = common.arguments(__doc__.split("\n")[0])
    fires = 50 if args.quick else 200
    count = 20 if args.quick else 100
    say(f"flow control: {fires} fires per request-count variant; {count} runs on a key of limit 1")
    say(common.machine_line())
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
                w = wake_part(conn, agent, workers, count)
                g = w["gaps"]["from_end"]
                say(
                    f"  {workers} worker(s): {w['started']}/{count} started, release -> next start p50 "
                    f"{g['p50']:.2f} s, p99 {g['p99']:.2f} s, max {g['max']:.2f} s; overlaps "
                    f"{w['overlaps']}, runs {w['statuses']} · load {w['load']}"
                )
                wakes.append(w)
        finally:
            agent.stop()
    common.save_json("flow_control", {"requests": variants, "wake": wakes})
    report(args, variants, wakes, fires)


def trio(s: dict[str, float]) -> str:
    return f"{s['p50']:.2f} / {s['p99']:.2f} / {s['max']:.2f}"


def report(args: Any, variants: list[dict[str, Any]], wakes: list[dict[str, Any]], fires: int) -> None:
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
    wake_headers = (
        "workers",
        "runs",
        "waits measured",
        "end of a run → next agent start: p50 s",
        "p99 s",
        "max s",
        "agent answer → next start: p50 / p99 / max s",
        "end → next run handled: p50 / p99 / max s",
        "handled → agent start: p50 / p99 s",
        "permit in use",
    )
    wake_rows = [
        (
            w["workers"],
            w["count"],
            w["gaps"]["from_end"]["n"],
            f"{w['gaps']['from_end']['p50']:.2f}",
            f"**{w['gaps']['from_end']['p99']:.2f}**",
            f"{w['gaps']['from_end']['max']:.2f}",
            trio(w["gaps"]["from_answer"]),
            trio(w["gaps"]["to_handled"]),
            f"{w['gaps']['to_call']['p50']:.2f} / {w['gaps']['to_call']['p99']:.2f}",
            f"{w['busy']:.0%}",
        )
        for w in wakes
    ]
    checks = [
        (
            w["workers"],
            w["gaps"]["from_end"]["p99"] <= WAKE_TARGET
            and w["started"] == w["count"]
            and w["overlaps"] == 0
            and w["statuses"] == {"succeeded": w["count"]},
        )
        for w in wakes
    ]
    facts = "; ".join(
        f"{w['workers']} worker{'s' if w['workers'] > 1 else ''}: the first run started "
        f"{w['first_lag']:.2f} s after its time, the last {w['window']:.1f} s after the first; runs at "
        f"the end: {', '.join(f'{n} {status}' for status, n in w['statuses'].items())}; agent calls "
        f"overlapping another {w['overlaps']}, duplicate starts "
        f'{w["duplicates"]}, permit releases given up after lost races ("kept changing" in the worker '
        f"logs) {w['warnings']}; load after {w['load']}"
        for w in wakes
    )
    say()
    say(common.table(headers, rows))
    for v in variants[1:]:
        say(f"  {v['name']} over plain, per fire: {whats[v['name']]}")
    say(
        f"rate limit where fires wait: {waited} runs waited (at most {ratewait['max_waited']:.1f} s), "
        f"{retries} retry messages ({retries / max(waited, 1):.2f} per waiting run), "
        f"{per_waiting:.2f} more requests per waiting run; most starts in any {ratewait['period']} s: "
        f"{ratewait['max_in_period']} (limit {ratewait['limit']}); succeeded {ratewait['succeeded']}"
    )
    say(
        f"rate limit, nothing waits: {over['rate']:+.2f} per fire over plain: "
        f"{'met' if rate_met else 'MISSED'}"
    )
    say()
    say(common.table(wake_headers, wake_rows))
    say(facts)
    for workers, met in checks:
        say(f"{workers} worker(s): p99 end -> next start <= {WAKE_TARGET} s {'met' if met else 'MISSED'}")
    if args.no_doc:
        return
    one = wakes[0]
    wake_lines = "\n".join(
        f"- A run behind a freed permit starts within {WAKE_TARGET:.0f} s of the release (p99), "
        f"{w} worker{'s' if w > 1 else ''}: {common.verdict(met)}."
        for w, met in checks
    )
    quick = " --quick" if args.quick else ""
    common.write_section(
        "flow_control",
        f"""
## 10. Flow control: requests per fire, and the wait behind a freed permit (`bench/flow_control.py`{quick})

{common.machine_line()}

**Requests per fire.** As in [section 2](#2-storage-requests-per-fire-benchrequests_per_firepy), every
variant in the same run: {fires} routines due in the same second, one `scheduler.tick`, the messages
received in batches of 16, each passed to `Dispatcher.handle` (one thread) and deleted; every storage
request counted with the `storage_clients` hook, divided by the number of fires. Agent: the fake
agent, 200 at once. Each variant has keys of its own.

{common.table(headers, rows)}

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
  agent starts in any {ratewait["period"]} s were {ratewait["max_in_period"]}. Each waiting run cost
  {per_waiting:.2f} requests more than a run that did not wait: its step written `pending` (in the
  fire's own run insert), a delayed retry message (send, receive share, delete), and on its arrival
  the routine, the run and the starts row read again, then the lease written; the final write reads
  the overlap slot, whose etag the fire's message knew but did not store. {retries} retry messages
  for {waited} waiting runs ({retries / max(waited, 1):.2f} each): every run told to wait is given the
  same instant, when the oldest start leaves the window (`limits.take` returns `recent[-limit][0] +
  period`), so they all come back together and those that find the window full again wait again (a
  delay under a second is sent as 0 s, and the handler waits it out).

**The wait behind a freed permit.** {wakes[0]["count"]} routines on one concurrency key of limit 1, due
in the same second, through the real path: `scheduler.tick` enqueues the fires; devhost worker
processes (`--no-timers`, host.json queue settings: batch 16, polling back-off to 1 s) run the
dispatcher; the repair pass runs every 15 s beside them, as the app's timer does; the fake agent, a
process, answers every call after {AGENT_SECONDS} s, so the runs queue for the permit. For each run
after the first: from the previous run's end (its `ended_at`; and its agent answer, from the agent's
log) to the next run's agent call (the agent's log). "End → next run handled" ends at the next run's
`started_at`, set when its handler began (so it covers the final write, the release and the wake-up
message's time in the queue); "handled → agent start" is the rest (the reads, the claim write).
"Permit in use": agent time ÷ (last answer - first call).

{common.table(wake_headers, wake_rows)}

{facts}.

{wake_lines}

What sets the wait: the permit itself passes at once. The ending run's `ReleasePermit`, after its final
write, runs `limits.give_back`: one read and one conditional write of the permits row hand the permit
to the first in line, and that run's start message is sent with no delay. What remains is the queue:
a worker finds the message at its next poll. The devhost's poller (`QueuePoller._run`,
`routines/devhost/queues.py`, the host.json queue semantics) restarts its idle back-off at each receive
that brings messages and then waits 0.1, 0.2, 0.4, 0.8 s, then 1 s (`maxPollingInterval`) between
empty polls. With one worker its last receive with a message was the previous run's start message,
one agent call ({AGENT_SECONDS} s) and a few writes before the release, so the release falls inside
the 0.8 s wait that began 0.7 s after that receive, and the message waits out the rest of it: about the
same time every time (p50 {one["gaps"]["from_end"]["p50"]:.2f} s, p99
{one["gaps"]["from_end"]["p99"]:.2f} s). With two workers the idle one polls once a second at a phase
of its own and the first to poll takes it. The bound is `maxPollingInterval` plus the handling (tens of
ms); it is also why one permit is in use only {one["busy"]:.0%} of the time here: a key of limit L runs
at most L ÷ (agent time + the wake-up) runs a second. The worker that gives a permit back could start
the run it hands it to itself (as `_advance` starts one of several ready steps and sends messages for
the others) instead of going through the queue.
""",
    )


if __name__ == "__main__":
    main()
