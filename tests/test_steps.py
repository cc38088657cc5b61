"""Steps (README "Steps") end to end on the in-memory store with a fake clock: the API, the dispatcher, the
repair pass and a scripted agent. Parallel branches, conditions, outputs passed on, per-step retries,
approvals (approve, reject, timeout), the snapshot, and two steps finishing at once.

Every bad routine is a ``422`` naming the field, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from routines.agents.base import AgentCall, AgentError, AgentOutcome
from routines.api import Api, Request, Response
from routines.config import Settings, StorageTarget
from routines.dispatcher import Dispatcher
from routines.messages import DispatchMessage, MemoryQueue
from routines.models import Run, RunStatus, StepStatus
from routines.repair import repair
from routines.store.memory import MemoryStore
from tests.helpers import Clock

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
REPAIR_AFTER = timedelta(seconds=90)


class Agent:
    """Answers by agent id: ``replies[agent]`` is a list of outputs, ``AgentError``s or ``"pending"``
    (then done after ``pending_for`` seconds), used in turn (the last one repeats). Records every call."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.replies: dict[str, list[Any]] = {}
        self.calls: list[tuple[str, AgentCall, datetime]] = []
        self.pending_for = 30.0
        self.during_start: Callable[[AgentCall], None] | None = None

    def _next(self, agent: str) -> Any:
        queue = self.replies.get(agent) or [f"{agent} done"]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def start(self, call: AgentCall) -> AgentOutcome:
        self.calls.append(("start", call, self.clock()))
        if self.during_start is not None:
            hook, self.during_start = self.during_start, None
            hook(call)
        reply = self._next(call.agent)
        if isinstance(reply, AgentError):
            raise reply
        if reply == "pending":
            return AgentOutcome(done=False, handle={"at": self.clock().isoformat()}, poll_after=5)
        return AgentOutcome(done=True, output=reply if isinstance(reply, str) else json.dumps(reply))

    def poll(self, call: AgentCall, handle: dict[str, Any]) -> AgentOutcome:
        self.calls.append(("poll", call, self.clock()))
        done = (self.clock() - datetime.fromisoformat(handle["at"])).total_seconds() >= self.pending_for
        return AgentOutcome(
            done=done, output=f"{call.agent} late" if done else None, handle=handle, poll_after=5
        )

    def cancel(self, call: AgentCall, handle: dict[str, Any]) -> None:
        self.calls.append(("cancel", call, self.clock()))

    def starts(self, agent: str | None = None) -> list[AgentCall]:
        return [c for kind, c, _ in self.calls if kind == "start" and (agent is None or c.agent == agent)]

    def started_at(self, agent: str) -> list[datetime]:
        return [t for kind, c, t in self.calls if kind == "start" and c.agent == agent]


