"""The dispatcher: a thin interpreter of the run state machine (``routines.decide``).

One queue message = one fire, retry or status poll of one run. For each message it reads the clock,
then loops: ask ``decide.next_step`` what to do, do it (load a row, write the run, send a message,
call the agent), feed what happened back in as facts. Every choice lives in ``decide``; this module
only performs them, translates storage races into fresh facts, and records telemetry.

``deliver`` is the queue trigger's whole job: it also re-queues a message with back-off while storage
is unavailable (instead of burning the host's deliveries) and, on the last delivery of a message that
keeps failing, ends its run ``failed`` with the reason and moves the message to the poison queue.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from routines import decide, graph, lifecycle, limits, placeholders, telemetry
from routines.agents import bounds
from routines.agents.base import AgentBackend, AgentCall, AgentError, AgentOutcome
from routines.decide import UNKNOWN, Facts
from routines.errors import Conflict, NotFound, PreconditionFailed, RoutinesError, StorageUnavailable
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    ApprovalStep,
    ResponseAction,
    Routine,
    Run,
    RunTrigger,
    StepStatus,
    now_utc,
    utc_text,
)
from routines.scheduler import OWNER
from routines.store import SlotTaken, Store

log = logging.getLogger(__name__)

# Decisions per message (a 20-step chain with flow control takes ~100); still undecided, it comes back
MAX_STEPS = 256
OUTCOME_WRITE_PAUSES = (0.2, 0.5, 1.0)  # after an agent call: a lost write would start it again
MAX_DELIVERIES = 5  # host.json extensions.queues.maxDequeueCount
REQUEUE_MIN, REQUEUE_MAX = 2.0, 60.0  # back-off of a message re-queued while storage is unavailable


class PoisonMessage(RoutinesError, ValueError):  # named for what happens to the message
    """The message cannot be read; it belongs in the poison queue."""


def requeue_delay(message: DispatchMessage, now: datetime) -> float:
    """Back-off for a message re-queued through a storage outage: a quarter of its age, so a long
    outage is retried less often, between ``REQUEUE_MIN`` and ``REQUEUE_MAX`` seconds."""
    age = (now - (message.dispatch_at or message.scheduled_for)).total_seconds()
    return min(REQUEUE_MAX, max(REQUEUE_MIN, age / 4))


@dataclass
class Dispatcher:
    store: Store
    queue: DispatchQueue
    backend: AgentBackend
    clock: Callable[[], datetime] = now_utc
    sleep: Callable[[float], None] = time.sleep
    owner: str = OWNER

    # --- entry points -----------------------------------------------------------------------
    def deliver(
        self, body: bytes | str, delivery: int = 1, poison: Callable[[str], None] | None = None
    ) -> None:
        """Handle delivery number ``delivery`` of a message, never letting a known failure cost a
        delivery: storage unavailable re-queues it with back-off; the last delivery of a message
        that keeps failing ends its run ``failed`` (``give_up``) and moves it to ``poison``.
        Raises ``PoisonMessage`` for an unreadable message, and whatever failed on earlier
        deliveries (the host delivers the message again)."""
        message = self._decode(body)
        try:
            self._handle(message)
            return
        except StorageUnavailable as exc:
            try:
                self.queue.send(message, requeue_delay(message, self.clock()))
                log.warning("storage unavailable (%s); message for run %s re-queued", exc, message.run_id)
                return
            except StorageUnavailable:
                error: Exception = exc  # the queue is down too: the host redelivers it
        except Exception as exc:  # a bug or a settings error: the host tries again, then we give up
            error = exc
        if delivery < MAX_DELIVERIES:
            raise error
        reason = f"{type(error).__name__}: {str(error)[:300]}"
        log.error("message for run %s failed %d times, giving up: %s", message.run_id, delivery, reason)
        self.give_up(message, reason)
        telemetry.record_poison()
        if poison is not None:
            poison(body.decode(errors="replace") if isinstance(body, bytes) else body)

    def handle(self, body: bytes | str) -> None:
        """Process one message. Raises ``PoisonMessage`` for an unreadable one and
        ``StorageUnavailable`` when storage is down."""
        self._handle(self._decode(body))

    def give_up(self, message: DispatchMessage, reason: str) -> None:
        """End the run of ``message`` ``failed`` with ``reason`` (the message failed for good)."""
        self._run(Facts(message, self.clock(), self.owner, give_up=reason))

    @staticmethod
    def _decode(body: bytes | str) -> DispatchMessage:
        try:
            return DispatchMessage.decode(body)
        except ValueError as exc:
            raise PoisonMessage(f"unreadable dispatch message: {str(exc)[:300]}") from None

    def _handle(self, message: DispatchMessage) -> None:
        attributes = {
            "routine.id": message.routine_id,
            "run.id": message.run_id,
            "run.attempt": message.attempt,
            "dispatch.kind": message.kind,
        }  # not message.*: Application Insights drops that prefix
        with telemetry.span(f"routines.dispatch.{message.kind}", attributes, message.traceparent):
            self._run(Facts(message, self.clock(), self.owner))

    # --- the loop ---------------------------------------------------------------------------
    def _run(self, facts: Facts) -> None:
        for _ in range(MAX_STEPS):
            step = decide.next_step(facts)
            if isinstance(step, decide.Load):
                facts = self._load(facts, step.what, step.key)
            elif isinstance(step, decide.Wait):
                self.sleep(step.seconds)
                facts = dataclasses.replace(facts, now=self.clock())
            elif isinstance(step, decide.Done):
                m = facts.message
                if step.why == decide.STALE:  # docs/guarantees.md #4, and the soak reads this line
                    log.info("dropping stale fire %s of routine %s", m.scheduled_for, m.routine_id)
                elif step.why == decide.GONE and m.kind == "fire":  # the soak reads this one too
                    log.info("dropping fire %s of deleted routine %s", m.scheduled_for, m.routine_id)
                called = None
                for effect in step.effects:
                    called = self._perform(facts, effect)
                    if called is not None:
                        break  # an agent call: decide on its answer
                if called is None:
                    return
                facts = called
            elif isinstance(step, decide.Gate):
                facts = self._gate(facts, step)
            else:
                next_facts = self._write(facts, step)
                if next_facts is None:
                    return
                facts = next_facts
        log.warning("run %s: undecided after %d steps; trying again shortly", facts.message.run_id, MAX_STEPS)
        self.queue.send(facts.message, 1)

    def _load(self, facts: Facts, what: str, key: str | None = None) -> Facts:
        m = facts.message
        if what == "routine":
            try:
                routine: Routine | None = self.store.get_routine(m.routine_id)[0]
            except NotFound:
                routine = None
            return dataclasses.replace(facts, routine=routine)
        if what == "run":
            try:
                run, etag = self.store.get_run(m.routine_id, m.run_id)
                return dataclasses.replace(facts, run=run, etag=etag)
            except NotFound:
                return dataclasses.replace(facts, run=None, etag=None)
        if what == "slot":
            return dataclasses.replace(facts, slot=self.store.get_slot(m.routine_id), holder=UNKNOWN)
        if what == "permits":
            assert key is not None
            return dataclasses.replace(facts, permits=self.store.get_limit(limits.Permits, key))
        if what == "starts":
            assert key is not None
            return dataclasses.replace(facts, starts=self.store.get_limit(limits.Starts, key))
        holder = decide.holder_id(facts)
        found: Run | None = None
        if holder:
            try:
                found = self.store.get_run(m.routine_id, holder)[0]
            except NotFound:
                found = None
        return dataclasses.replace(facts, holder=found)

    def _gate(self, facts: Facts, step: decide.Gate) -> Facts:
        """Write a flow-control row; on a lost race, decide again on a fresh read."""
        row = step.row
        try:
            etag: str | None = self.store.put_limit(row)
        except (PreconditionFailed, Conflict):
            etag = None
        if isinstance(row, limits.Permits):
            return dataclasses.replace(
                facts, permits=UNKNOWN if etag is None else dataclasses.replace(row, etag=etag)
            )
        return dataclasses.replace(
            facts, starts=UNKNOWN if etag is None else dataclasses.replace(row, etag=etag)
        )

    def _write(self, facts: Facts, step: decide.Write) -> Facts | None:
        """Write the run, then perform the effects. Returns the facts to go on from, or None when
        the message is done."""
        run = step.run
        if step.why == "claim" and not run.trace_id:
            run = run.model_copy(update={"trace_id": telemetry.current_trace_id()})
        try:
            etag, slot_etag = self._write_run(facts, run, step)
        except (PreconditionFailed, Conflict):
            # Another delivery or another step moved the run first (or our own earlier try landed):
            # decide again on what is there now, with the agent's answer if this write carried one.
            fresh = dataclasses.replace(facts, slot=UNKNOWN, holder=UNKNOWN)
            return self._load(fresh, "run")
        except SlotTaken:
            return dataclasses.replace(facts, slot=UNKNOWN, holder=UNKNOWN, contended=True)
        if step.slot is not None:
            # Known only once written: kept in memory, and stored with the run's next write. Only a
            # slot with nobody buffered in it may be released blind (else the hand-over is needed).
            run.progress.slot_etag = slot_etag if step.slot.buffered is None else None
        facts = dataclasses.replace(
            facts,
            run=run,
            etag=etag,
            slot=UNKNOWN,
            holder=UNKNOWN,
            contended=False,
            outcome=None,
            called=None,
            called_attempt=0,
        )
        if run.status.terminal:
            self._log_finished(run)
        for effect in step.effects:
            changed = self._perform(facts, effect)
            if changed is not None:
                return changed  # an agent call: decide on its answer
        return None

    def _write_run(self, facts: Facts, run: Run, step: decide.Write) -> tuple[str, str | None]:
        """One conditional write. After an agent call (or for a terminal state) a storage blip is
        retried here: failing would leave the run leased and its agent started again after the
        lease. A retry that finds the etag moved is decided again on a fresh read (it shows whether
        the earlier try landed). Not when the store already retried the write itself (``retried``):
        one retry layer per failure (docs/architecture.md, retries)."""
        pauses = OUTCOME_WRITE_PAUSES if facts.outcome is not None or run.status.terminal else ()
        for pause in (*pauses, None):
            try:
                return self.store.write_run(run, step.etag, step.slot)
            except StorageUnavailable as exc:
                if pause is None or exc.retried:
                    raise
                self.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- effects ----------------------------------------------------------------------------
    def _perform(self, facts: Facts, effect: decide.Effect) -> Facts | None:
        """Perform one effect; an agent call returns the facts holding its answer."""
        if isinstance(effect, decide.Send):
            message = effect.message
            if message.traceparent is None:
                message = message.model_copy(update={"traceparent": telemetry.current_traceparent()})
            self.queue.send(message, effect.delay)
        elif isinstance(effect, decide.StartAgent | decide.PollAgent):
            return self._call_agent(facts, effect)
        elif isinstance(effect, decide.CancelAgent):
            self._cancel_agent(effect.run, effect.step, facts.now)
        elif isinstance(effect, decide.Unwatch):
            self.store.unwatch(effect.routine_id, effect.run_id, effect.up_to_version)
        elif isinstance(effect, decide.CompleteTimer):
            fired = effect.fired
            lifecycle.apply(
                self.store,
                effect.routine_id,
                lambda r, now: lifecycle.complete_timer(r, fired, now),
                self.clock,
            )
        elif isinstance(effect, decide.ReleasePermit):
            limits.give_back(self.store, self.queue, effect.key, effect.run_id)
        elif isinstance(effect, decide.CountOutcome):
            c = effect
            lifecycle.record_outcome(self.store, c.routine_id, c.run_id, c.status, c.ended_at, self.clock)
        elif isinstance(effect, decide.RecordThread):
            e = effect
            lifecycle.apply(
                self.store,
                e.routine_id,
                lambda r, now: lifecycle.record_thread(r, e.index, e.old, e.new, now),
                self.clock,
            )
        elif isinstance(effect, decide.Finished):
            run = facts.run if isinstance(facts.run, Run) else None
            trigger = run.trigger.value if run else None
            telemetry.record_run_finished(effect.status.value, trigger)
            telemetry.set_attributes({"run.status": effect.status.value})
        elif isinstance(effect, decide.Retrying):
            self._log_failed_attempt(facts, effect)
        elif isinstance(effect, decide.Decided):
            telemetry.set_attributes({"step.id": effect.step, "step.approved": effect.approved})
        return None

    def _call(self, run: Run, step: str, now: datetime) -> AgentCall:
        plan = decide.plan_of(run)
        result = decide.result(run, step)
        action = plan.actions[result.index]
        assert not isinstance(action, ApprovalStep), "approval steps never call an agent"
        first = not graph.dependencies(plan.actions)[step]
        override = run.progress.input_override if first else None
        context = placeholders.Context(
            steps={r.id: r.output for r in run.actions if r.status is StepStatus.succeeded},
            run={
                "id": run.id,
                "scheduled_for": utc_text(run.scheduled_for),
                "trigger": run.trigger.value,
                "attempt": result.attempt,
                "idempotency_key": run.idempotency_key,
            },
            routine={"id": run.routine_id, "name": plan.name},
            event=run.event.body if run.event else None,
            event_headers=run.event.headers if run.event else None,
        )
        return AgentCall(
            routine_id=run.routine_id,
            run_id=run.id,
            # Each step of a fire is its own agent call with its own stable key; a one-step routine
            # keeps the run's (as in version 1).
            idempotency_key=(
                run.idempotency_key if len(plan.actions) == 1 else f"{run.idempotency_key}:{step}"
            ),
            scheduled_for=run.scheduled_for,
            attempt=result.attempt,
            action_index=result.index,
            action_type=action.type,
            input=override if override is not None else placeholders.substitute_input(action.input, context),
            agent_id=action.agent_id,
            agent_name=action.agent_name,
            agent_version=action.agent_version,
            thread_id=action.thread_id if isinstance(action, ResponseAction) else None,
            max_thread_messages=action.max_thread_messages if isinstance(action, ResponseAction) else None,
            traceparent=telemetry.current_traceparent(),
            deadline=decide.call_deadline(run, step, now),
        )

    def _call_agent(self, facts: Facts, effect: decide.StartAgent | decide.PollAgent) -> Facts:
        assert isinstance(facts.run, Run)
        run, step = facts.run, effect.step
        plan = decide.plan_of(run)
        result = decide.result(run, step)
        telemetry.set_attributes({"routine.name": plan.name})
        starting = isinstance(effect, decide.StartAgent)
        if starting and result.attempt == 1:
            # A first step's lag runs from the run's due time (its scheduled time, plus jitter), a
            # later one's from when it was ready.
            later = bool(graph.dependencies(plan.actions)[step])
            ready = (decide.peek(run, step).ready_at if later else None) or run.due
            if later or run.trigger is not RunTrigger.manual:
                lag = (facts.now - ready).total_seconds()
                telemetry.record_dispatch_lag(lag, run.trigger.value, step if len(plan.actions) > 1 else None)
        call = self._call(run, step, facts.now)
        name = "routines.agent.start" if starting else "routines.agent.poll"
        outcome: AgentOutcome | AgentError
        step_attributes = {
            **telemetry.run_attributes(run.routine_id, run.id, result.attempt, plan.name),
            "step.id": step,
            "step.type": call.action_type,
        }
        try:
            with (
                telemetry.span(f"routines.step.{'start' if starting else 'poll'}", step_attributes),
                telemetry.span(name, telemetry.call_attributes(call, plan.name)),
            ):
                call = telemetry.with_traceparent(call)  # the agent sees this span as its caller
                backend, handle = self.backend, decide.peek(run, step).poll or {}
                if starting:
                    outcome = bounds.within_deadline(lambda: backend.start(call), call, self.clock)
                else:
                    outcome = bounds.within_deadline(lambda: backend.poll(call, handle), call, self.clock)
                outcome = bounds.checked(outcome, call)
        except AgentError as exc:
            outcome = exc
        return dataclasses.replace(
            facts, now=self.clock(), called=step, called_attempt=result.attempt, outcome=outcome
        )

    def _cancel_agent(self, run: Run, step: str, now: datetime) -> None:
        handle = decide.peek(run, step).poll
        if handle is None or run.progress.plan is None:
            return
        try:
            self.backend.cancel(self._call(run, step, now), handle)
        except Exception:  # best effort by contract; a backend bug must not keep the run open
            log.exception("cancelling the agent run of run %s failed", run.id)

    # --- telemetry --------------------------------------------------------------------------
    def _log_finished(self, run: Run) -> None:
        name = run.progress.plan.name if run.progress.plan else None
        fields = telemetry.run_attributes(run.routine_id, run.id, run.attempt, name)
        log.info("run %s of routine %s: %s", run.id, run.routine_id, run.status.value, extra=fields)

    def _log_failed_attempt(self, facts: Facts, effect: decide.Retrying) -> None:
        telemetry.attempt_failed(effect.error, effect.retriable)
        run = facts.run if isinstance(facts.run, Run) else None
        if run is None:
            return
        if effect.retry:
            telemetry.record_retry(run.trigger.value)
        attempt = (
            decide.result(run, effect.step).attempt if effect.step in decide.step_ids(run) else run.attempt
        )
        log.warning(
            "run %s of routine %s: step %s attempt %d failed (%s): %s",
            run.id,
            run.routine_id,
            effect.step,
            attempt,
            "retriable" if effect.retriable else "not retriable",
            effect.error[:300],
            extra=telemetry.run_attributes(run.routine_id, run.id, run.attempt, None),
        )
