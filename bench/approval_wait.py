"""Function time of a run held by an approval: granted after 1 minute vs after 1 hour (README "Steps").

A routine of three steps (``draft``, an agent; ``review``, an approval with a 2 h timeout; ``send``, an
agent using the draft's output) fires once from its daily schedule. Each case lives on a fake clock
against Azurite (its own tables and queue), from two minutes before the fire to past the approval's
timeout, with the Functions app's timers at their real cadence in fake time: the ``tick`` every minute
and the ``repair`` pass every 15 s (``function_app.py``), a worker taking each queue message when it
becomes visible in fake time and calling ``Dispatcher.deliver`` as the queue trigger does. The approval
is granted through ``Api.approve_step`` 1 minute (case 1) or 1 hour (case 2) after the run began
waiting; both cases cover the same window, so they differ only in how long the run waited.

Function time of the run = wall and thread CPU time of the queue trigger's invocations for it, of the
approve call, and the storage requests they make (counted with the ``storage_clients`` hook), plus the
repair pass's requests on the run's watch (reading the run, moving the watch). The timers' own cost
(lease, due query, watch query) is printed next to it: the same in both cases, since it does not depend
on the runs that wait. Target: flat, i.e. nothing runs for the run while it waits for a person.

Fake time: a message sent with a visibility delay is held by the bench and sent without delay once the
fake clock reaches its time (its send request is charged to the invocation that sent it); the
dispatcher's wait for an early arrival runs on the fake clock and is added to its wall time. The host's
idle queue polling is not counted (it polls whether or not a run waits).
"""

from __future__ import annotations

import base64
import functools
import heapq
import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import common
from common import say

from routines.agents.http import HttpAgentBackend
from routines.api import Api, Request
from routines.decide import FIRST_CHECK
from routines.dispatcher import Dispatcher
from routines.messages import DispatchMessage, whole_seconds
from routines.models import Run, RunStatus, scheduled_run_id
from routines.repair import repair
from routines.runtime import AzureQueue, storage_clients
from routines.scheduler import tick
from routines.store.tables import TableStore
from tests.fake_agent import FakeAgent
from tests.helpers import Clock

TICK_EVERY = timedelta(seconds=60)  # function_app.tick: "0 * * * * *"
REPAIR_EVERY = timedelta(seconds=15)  # function_app.repair: "*/15 * * * * *"
REPAIR_AFTER = timedelta(seconds=90)  # Settings.repair_after_seconds' default
BATCH = 16  # host.json queues.batchSize
PHASES = ("to waiting", "waiting", "approved", "after")
KINDS = ("dispatch", "host", "api", "repair (run's watch)", "tick", "repair")


@dataclass
class Spent:
    invocations: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    early: float = 0.0  # of ``wall``: the dispatcher's wait for a fire that surfaced early


class FakeTimeQueue:
    """The dispatch queue on Azurite with visibility delays on the fake clock. A message sent with a
    delay of a second or more is held here and sent, without delay, when the fake clock reaches its
    time; its send request is charged to the phase that sent it. ``outstanding`` counts the messages
    in Azurite not yet deleted, so the worker receives only when there is something to take."""

    def __init__(self, inner: AzureQueue, clock: Clock, counter: common.RequestCounter) -> None:
        self.inner, self.clock, self.counter = inner, clock, counter
        self.held: list[tuple[datetime, int, str, DispatchMessage]] = []
        self.order = itertools.count()
        self.outstanding = 0

    def send(self, message: DispatchMessage, delay_seconds: float = 0) -> None:
        wait = whole_seconds(delay_seconds)
        if wait:
            visible = self.clock() + timedelta(seconds=wait)
            heapq.heappush(self.held, (visible, next(self.order), self.counter.current, message))
            return
        self.inner.send(message)
        self.outstanding += 1

    def poison(self, text: str) -> None:
        self.inner.poison(text)

    def next_visible_at(self) -> datetime | None:
        return self.held[0][0] if self.held else None

    def release(self, now: datetime) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, phase, message = heapq.heappop(self.held)
            with self.counter.phase(phase):
                self.inner.send(message)
            self.outstanding += 1