class World:
    def __init__(self) -> None:
        self.clock = Clock(T0)
        self.store = MemoryStore()
        self.queue = MemoryQueue(self.clock)
        self.agent = Agent(self.clock)
        self.dispatcher = self.worker()
        settings = Settings(StorageTarget("x"), min_interval_seconds=1)
        self.api = Api(self.store, self.queue, settings, self.clock)
        self.handled: list[DispatchMessage] = []

    def worker(self, owner: str = "w1") -> Dispatcher:
        return Dispatcher(
            self.store, self.queue, self.agent, clock=self.clock, sleep=self.clock.sleep, owner=owner
        )

    def call(self, handler: str, body: Any = None, **params: str) -> Response:
        raw = json.dumps(body).encode() if body is not None else b""
        headers = {"content-type": "application/json"} if raw else {}
        request = Request("POST", params, {}, headers, raw)
        return self.api.handle(getattr(self.api, handler), request)

    def create(self, actions: list[dict[str, Any]], **fields: Any) -> str:
        body = {
            "name": f"r{len(self.store.list_routines(None, 200, None).items)}",
            "trigger": {"type": "schedule", "cron_expression": "0 0 1 1 *"},
            "actions": actions,
            "retry_policy": {"max_attempts": 3, "delays_seconds": [10]},
            **fields,
        }
        response = self.call("create_routine", body)
        assert response.status == 201, response.body
        return str(response.body["id"])

    def dispatch(self, routine_id: str) -> str:
        response = self.call("dispatch_routine", id=routine_id)
        assert response.status == 202, response.body
        return str(response.body["id"])

    def deliver_due(self) -> int:
        """Every message visible now, those sent meanwhile included (idle workers take them at once)."""
        handled = 0
        while due := self.queue.due(self.clock()):
            for message in due:
                self.handled.append(message)
                self.dispatcher.handle(message.encode())
            handled += len(due)
        return handled

    def run_for(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock() + timedelta(seconds=seconds)
        next_repair = self.clock()
        while self.clock() < end:
            self.deliver_due()
            if self.clock() >= next_repair:
                repair(self.store, self.queue, self.clock(), REPAIR_AFTER, "repairer")
                next_repair = self.clock() + timedelta(seconds=15)
            self.clock.now += timedelta(seconds=step)
        self.deliver_due()

    def run(self, routine_id: str, run_id: str) -> Run:
        return self.store.get_run(routine_id, run_id)[0]

    def steps(self, run: Run) -> dict[str, str]:
        return {a.id: a.status.value for a in run.actions}


def agent(agent_id: str, step_id: str, **more: Any) -> dict[str, Any]:
    return {
        "type": "invocation",
        "agent_id": agent_id,
        "id": step_id,
        "input": more.pop("input", "go"),
        **more,
    }


DIAMOND = [
    agent("a", "a"),
    agent("b", "b", after=["a"], input={"region": "us", "from_a": "{{steps.a.output}}"}),
    agent("c", "c", after=["a"], input={"region": "eu"}),
    agent(
        "d",
        "d",
        after=["b", "c"],
        input={
            "b": "{{steps.b.output.findings}}",
            "c": "{{steps.c.output}}",
            "text": "c said {{steps.c.output.n}}",
        },
    ),
]


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actions", "loc", "words"),
    [
        pytest.param(
            [agent("a", "a", after=["b"]), agent("b", "b", after=["a"])],
            ["actions", 0, "after"],
            "cycle",
            id="cycle",
        ),
        pytest.param([agent("a", "a", after=["a"])], ["actions", 0, "after", 0], "itself", id="self_loop"),
        pytest.param(
            [agent("a", "a"), agent("b", "b", after=["zz"])],
            ["actions", 1, "after", 0],
            "unknown",
            id="unknown_after",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "a")], ["actions", 1, "id"], "duplicate", id="duplicate_id"
        ),
        pytest.param(
            [agent("a", "step2"), {"type": "invocation", "agent_id": "b", "input": "x"}],
            ["actions", 1, "id"],
            "duplicate",
            id="duplicate_of_a_default_id",
        ),
        pytest.param([agent("a", "A")], ["actions", 0, "id"], "match pattern", id="bad_id"),
        pytest.param([agent(f"a{i}", f"s{i}") for i in range(21)], ["actions"], "at most 20", id="over_20"),
        pytest.param(
            [agent("a", "a"), agent("b", "b", after=[], when={"step": "a", "status": "failed"})],
            ["actions", 1, "when", "step"],
            "does not run before",
            id="when_not_an_ancestor",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", when={"step": "zz", "status": "failed"})],
            ["actions", 1, "when", "step"],
            "does not run before",
            id="when_unknown_step",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", after=[], input="{{steps.a.output}}")],
            ["actions", 1, "input"],
            "does not run before",
            id="placeholder_not_an_ancestor",
        ),
        pytest.param(
            [agent("a", "a", input={"x": ["{{secrets.key}}"]})],
            ["actions", 0, "input", "x", 0],
            "unknown placeholder",
            id="unknown_placeholder",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", when={"step": "a", "path": "x", "op": "matches", "value": 1})],
            ["actions", 1, "when", "op"],
            "Input should be",
            id="unknown_op",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", when={"step": "a", "path": "x", "op": "eq"})],
            ["actions", 1, "when"],
            "needs a value",
            id="op_without_value",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", when={"step": "a", "op": "in", "value": "x"})],
            ["actions", 1, "when"],
            "list",
            id="in_without_a_list",
        ),
        pytest.param(
            [agent("a", "a"), agent("b", "b", when={"step": "a"})],
            ["actions", 1, "when"],
            "give status",
            id="empty_condition",
        ),
        pytest.param(
            [{"type": "approval", "id": "ok", "agent_id": "a"}],
            ["actions", 0, "agent_id"],
            "unknown field",
            id="approval_with_an_agent",
        ),
        pytest.param(
            [{"type": "approval", "id": "ok", "input": "x"}],
            ["actions", 0, "input"],
            "unknown field",
            id="approval_with_input",
        ),
        pytest.param(
            [{"type": "approval", "id": "ok", "on_timeout": "maybe"}],
            ["actions", 0, "on_timeout"],
            "Input should be",
            id="approval_bad_on_timeout",
        ),
    ],
)
def test_a_bad_graph_is_422_naming_the_field_and_nothing_is_stored(
    actions: list[dict[str, Any]], loc: list[Any], words: str
) -> None:
    world = World()
    body = {
        "name": "bad",
        "trigger": {"type": "schedule", "cron_expression": "* * * * *"},
        "actions": actions,
    }
    response = world.call("create_routine", body)
    assert response.status == 422, response.body
    errors = response.body["errors"]
    assert errors[0]["loc"] == loc and words in errors[0]["msg"], errors
    assert world.store.list_routines(None, 200, None).items == []
    assert len(world.queue) == 0


def test_a_bad_graph_in_a_patch_is_422_and_changes_nothing() -> None:
    world = World()
    rid = world.create([agent("a", "a")])
    before = world.store.get_routine(rid)[0]
    request = Request(
        "PATCH",
        {"id": rid},
        {},
        {"content-type": "application/json"},
        json.dumps({"actions": [agent("a", "a", after=["a"])]}).encode(),
    )
    response = world.api.handle(world.api.patch_routine, request)
    assert response.status == 422 and response.body["errors"][0]["loc"] == ["actions", 0, "after", 0]
    assert world.store.get_routine(rid)[0] == before


def test_a_version_1_list_still_validates_and_reads_back_unchanged() -> None:
    world = World()
    v1 = [
        {"type": "invocation", "agent_id": "a", "input": "x"},
        {"type": "invocation", "agent_id": "b", "input": "y"},
    ]
    rid = world.create(v1)
    assert world.store.get_routine(rid)[0].public()["actions"] == v1, "no ids or after added"


# --- graphs ---------------------------------------------------------------------------------------


def test_a_diamond_runs_b_and_c_together_and_d_gets_both_outputs() -> None:
    world = World()
    world.agent.replies = {
        "a": ['{"severity": "high"}'],
        "b": ['{"findings": ["x", "y"]}'],
        "c": ['{"n": 2}'],
    }
    rid = world.create(DIAMOND)
    run_id = world.dispatch(rid)
    world.run_for(10)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded, run.error_message
    assert world.steps(run) == dict.fromkeys("abcd", "succeeded")
    [b], [c], [d] = world.agent.starts("b"), world.agent.starts("c"), world.agent.starts("d")
    assert world.agent.started_at("b") == world.agent.started_at("c"), "parallel steps start together"
    assert b.input == {"region": "us", "from_a": {"severity": "high"}}
    assert c.input == {"region": "eu"}
    assert d.input == {"b": ["x", "y"], "c": {"n": 2}, "text": "c said 2"}
    keys = [s.idempotency_key for s in world.agent.starts()]
    assert keys == [f"{rid}:manual:{run_id}:{s}" for s in "abcd"]
    # One message per ready step besides the one the worker took: c's own start message.
    starts = [m for m in world.handled if m.step is not None and m.kind == "retry"]
    assert [m.step for m in starts] == ["c"]
    a = run.actions[0]
    assert (a.attempt, a.started_at is not None, a.ended_at is not None) == (1, True, True)


def test_a_one_step_routine_keeps_the_runs_idempotency_key() -> None:
    world = World()
    rid = world.create([agent("a", "only")])
    run_id = world.dispatch(rid)
    world.run_for(3)
    [call] = world.agent.starts()
    assert call.idempotency_key == f"{rid}:manual:{run_id}"


def test_a_failed_step_is_retried_alone_and_succeeded_steps_never_rerun() -> None:
    world = World()
    world.agent.replies = {"c": [AgentError("503", retriable=True), "c ok"]}
    rid = world.create(DIAMOND)
    run_id = world.dispatch(rid)
    world.run_for(5)
    mid = world.run(rid, run_id)
    assert world.steps(mid) == {"a": "succeeded", "b": "succeeded", "c": "pending", "d": "pending"}
    assert mid.status is RunStatus.retrying and mid.actions[2].next_attempt_at is not None
    world.run_for(20)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded
    assert [len(world.agent.starts(x)) for x in "abcd"] == [1, 1, 2, 1]
    assert [c.attempt for c in world.agent.starts("c")] == [1, 2]
    assert (run.actions[2].attempt, run.attempt) == (2, 2)