class WatchWork:
    """The store as the repair pass sees it, with its work on a watch (reading the run, moving or
    dropping the watch) charged to its own phase, apart from the pass's lease and watch query."""

    def __init__(self, store: TableStore, counter: common.RequestCounter, phase: Callable[[], str]) -> None:
        self._store, self._counter, self._phase = store, counter, phase

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name not in ("get_run", "rewatch", "unwatch"):
            return attribute

        def charged(*args: Any, **kwargs: Any) -> Any:
            with self._counter.phase(f"{self._phase()}|repair (run's watch)"):
                return attribute(*args, **kwargs)

        return charged


class Case:
    """One fire of the gated routine on its own tables and queue, from ``start`` to ``end`` in fake time,
    approved ``wait`` after the run began waiting."""

    def __init__(
        self, name: str, connection: str, agent_url: str, start: datetime, wait: timedelta, timeout: int
    ) -> None:
        self.clock = Clock(start)
        self.wait, self.timeout = wait, timeout
        self.counter = common.RequestCounter()
        env = common.app_env(connection, name, f"{name}-q", agent_url)
        self.settings = common.settings(env)
        tables, inner = storage_clients(self.settings, hook=self.counter)
        plain_tables, _ = storage_clients(self.settings)  # the bench's own reads, not counted
        self.store = TableStore(tables, name)
        self.observer = TableStore(plain_tables, name)
        self.store.ensure_tables()
        inner.ensure()
        self.inner = inner
        self.queue = FakeTimeQueue(inner, self.clock, self.counter)
        self.slept = 0.0
        self.backend = HttpAgentBackend(agent_url, clock=self.clock)
        self.dispatcher = Dispatcher(
            self.store, self.queue, self.backend, clock=self.clock, sleep=self._sleep
        )
        self.api = Api(self.store, self.queue, self.settings, self.clock)
        self.repair_store = WatchWork(self.store, self.counter, lambda: self.phase)
        self.spent: dict[tuple[str, str], Spent] = defaultdict(Spent)
        self.phase = "setup"
        self.waiting_since: datetime | None = None
        self.approved_at: datetime | None = None
        self.fire_at = (start + timedelta(minutes=2)).replace(second=0, microsecond=0)
        self.routine_id = self._create()
        self.run_id = scheduled_run_id(self.routine_id, self.fire_at)
        self.phase = "to waiting"

    def _sleep(self, seconds: float) -> None:
        """The dispatcher's wait for an early arrival: fake time, added to the handler's wall time."""
        self.slept += seconds
        self.clock.sleep(seconds)

    def _create(self) -> str:
        body = {
            "name": "gated",
            "trigger": {
                "type": "schedule",
                "cron_expression": f"{self.fire_at.minute} {self.fire_at.hour} * * *",
            },
            "actions": [
                {"id": "draft", "type": "invocation", "agent_id": "draft", "input": "draft the report"},
                {"id": "review", "type": "approval", "timeout_seconds": self.timeout},
                {
                    "id": "send",
                    "type": "invocation",
                    "agent_id": "send",
                    "input": "send {{steps.draft.output}}",
                },
            ],
        }
        with self.counter.phase("setup"):
            response = self.api.handle(
                self.api.create_routine,
                Request("POST", {}, {}, {"content-type": "application/json"}, json.dumps(body).encode()),
            )
        assert response.status == 201, response.body
        return str(response.body["id"])

    def timed(self, kind: str, call: Callable[[], Any]) -> Any:
        phase = self.phase
        self.slept = 0.0
        with self.counter.phase(f"{phase}|{kind}"), common.Timer() as timer:
            result = call()
        spent = self.spent[(phase, kind)]
        spent.invocations += 1
        spent.wall += timer.wall + self.slept
        spent.cpu += timer.cpu
        spent.early += self.slept
        return result

    def run(self) -> Run | None:
        runs = self.observer.list_runs(self.routine_id, None, 5, None).items
        return next((r for r in runs if r.id == self.run_id), None)

    def _observe(self) -> None:
        """Move the run's phase on from what the run is now (read without counting)."""
        if self.phase == "to waiting":
            run = self.run()
            if run is not None and run.status is RunStatus.waiting:
                self.phase, self.waiting_since = "waiting", self.clock()
        elif self.phase == "approved":
            run = self.run()
            if run is not None and run.status.terminal:
                self.phase = "after"

    def drain(self) -> None:
        """The queue trigger: every message visible now, those sent meanwhile included."""
        client = self.inner.client
        while True:
            self.queue.release(self.clock())
            if not self.queue.outstanding:
                return
            with self.counter.phase(f"{self.phase}|host"):
                messages = list(
                    next(
                        client.receive_messages(
                            messages_per_page=BATCH, max_messages=BATCH, visibility_timeout=600
                        ).by_page(),
                        [],
                    )
                )
            for message in messages:
                body = base64.b64decode(message.content)
                deliver = functools.partial(
                    self.dispatcher.deliver, body, message.dequeue_count or 1, self.queue.poison
                )
                self.timed("dispatch", deliver)
                with self.counter.phase(f"{self.phase}|host"):
                    client.delete_message(message.id, message.pop_receipt)
                self.queue.outstanding -= 1
                self._observe()

    def approve(self) -> None:
        self.phase = "approved"
        self.approved_at = self.clock()
        request = Request(
            "POST",
            {"id": self.routine_id, "run_id": self.run_id, "step_id": "review"},
            {},
            {"content-type": "application/json"},
            b'{"comment": "ship it"}',
        )
        response = self.timed("api", lambda: self.api.handle(self.api.approve_step, request))
        assert response.status == 200, response.body

    def simulate(self, end: datetime) -> None:
        start = self.clock()
        next_tick = start.replace(second=0, microsecond=0) + TICK_EVERY
        next_repair = start.replace(second=(start.second // 15) * 15, microsecond=0) + REPAIR_EVERY
        while True:
            self.drain()
            approve_at = (
                self.waiting_since + self.wait
                if self.waiting_since is not None and self.phase == "waiting"
                else None
            )
            events = [next_tick, next_repair, self.queue.next_visible_at(), approve_at]
            moment = min(e for e in events if e is not None)
            if moment > end:
                return
            self.clock.now = max(self.clock.now, moment)
            if approve_at is not None and moment == approve_at:
                self.approve()
            if moment == next_tick:
                self.timed("tick", lambda: tick(self.store, self.queue, self.clock(), "bench"))
                next_tick += TICK_EVERY
            if moment == next_repair:
                self.timed(
                    "repair",
                    lambda: repair(self.repair_store, self.queue, self.clock(), REPAIR_AFTER, "bench"),
                )
                next_repair += REPAIR_EVERY

    def close(self) -> None:
        self.backend.close()

    def figures(self) -> dict[str, Any]:
        """Per (phase, kind): invocations, wall, CPU, storage requests."""
        out: dict[str, Any] = {}
        for phase in PHASES:
            for kind in KINDS:
                spent = self.spent.get((phase, kind), Spent())
                requests = self.counter.total(f"{phase}|{kind}")
                if spent.invocations or requests:
                    out[f"{phase}|{kind}"] = {**vars(spent), "requests": requests}
        return out


def summed(
    figures: dict[str, Any], kinds: tuple[str, ...], phases: tuple[str, ...] = PHASES
) -> dict[str, float]:
    total = {"invocations": 0.0, "wall": 0.0, "cpu": 0.0, "early": 0.0, "requests": 0.0}
    for key, value in figures.items():
        phase, kind = key.split("|")
        if phase in phases and kind in kinds:
            for field in total:
                total[field] += value[field]
    return total


def one_case(
    name: str, connection: str, agent_url: str, start: datetime, wait: timedelta, timeout: int
) -> dict[str, Any]:
    case = Case(name, connection, agent_url, start, wait, timeout)
    end = case.fire_at + timedelta(seconds=timeout) + REPAIR_AFTER + timedelta(minutes=2)
    try:
        case.simulate(end)
        run = case.observer.get_run(case.routine_id, case.run_id)[0]
        watches = [w for w in case.observer.watched(end + timedelta(days=30), 100) if w.run_id == case.run_id]
    finally:
        case.close()
    assert run.status is RunStatus.succeeded, f"{name}: run ended {run.status.value}"
    assert case.waiting_since is not None and case.approved_at is not None
    assert not watches and not case.queue.held, f"{name}: something of the run is left"
    return {
        "wait_seconds": wait.total_seconds(),
        "waited": (case.approved_at - case.waiting_since).total_seconds(),
        "window_seconds": (end - start).total_seconds(),
        "steps": {a.id: a.status.value for a in run.actions},
        "figures": case.figures(),
    }


def busy(spent: dict[str, float]) -> float:
    """Wall time without the fire's wait for its scheduled time."""
    return spent["wall"] - spent["early"]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    args = common.arguments(
        __doc__.split("\n")[0],
        lambda p: p.add_argument("--rounds", type=int, default=5, help="rounds of both cases, interleaved"),
    )
    waits = (60, 600) if args.quick else (60, 3600)
    timeout = 1200 if args.quick else 7200
    labels = {w: f"{w // 60} min" if w < 3600 else f"{w // 3600} h" for w in waits}
    say(f"approval wait: granted after {' and '.join(labels.values())}; approval timeout {timeout} s")
    say(common.machine_line())
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(seconds=5)
    rounds: dict[int, list[dict[str, Any]]] = {w: [] for w in waits}
    with common.azurite() as emulator, FakeAgent() as agent:
        # a first case, not counted, warms connections and caches up for the measured ones
        one_case("awwarm", emulator.connection_string, agent.url, start, timedelta(seconds=waits[0]), timeout)
        for r in range(args.rounds):
            for index, wait in enumerate(waits if r % 2 == 0 else waits[::-1]):
                result = one_case(
                    f"aw{r}c{index}",
                    emulator.connection_string,
                    agent.url,
                    start,
                    timedelta(seconds=wait),
                    timeout,
                )
                rounds[wait].append(result)
                run_total = summed(result["figures"], ("dispatch", "host", "api", "repair (run's watch)"))
                say(
                    f"round {r + 1}, {labels[wait]}: {run_total['invocations']:.0f} invocations, "
                    f"{run_total['requests']:.0f} requests, {ms(busy(run_total))} wall, "
                    f"{ms(run_total['cpu'])} CPU"
                )
    common.save_json("approval_wait", rounds)

    def median_of(wait: int, kinds: tuple[str, ...], phases: tuple[str, ...] = PHASES) -> dict[str, float]:
        totals = [summed(r["figures"], kinds, phases) for r in rounds[wait]]
        counts = {(t["invocations"], t["requests"]) for t in totals}
        assert len(counts) == 1, f"counts differ between rounds: {counts}"
        return {field: statistics.median(t[field] for t in totals) for field in totals[0]}

    run_kinds = ("dispatch", "host", "api", "repair (run's watch)")
    headers = (
        "approval granted after",
        "queue-trigger invocations",
        "their wall / CPU",
        "approve call wall / CPU",
        "storage requests: trigger + receive/delete, approve, repair on the watch",
        "function wall / CPU in all",
        "storage requests in all",
        "of which while waiting: invocations, requests",
    )
    rows = []
    totals, during = {}, {}
    for wait in waits:
        dispatch = median_of(wait, ("dispatch",))
        host = median_of(wait, ("host",))
        api = median_of(wait, ("api",))
        watch = median_of(wait, ("repair (run's watch)",))
        total = totals[wait] = median_of(wait, run_kinds)
        waiting = during[wait] = median_of(wait, run_kinds, ("waiting",))
        rows.append(
            (
                labels[wait],
                f"{dispatch['invocations']:.0f}",
                f"{ms(busy(dispatch))} (+ {ms(dispatch['early'])}) / {ms(dispatch['cpu'])}",
                f"{ms(api['wall'])} / {ms(api['cpu'])}",
                f"{dispatch['requests'] + host['requests']:.0f}, {api['requests']:.0f}, "
                f"{watch['requests']:.0f}",
                f"{ms(busy(total))} / {ms(total['cpu'])}",
                f"**{total['requests']:.0f}**",
                f"{waiting['invocations']:.0f}, {waiting['requests']:.0f}",
            )
        )
    short, long = waits
    ratio = {f: totals[long][f] / totals[short][f] for f in ("invocations", "requests", "cpu")}
    ratio["wall"] = busy(totals[long]) / busy(totals[short])
    flat = (
        totals[long]["invocations"] == totals[short]["invocations"]
        and totals[long]["requests"] == totals[short]["requests"]
        and during[long]["invocations"] == 0
    )
    timer_headers = ("approval granted after", "timer", "invocations", "wall / CPU", "storage requests")
    timer_rows = []
    for wait in waits:
        for kind in ("tick", "repair"):
            t = median_of(wait, (kind,))
            timer_rows.append(
                (
                    labels[wait],
                    kind,
                    f"{t['invocations']:.0f}",
                    f"{ms(t['wall'])} / {ms(t['cpu'])}",
                    f"{t['requests']:.0f}",
                )
            )
    first = rounds[long][0]["figures"]
    by_phase = "; ".join(
        f"{phase} {summed(first, ('dispatch', 'api'), (phase,))['invocations']:.0f} / "
        f"{summed(first, run_kinds, (phase,))['requests']:.0f}"
        for phase in PHASES
    )
    window = rounds[short][0]["window_seconds"] / 3600
    short_check = ", ".join(
        phase for phase in PHASES if f"{phase}|repair (run's watch)" in rounds[short][0]["figures"]
    )
    say()
    say(common.table(headers, rows))
    say()
    say(common.table(timer_headers, timer_rows))
    say(
        f"{labels[long]} / {labels[short]}: invocations {ratio['invocations']:.2f}x, requests "
        f"{ratio['requests']:.2f}x, wall {ratio['wall']:.2f}x, CPU {ratio['cpu']:.2f}x; flat: "
        f"{'met' if flat else 'MISSED'}"
    )
    say(f"{labels[long]} case by phase (invocations / requests): {by_phase}")
    if args.no_doc:
        return
    command = f"bench/approval_wait.py{' --quick' if args.quick else ''}"
    common.write_section(
        "approval_wait",
        f"""
## 8. Function time of a run waiting for an approval (`{command}`)

{common.machine_line()}

A routine of three steps, `draft` (an agent) → `review` (an approval, `timeout_seconds: {timeout}`) →
`send` (an agent using the draft's output), fires once from its daily schedule. Each case runs on a
fake clock against Azurite, from two minutes before the fire to past the approval's timeout
({window:.1f} h of fake time, the same window in both cases), with the Functions app's timers at their
real cadence in fake time (`tick` every minute, `repair` every 15 s) and a worker that takes each
queue message when it becomes visible in fake time and calls `Dispatcher.deliver`, as the queue
trigger does. The approval is granted with `Api.approve_step` {labels[short]} or {labels[long]} after
the run began waiting. A message sent with a visibility delay is held by the bench and sent when the
fake clock reaches its time (its send is charged to whoever sent it). The agent is the fake agent
(200 at once). Medians of {args.rounds} interleaved rounds, in alternating order, after a
first case not counted (warm-up); the counts are the same in every round.

Function time of the run: the queue trigger's invocations for it, the approve call, and the repair
pass's requests on the run's watch (reading the run, moving the watch), counted with the
`storage_clients` hook. "(+ ...)" is the fire's wait for its scheduled time (the message surfaces a
second early and the handler waits out the rest, on the fake clock here): real wall time on a host,
the same in both cases, left out of the totals. "While waiting" is from the moment the run is
`waiting` to the approve call.

{common.table(headers, rows)}

The timers over the window, whatever the runs do (lease, due query, watch query; the same in both
cases, and they would run with no run at all):

{common.table(timer_headers, timer_rows)}

- Flat, nothing runs for the run while it waits: {common.verdict(flat)} ({labels[long]} /
  {labels[short]}: {ratio["invocations"]:.2f}x invocations, {ratio["requests"]:.2f}x storage requests,
  {ratio["wall"]:.2f}x wall, {ratio["cpu"]:.2f}x CPU; while waiting {during[long]["invocations"]:.0f}
  invocations for the run). The times are tens of milliseconds, so their ratio moves by tens of
  per cent with the machine's load from one run to the next; the counts do not move.
- The {labels[long]} case by phase (invocations / storage requests; "approved" starts with the
  approve call): {by_phase}. The requests while waiting are
  the repair pass's first check of the run's watch (due {FIRST_CHECK.total_seconds():.0f} s after the fire,
  `FIRST_CHECK`): it reads the run once and moves the watch to the approval's timeout + 90 s, so no
  later pass reads it before then; with the {labels[short]} wait that check came in phase
  "{short_check}", hence the same total.
  After the run ends, the approval's timeout message (sent when the run began waiting) still comes up
  at the timeout: one invocation that finds the approval decided and does nothing.
- What would grow with the wait: a timeout longer than the queue's 7-day visibility limit is re-queued
  at each 7 days (one invocation per week waited, at most 4 with the 30-day limit of `timeout_seconds`).
""",
    )


if __name__ == "__main__":
    main()