def test_pending_parallel_steps_are_polled_each_on_its_own() -> None:
    world = World()
    world.agent.replies = {"b": ["pending"], "c": ["pending"]}
    rid = world.create(DIAMOND[:3])
    run_id = world.dispatch(rid)
    world.run_for(5)
    assert world.steps(world.run(rid, run_id)) == {"a": "succeeded", "b": "running", "c": "running"}
    world.run_for(60)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded
    assert (run.actions[1].output, run.actions[2].output) == ("b late", "c late")


@pytest.mark.parametrize(
    ("severity", "page"),
    [
        pytest.param("high", "succeeded", id="page_when_high"),
        pytest.param("low", "skipped", id="no_page_when_low"),
    ],
)
def test_a_condition_on_output_decides_a_step(severity: str, page: str) -> None:
    world = World()
    world.agent.replies = {"triage": [json.dumps({"severity": severity})]}
    rid = world.create(
        [
            agent("triage", "triage"),
            agent("pager", "page", when={"step": "triage", "path": "severity", "op": "eq", "value": "high"}),
            agent("after", "after", after=["page"]),
        ]
    )
    run_id = world.dispatch(rid)
    world.run_for(5)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded
    assert world.steps(run) == {"triage": "succeeded", "page": page, "after": page}, (
        "a skipped step skips its dependents"
    )


def test_a_failure_handler_runs_and_the_run_succeeds() -> None:
    world = World()
    world.agent.replies = {"scan": [AgentError("400 bad", retriable=False)]}
    rid = world.create(
        [
            agent("scan", "scan"),
            agent("report", "report"),
            agent("notify", "notify", after=["scan"], when={"step": "scan", "status": "failed"}),
        ]
    )
    run_id = world.dispatch(rid)
    world.run_for(5)
    run = world.run(rid, run_id)
    assert world.steps(run) == {"scan": "failed", "report": "skipped", "notify": "succeeded"}
    assert run.status is RunStatus.succeeded and run.error_message is None


def test_an_unhandled_failure_fails_the_run_and_skips_its_dependents() -> None:
    world = World()
    world.agent.replies = {"b": [AgentError("400 bad", retriable=False)]}
    rid = world.create(DIAMOND)
    run_id = world.dispatch(rid)
    world.run_for(5)
    run = world.run(rid, run_id)
    assert world.steps(run) == {"a": "succeeded", "b": "failed", "c": "succeeded", "d": "skipped"}
    assert run.status is RunStatus.failed
    assert run.error_message is not None and run.error_message.startswith("step b: attempt 1: 400 bad")


def test_a_patch_during_the_run_never_changes_it() -> None:
    world = World()
    world.agent.replies = {"b": ["pending"]}
    rid = world.create(DIAMOND)
    run_id = world.dispatch(rid)
    world.run_for(3)
    request = Request(
        "PATCH",
        {"id": rid},
        {},
        {"content-type": "application/json"},
        json.dumps({"actions": [agent("z", "z")]}).encode(),
    )
    assert world.api.handle(world.api.patch_routine, request).status == 200
    world.run_for(60)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded and world.steps(run) == dict.fromkeys("abcd", "succeeded")
    assert world.agent.starts("z") == []


def test_two_steps_finishing_at_once_keep_both_results() -> None:
    """While b's agent call is in flight, another worker finishes c and writes the run: b's write
    then loses the etag race, and the dispatcher decides again on the fresh run with b's answer."""
    world = World()
    rid = world.create(DIAMOND)
    run_id = world.dispatch(rid)
    other = world.worker("w2")

    def finish_c_meanwhile(call: AgentCall) -> None:
        if call.agent != "b":
            world.agent.during_start = finish_c_meanwhile
            return
        for message in world.queue.due(world.clock()):
            if message.step == "c":
                other.handle(message.encode())
            else:
                world.queue.send(message)

    world.agent.during_start = finish_c_meanwhile
    world.run_for(10)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded
    assert [len(world.agent.starts(x)) for x in "abcd"] == [1, 1, 1, 1]
    assert (run.actions[1].output, run.actions[2].output) == ("b done", "c done")


# --- approvals ------------------------------------------------------------------------------------

GATED = [
    agent("draft", "draft"),
    {"type": "approval", "id": "review", "timeout_seconds": 3600},
    agent("send", "send", input="send {{steps.draft.output}}"),
]


def waiting_run(world: World, actions: list[dict[str, Any]] = GATED) -> tuple[str, str]:
    rid = world.create(actions)
    run_id = world.dispatch(rid)
    world.run_for(3)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.waiting and world.steps(run)["review"] == "waiting"
    return rid, run_id


def test_approve_moves_the_run_on() -> None:
    world = World()
    rid, run_id = waiting_run(world)
    listed = world.api.handle(
        world.api.list_runs, Request("GET", {"id": rid}, {"status": "waiting"}, {}, b"")
    ).body["items"]
    assert [r["id"] for r in listed] == [run_id]
    response = world.call("approve_step", {"comment": "ship it"}, id=rid, run_id=run_id, step_id="review")
    assert response.status == 200, response.body
    review = response.body["actions"][1]
    assert (review["status"], review["comment"], review["decided_at"]) == (
        "succeeded",
        "ship it",
        "2026-06-01T12:00:03Z",
    )
    world.run_for(3)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.succeeded and world.steps(run)["send"] == "succeeded"
    [send] = world.agent.starts("send")
    assert send.input == "send draft done"


def test_reject_fails_the_step_and_the_run() -> None:
    world = World()
    rid, run_id = waiting_run(world)
    response = world.call("reject_step", {"comment": "not yet"}, id=rid, run_id=run_id, step_id="review")
    assert response.status == 200 and response.body["actions"][1]["status"] == "failed"
    world.run_for(3)
    run = world.run(rid, run_id)
    assert run.status is RunStatus.failed and world.steps(run)["send"] == "skipped"
    assert run.actions[1].comment == "not yet" and run.error_message == "step review: rejected: not yet"
    assert world.agent.starts("send") == []


@pytest.mark.parametrize(
    ("on_timeout", "review", "status"),
    [
        pytest.param("reject", "failed", RunStatus.failed, id="reject"),
        pytest.param("approve", "succeeded", RunStatus.succeeded, id="approve"),
    ],
)
def test_an_approval_times_out_without_compute_while_it_waits(
    on_timeout: str, review: str, status: RunStatus
) -> None:
    world = World()
    gated = [GATED[0], {**GATED[1], "on_timeout": on_timeout}, GATED[2]]
    rid, run_id = waiting_run(world, gated)
    before = len(world.handled)
    world.run_for(3590, step=10)
    assert len(world.handled) == before, "nothing runs while the approval waits"
    assert world.run(rid, run_id).status is RunStatus.waiting
    world.run_for(30, step=1)
    run = world.run(rid, run_id)
    assert (world.steps(run)["review"], run.status) == (review, status)
    assert len(world.handled) - before <= 2, "the timeout is one message (and the next step's none)"


def test_decisions_on_the_wrong_thing() -> None:
    world = World()
    rid, run_id = waiting_run(world)
    ids = {"id": rid, "run_id": run_id}
    assert (
        world.call("approve_step", id=rid, run_id="run_0000000000000_nothere000", step_id="review").status
        == 404
    )
    assert world.call("approve_step", id="rt_0000000000000000", run_id=run_id, step_id="review").status == 404
    assert world.call("approve_step", **ids, step_id="nope").status == 404
    assert world.call("approve_step", **ids, step_id="draft").status == 409, "not an approval step"
    assert world.call("approve_step", {"note": "x"}, **ids, step_id="review").status == 422, "unknown field"
    before = world.run(rid, run_id)
    assert before.actions[1].status is StepStatus.waiting, "bad requests changed nothing"
    assert world.call("approve_step", **ids, step_id="review").status == 200
    assert world.call("approve_step", **ids, step_id="review").status == 409, "not waiting any more"
    assert world.call("reject_step", **ids, step_id="review").status == 409


def test_a_lost_approval_message_is_sent_again_by_the_repair_pass() -> None:
    world = World()
    rid, run_id = waiting_run(world)
    assert world.call("approve_step", id=rid, run_id=run_id, step_id="review").status == 200
    lost = world.queue.take_all()
    assert [(m.kind, m.step) for _, m in lost if m.run_id == run_id] == [
        ("poll", "review"),
        ("poll", "review"),
    ]
    world.run_for(200)
    assert world.run(rid, run_id).status is RunStatus.succeeded
