"""The dispatcher: one queue message = one fire, retry or status poll of one routine.

Invariants (SPEC 3):
- One fire = one run: the run id is derived from (routine id, scheduled time) and inserted if absent.
- At most one agent start per attempt: an attempt is *claimed* by an etag-conditional run write that
  sets an expiring lease before the agent is called. A message that finds the attempt leased re-queues
  itself to come back when the lease ends; a crashed worker's attempt is taken over after it.
- Waiting costs no compute: a pending agent run is checked through delayed ``poll`` messages, and a
  retry is a new message with a visibility delay. The handler always returns normally; only a storage
  outage raises (so the host redelivers the message later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from routines import retry, schedule, telemetry
from routines.agents.base import AgentBackend, AgentCall, AgentError, AgentOutcome
from routines.errors import Conflict, NotFound, PreconditionFailed, StorageUnavailable
from routines.messages import DispatchMessage, DispatchQueue, delay_until
from routines.models import (
    OUTPUT_LIMIT_BYTES,
    ActionResult,
    OverlapPolicy,
    ResponseAction,
    Routine,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    idempotency_key,
    now_utc,
)
from routines.scheduler import OWNER
from routines.store import SlotTaken, SlotWrite, Store

log = logging.getLogger(__name__)

LEASE_MARGIN = timedelta(seconds=30)
MAX_EARLY_WAIT = 2.5  # fires surface 1-2 s early (scheduler.fire_delay, whole-second visibility delays)
MIN_POLL_SECONDS = 1.0  # visibility delays are whole seconds: anything shorter would poll in a tight loop
MAX_POLL_SECONDS = 30.0
POLL_BACKOFF = 0.25  # poll again after a quarter of the time the run has taken so far (guarantee 6)
FINISH_RETRY_PAUSES = (0.2, 0.5, 1.0)  # a lost final write would hold the run until its lease ends
ABANDONED_AFTER = timedelta(minutes=10)  # a non-terminal run untouched this long no longer blocks others


class PoisonMessage(ValueError):  # named for what happens to the message
    """The message cannot be read; it belongs in the poison queue."""


def truncate_output(text: str | None) -> str | None:
    if text is None:
        return None
    data = text.encode()
    if len(data) <= OUTPUT_LIMIT_BYTES:
        return text
    return data[:OUTPUT_LIMIT_BYTES].decode(errors="ignore")


def is_manual_run(run_id: str) -> bool:
    return run_id.rsplit("_", 1)[-1].startswith("m")


@dataclass
class Dispatcher:
    store: Store
    queue: DispatchQueue
    backend: AgentBackend
    clock: Callable[[], datetime] = now_utc
    sleep: Callable[[float], None] = time.sleep
    owner: str = OWNER

    # --- entry point ------------------------------------------------------------------------
    def handle(self, body: bytes | str) -> None:
        """Process one message. Raises ``PoisonMessage`` for an unreadable one (the caller moves it to
        the poison queue) and ``StorageUnavailable`` when storage is down (the host redelivers)."""
        try:
            message = DispatchMessage.decode(body)
        except ValueError as exc:
            raise PoisonMessage(f"unreadable dispatch message: {str(exc)[:300]}") from None
        attributes = {
            "routine.id": message.routine_id,
            "run.id": message.run_id,
            "run.attempt": message.attempt,
            "dispatch.kind": message.kind,
        }  # not message.*: Application Insights drops that prefix
        with telemetry.span(f"routines.dispatch.{message.kind}", attributes, message.traceparent):
            if message.kind == "poll":
                self._poll(message)
            else:
                self._start(message)

    # --- fire / retry -----------------------------------------------------------------------
    def _start(self, message: DispatchMessage) -> None:
        # Wait out an early arrival first, so the routine read below is the state at the fire's time: a
        # routine disabled, edited or deleted during the wait does not run (guarantee 4).
        self._wait_until(message.scheduled_for)
        try:
            routine, _ = self.store.get_routine(message.routine_id)
        except NotFound:
            self._routine_gone(message)
            return
        manual = is_manual_run(message.run_id)
        if not manual and message.kind == "fire" and self._stale(routine, message):
            self._stale_fire(routine, message)
            return
        now = self.clock()
        if message.kind == "fire" and not manual:
            run = self._new_run(routine, message, now)
            slot = SlotWrite(holder=run.id) if self._uses_slot(routine) else None
            run.progress.holds_slot = slot is not None
            try:
                etag = self.store.insert_run(run, slot)
            except Conflict:
                self._existing(routine, message)
                return
            except SlotTaken:
                self._overlap(routine, message, None)
                return
            if routine.trigger.type == "timer":
                self._complete_timer(routine.id)
            self._run_attempt(routine, run, etag, message.traceparent)
            return
        self._existing(routine, message)

    def _stale(self, routine: Routine, message: DispatchMessage) -> bool:
        """Guarantee 4: deleted (handled by the caller), disabled, or rescheduled since enqueued."""
        if routine.state is RoutineState.disabled or message.routine_version < routine.schedule_version:
            return True
        try:
            expected = schedule.next_fire_after(routine.trigger, message.scheduled_for - timedelta(seconds=1))
        except schedule.ScheduleError:
            return True
        return expected != message.scheduled_for

    def _stale_fire(self, routine: Routine, message: DispatchMessage) -> None:
        """A stale fire does not start (guarantee 4), but its run may exist already and must still
        end: one waiting for the overlap slot (buffered, or handed the slot) is cancelled, which
        releases the slot; one already started goes on like any other (a crashed worker's attempt is
        taken over after its lease, its retries and polls carry on)."""
        try:
            run, etag = self.store.get_run(routine.id, message.run_id)
        except NotFound:
            log.info("dropping stale fire %s of routine %s", message.scheduled_for, routine.id)
            return
        if run.status is RunStatus.queued:
            reason = "the routine was disabled or rescheduled before this fire could start"
            self._finish(routine, run, etag, RunStatus.cancelled, f"cancelled: {reason}")
        elif not run.status.terminal:
            self._existing(routine, message)

    def _wait_until(self, when: datetime) -> None:
        early = (when - self.clock()).total_seconds()
        if early > 0:
            self.sleep(min(early, MAX_EARLY_WAIT))

    def _new_run(self, routine: Routine, message: DispatchMessage, now: datetime) -> Run:
        return Run(
            id=message.run_id,
            routine_id=routine.id,
            trigger=RunTrigger(routine.trigger.type),
            scheduled_for=message.scheduled_for,
            status=RunStatus.running,
            attempt=1,
            max_attempts=routine.retry_policy.max_attempts,
            started_at=now,
            idempotency_key=idempotency_key(routine.id, message.scheduled_for),
            trace_id=telemetry.current_trace_id(),
            actions=[ActionResult(index=i) for i in range(len(routine.actions))],
            progress=RunProgress(
                lease_owner=self.owner,
                lease_until=self._lease_end(routine, now),
                routine_version=message.routine_version,
                attempt_started_at=now,
            ),
        )

    def _lease_end(self, routine: Routine, now: datetime) -> datetime:
        return now + timedelta(seconds=routine.timeout_seconds) + LEASE_MARGIN

    @staticmethod
    def _uses_slot(routine: Routine) -> bool:
        return routine.overlap_policy is not OverlapPolicy.allow_all

    def _routine_gone(self, message: DispatchMessage) -> None:
        """A deleted routine's scheduled fires are dropped; a run already recorded (manual, buffered,
        retrying) is closed as cancelled so nothing stays open."""
        try:
            run, etag = self.store.get_run(message.routine_id, message.run_id)
        except NotFound:
            log.info("dropping fire of deleted routine %s", message.routine_id)
            return
        if not run.status.terminal:
            self._finish(None, run, etag, RunStatus.cancelled, "the routine was deleted")

    def _existing(self, routine: Routine, message: DispatchMessage) -> None:
        """A redelivery, a duplicate, a retry, or a run recorded before its message (manual, buffered).

        A redelivery may follow a crash (or a queue outage) between a run write and the message that
        carries the run on (poll, retry, release of a buffered fire) or the timer's completion: it
        does that step again. Duplicates of those are harmless, every step being etag-conditional."""
        run, etag = self.store.get_run(routine.id, message.run_id)
        now = self.clock()
        timer_fire = message.kind == "fire" and run.trigger is RunTrigger.timer
        if timer_fire and routine.state is RoutineState.enabled:
            self._complete_timer(routine.id)
        if run.status.terminal:
            self._resume_handover(routine.id, run)
            return
        if message.attempt < max(run.attempt, 1):
            return  # a message of an earlier attempt
        progress = run.progress
        if run.status is RunStatus.running and run.attempt == message.attempt:
            if progress.poll is not None:
                if message.kind != "poll":  # the start's own message again: its first poll may be lost
                    self.queue.send(self._message(run, "poll"), MIN_POLL_SECONDS)
                return  # started; its poll messages drive it from here
            if progress.lease_until and progress.lease_until > now:
                # Someone holds this attempt. Come back when the lease ends: if they crashed, the
                # attempt is taken over then; if not, the run will be finished and this is a no-op.
                wait = (progress.lease_until - now).total_seconds() + 1
                self.queue.send(message, wait)
                return
        elif run.status is RunStatus.retrying:
            if message.attempt == run.attempt:  # the failed attempt's message again: its retry may be lost
                retry_message = self._message(run, "retry").model_copy(update={"attempt": run.attempt + 1})
                self.queue.send(retry_message, delay_until(run.next_attempt_at or now, now))
                return
            if message.attempt != run.attempt + 1:
                return
            if run.next_attempt_at and run.next_attempt_at > now + timedelta(seconds=MAX_EARLY_WAIT):
                self.queue.send(message, (run.next_attempt_at - now).total_seconds())
                return
            if run.next_attempt_at:
                self._wait_until(run.next_attempt_at)  # surfaced early (whole-second delays): wait it out
        elif run.status is not RunStatus.queued:
            return
        self._claim(routine, run, etag, message)

    def _claim(self, routine: Routine, run: Run, etag: str, message: DispatchMessage) -> None:
        now = self.clock()
        slot = None
        if run.status is RunStatus.queued and self._uses_slot(routine):
            if not run.progress.holds_slot:
                slot = SlotWrite(holder=run.id)
            else:
                # Handed the slot, or only buffered behind its holder (a duplicate of a buffered fire's
                # message must not start it early): only the holder may start.
                current = self.store.get_slot(routine.id)
                if current is None:
                    slot = SlotWrite(holder=run.id)
                elif current.holder != run.id:
                    self._overlap(routine, message, (run, etag))
                    return
        claimed = run.model_copy(deep=True)
        claimed.status = RunStatus.running
        claimed.attempt = message.attempt
        claimed.next_attempt_at = None
        claimed.started_at = claimed.started_at or now
        claimed.trace_id = claimed.trace_id or telemetry.current_trace_id()
        if not claimed.actions:
            claimed.actions = [ActionResult(index=i) for i in range(len(routine.actions))]
        claimed.progress.lease_owner = self.owner
        claimed.progress.lease_until = self._lease_end(routine, now)
        claimed.progress.attempt_started_at = now
        claimed.progress.holds_slot = claimed.progress.holds_slot or slot is not None
        try:
            new_etag = self.store.replace_run(claimed, etag, slot)
        except PreconditionFailed:
            return  # another worker moved this run first; its own messages carry on
        except SlotTaken:
            self._overlap(routine, message, (run, etag))
            return
        self._run_attempt(routine, claimed, new_etag, message.traceparent)

    # --- overlap ----------------------------------------------------------------------------
    def _overlap(self, routine: Routine, message: DispatchMessage, existing: tuple[Run, str] | None) -> None:
        """The slot is held. Take it over if its holder is finished or abandoned; otherwise skip the
        fire, or buffer it (``buffer_one``, one waiting fire at most)."""
        now = self.clock()
        slot = self.store.get_slot(routine.id)
        if slot is None:
            self.queue.send(message, 0)  # released meanwhile: try again from the top
            return
        try:
            holder, _ = self.store.get_run(routine.id, slot.holder)
            holder_active = not holder.status.terminal and not self._abandoned(holder, now)
        except NotFound:
            holder_active = False
        run = existing[0] if existing else self._new_run(routine, message, now)
        if not holder_active:
            run.progress.holds_slot = True
            write = SlotWrite(
                holder=run.id, buffered=None if slot.buffered == run.id else slot.buffered, etag=slot.etag
            )
            run.status, run.attempt = RunStatus.queued, 0
            self._write_overlap(run, existing, write)
            self.queue.send(message, 0)
            return
        if routine.overlap_policy is OverlapPolicy.buffer_one and slot.buffered in (None, run.id):
            run.status, run.attempt, run.started_at = RunStatus.queued, 0, None
            run.progress = RunProgress(routine_version=message.routine_version, holds_slot=True)
            self._write_overlap(run, existing, SlotWrite(holder=slot.holder, buffered=run.id, etag=slot.etag))
            return
        run.status, run.attempt, run.ended_at = RunStatus.skipped, 0, now
        run.started_at = None
        run.progress = RunProgress()
        run.error_message = (
            f"skipped: run {slot.holder} of this routine was still running (overlap_policy "
            f"{routine.overlap_policy.value})"
        )
        self._write_overlap(run, existing, None)
        telemetry.record_run_finished("skipped", run.trigger.value)

    def _write_overlap(self, run: Run, existing: tuple[Run, str] | None, slot: SlotWrite | None) -> None:
        try:
            if existing:
                self.store.replace_run(run, existing[1], slot)
            else:
                self.store.insert_run(run, slot)
        except (Conflict, PreconditionFailed, SlotTaken):
            # Lost a race with another delivery or a slot change: let the message come round again.
            self.queue.send(
                DispatchMessage(
                    kind="fire",
                    routine_id=run.routine_id,
                    scheduled_for=run.scheduled_for,
                    routine_version=run.progress.routine_version or 1,
                    attempt=1,
                    run_id=run.id,
                    traceparent=telemetry.current_traceparent(),
                ),
                1,
            )

    @staticmethod
    def _abandoned(run: Run, now: datetime) -> bool:
        progress = run.progress
        marks = [m for m in (progress.lease_until, progress.poll_deadline, run.next_attempt_at) if m]
        return bool(marks) and max(marks) + ABANDONED_AFTER < now

    # --- running an attempt -----------------------------------------------------------------
    def _call(self, routine: Routine, run: Run, index: int, traceparent: str | None) -> AgentCall:
        action = routine.actions[index]
        override = run.progress.input_override if index == 0 else None
        started = run.progress.attempt_started_at or self.clock()
        return AgentCall(
            routine_id=routine.id,
            run_id=run.id,
            # Each action of a fire is its own agent call: later actions get their own stable key.
            idempotency_key=run.idempotency_key if index == 0 else f"{run.idempotency_key}/{index}",
            scheduled_for=run.scheduled_for,
            attempt=run.attempt,
            action_index=index,
            action_type=action.type,
            input=override if override is not None else action.input,
            agent_id=action.agent_id,
            agent_name=action.agent_name,
            agent_version=action.agent_version,
            thread_id=action.thread_id if isinstance(action, ResponseAction) else None,
            max_thread_messages=action.max_thread_messages if isinstance(action, ResponseAction) else None,
            traceparent=traceparent or telemetry.current_traceparent(),
            deadline=started + timedelta(seconds=routine.timeout_seconds),
        )

    def _run_attempt(self, routine: Routine, run: Run, etag: str, traceparent: str | None) -> None:
        """Start the actions from ``progress.action_index`` until one is pending or all are done."""
        telemetry.set_attributes({"routine.name": routine.name})
        if run.attempt == 1 and run.progress.action_index == 0 and run.trigger is not RunTrigger.manual:
            lag = (self.clock() - run.scheduled_for).total_seconds()
            telemetry.record_dispatch_lag(lag, run.trigger.value)
        max_age = routine.retry_policy.max_age_seconds
        if max_age is not None and self.clock() > run.scheduled_for + timedelta(seconds=max_age):
            self._finish(
                routine,
                run,
                etag,
                RunStatus.failed,
                f"attempt {run.attempt} not started: more than max_age_seconds ({max_age}s) after "
                f"the scheduled time",
            )
            return
        while run.progress.action_index < len(routine.actions):
            index = run.progress.action_index
            call = self._call(routine, run, index, traceparent)
            try:
                with telemetry.span("routines.agent.start", telemetry.call_attributes(call, routine.name)):
                    outcome = self.backend.start(telemetry.with_traceparent(call))  # the agent span's context
            except AgentError as exc:
                self._failed_attempt(routine, run, etag, index, exc)
                return
            if not outcome.done:
                self._pending(routine, run, etag, index, outcome)
                return
            run = self._action_done(routine, run, index, outcome)
        self._finish(routine, run, etag, RunStatus.succeeded, None)

    def _action_done(self, routine: Routine, run: Run, index: int, outcome: AgentOutcome) -> Run:
        run = run.model_copy(deep=True)
        result = run.actions[index]
        result.status = RunStatus.succeeded
        result.output = truncate_output(outcome.output)
        result.thread_id = outcome.thread_id or result.thread_id
        result.agent_run_id = outcome.agent_run_id or result.agent_run_id
        result.error_message = None
        run.progress.action_index = index + 1
        run.progress.poll = None
        run.progress.poll_deadline = None
        action = routine.actions[index]
        if isinstance(action, ResponseAction) and outcome.thread_id and outcome.thread_id != action.thread_id:
            self._record_thread(routine.id, index, action.thread_id, outcome.thread_id)
        return run

    def _pending(self, routine: Routine, run: Run, etag: str, index: int, outcome: AgentOutcome) -> None:
        pending = run.model_copy(deep=True)
        result = pending.actions[index]
        result.status = RunStatus.running
        result.thread_id = outcome.thread_id or result.thread_id
        result.agent_run_id = outcome.agent_run_id or result.agent_run_id
        pending.progress.poll = outcome.handle or {}
        pending.progress.poll_deadline = self._call(routine, pending, index, None).deadline
        pending.progress.lease_owner, pending.progress.lease_until = None, None
        try:
            self.store.replace_run(pending, etag)
        except PreconditionFailed:
            log.warning("run %s changed while its agent started; leaving it to the other worker", run.id)
            return
        self.queue.send(self._message(pending, "poll"), self._poll_delay(pending, outcome))

    def _poll_delay(self, run: Run, outcome: AgentOutcome) -> float:
        """Back off as the run goes on, so the number of polls grows with the log of its duration,
        not linearly; never less than the agent's own hint, never much past the deadline."""
        now = self.clock()
        elapsed = (now - (run.progress.attempt_started_at or now)).total_seconds()
        delay = max(MIN_POLL_SECONDS, outcome.poll_after, min(MAX_POLL_SECONDS, elapsed * POLL_BACKOFF))
        if run.progress.poll_deadline:
            delay = min(delay, max(MIN_POLL_SECONDS, (run.progress.poll_deadline - now).total_seconds() + 1))
        return delay

    def _poll(self, message: DispatchMessage) -> None:
        try:
            run, etag = self.store.get_run(message.routine_id, message.run_id)
        except NotFound:
            return
        if run.status.terminal and run.attempt == message.attempt:
            self._resume_handover(run.routine_id, run)  # a poll that finished the run, redelivered
            return
        if run.status is not RunStatus.running or run.attempt != message.attempt or run.progress.poll is None:
            return  # finished, or moved on: a stale poll
        try:
            routine, _ = self.store.get_routine(run.routine_id)
        except NotFound:
            self._finish(None, run, etag, RunStatus.cancelled, "the routine was deleted while its agent ran")
            return
        index = run.progress.action_index
        call = self._call(routine, run, index, message.traceparent)
        now = self.clock()
        try:
            with telemetry.span("routines.agent.poll", telemetry.call_attributes(call, routine.name)):
                call = telemetry.with_traceparent(call)  # the agent sees the poll span as the caller
                if run.progress.poll_deadline and now >= run.progress.poll_deadline:
                    self.backend.cancel(call, run.progress.poll)
                    raise AgentError(
                        f"timed out after {routine.timeout_seconds}s (timeout_seconds); cancelled",
                        retriable=True,
                    )
                outcome = self.backend.poll(call, run.progress.poll)
        except AgentError as exc:
            self._failed_attempt(routine, run, etag, index, exc)
            return
        if not outcome.done:
            self.queue.send(message, self._poll_delay(run, outcome))
            return
        run = self._action_done(routine, run, index, outcome)
        if run.progress.action_index >= len(routine.actions):
            self._finish(routine, run, etag, RunStatus.succeeded, None)
            return
        # More actions: claim the next start like a new attempt, so a duplicated poll cannot start it twice.
        run.progress.lease_owner = self.owner
        run.progress.lease_until = self._lease_end(routine, now)
        try:
            etag = self.store.replace_run(run, etag)
        except PreconditionFailed:
            return
        self._run_attempt(routine, run, etag, message.traceparent)

    # --- endings ----------------------------------------------------------------------------
    def _failed_attempt(self, routine: Routine, run: Run, etag: str, index: int, exc: AgentError) -> None:
        telemetry.attempt_failed(str(exc), exc.retriable)
        log.warning(
            "run %s of routine %s: attempt %d failed (%s): %s",
            run.id,
            routine.id,
            run.attempt,
            "retriable" if exc.retriable else "not retriable",
            str(exc)[:300],
            extra=telemetry.run_attributes(routine.id, run.id, run.attempt, routine.name),
        )
        now = self.clock()
        failed = run.model_copy(deep=True)
        failed.actions[index].status = RunStatus.failed
        failed.actions[index].error_message = str(exc)[:1000]
        failed.error_message = f"attempt {run.attempt}: {str(exc)[:1000]}"
        decision = retry.decide(
            routine.retry_policy, run.attempt, exc.retriable, exc.retry_after, run.scheduled_for, now
        )
        if not decision.retry:
            if exc.retriable:
                failed.error_message += f" (no retry: {decision.reason})"
            self._finish(routine, failed, etag, RunStatus.failed, failed.error_message)
            return
        failed.status = RunStatus.retrying
        failed.next_attempt_at = now + timedelta(seconds=decision.delay_seconds)
        failed.progress.poll = None
        failed.progress.poll_deadline = None
        failed.progress.lease_owner, failed.progress.lease_until = None, None
        try:
            self.store.replace_run(failed, etag)
        except PreconditionFailed:
            return
        telemetry.record_retry(run.trigger.value)
        next_attempt = self._message(failed, "retry")
        self.queue.send(next_attempt.model_copy(update={"attempt": run.attempt + 1}), decision.delay_seconds)

    def _finish(
        self, routine: Routine | None, run: Run, etag: str, status: RunStatus, error: str | None
    ) -> None:
        now = self.clock()
        final = run.model_copy(deep=True)
        final.status = status
        final.ended_at = now
        final.next_attempt_at = None
        final.error_message = error
        holds_slot = final.progress.holds_slot
        final.progress = RunProgress(action_index=final.progress.action_index)
        buffered: str | None = None
        slot_write = None
        if holds_slot:
            slot = self.store.get_slot(run.routine_id)
            if slot and slot.holder == run.id:
                buffered = slot.buffered
                slot_write = SlotWrite(holder=buffered, buffered=None, etag=slot.etag)
        try:
            self._write_final(final, etag, slot_write)
        except PreconditionFailed:
            log.warning("run %s changed before it could be finished; leaving it", run.id)
            return
        except SlotTaken:
            # A fire was buffered meanwhile: read the slot again and hand it over.
            self._finish(routine, run, etag, status, error)
            return
        telemetry.record_run_finished(status.value, run.trigger.value)
        telemetry.set_attributes({"run.status": status.value})
        name = routine.name if routine else None
        fields = telemetry.run_attributes(run.routine_id, run.id, run.attempt, name)
        log.info("run %s of routine %s: %s", run.id, run.routine_id, status.value, extra=fields)
        if buffered:
            self._release_buffered(run.routine_id, buffered)

    def _write_final(self, final: Run, etag: str, slot_write: SlotWrite | None) -> None:
        """The outcome write, retried through a short storage blip (it is etag-conditional, so a retry
        is safe): failing here would leave the run leased and its agent started again after the lease.
        A retry that finds the etag moved checks whether the earlier try landed after all."""
        for pause in (*FINISH_RETRY_PAUSES, None):
            try:
                self.store.replace_run(final, etag, slot_write)
                return
            except StorageUnavailable:
                if pause is None:
                    raise
                self.sleep(pause)
            except PreconditionFailed:
                current, _ = self.store.get_run(final.routine_id, final.id)
                if current.status is final.status and current.ended_at == final.ended_at:
                    return  # our earlier try was written; only its answer was lost
                raise

    def _release_buffered(self, routine_id: str, run_id: str) -> None:
        try:
            waiting, _ = self.store.get_run(routine_id, run_id)
        except NotFound:
            return
        self.queue.send(
            DispatchMessage(
                kind="fire",
                routine_id=routine_id,
                scheduled_for=waiting.scheduled_for,
                routine_version=waiting.progress.routine_version or 1,
                attempt=1,
                run_id=run_id,
                traceparent=telemetry.current_traceparent(),
            ),
            0,
        )

    def _resume_handover(self, routine_id: str, run: Run) -> None:
        """A message of the finished ``run`` came again. If the run handed the slot to a waiting one,
        the release message of that one may have been lost to a crash right after the hand-over:
        send it again (a duplicate release is harmless, the claim being etag-conditional)."""
        slot = self.store.get_slot(routine_id)
        if slot is None or slot.holder == run.id:
            return
        try:
            waiting, _ = self.store.get_run(routine_id, slot.holder)
        except NotFound:
            return
        if waiting.status is RunStatus.queued and waiting.progress.holds_slot:
            self._release_buffered(routine_id, waiting.id)

    def _message(self, run: Run, kind: Literal["fire", "retry", "poll"]) -> DispatchMessage:
        return DispatchMessage(
            kind=kind,
            routine_id=run.routine_id,
            scheduled_for=run.scheduled_for,
            routine_version=run.progress.routine_version or 1,
            attempt=run.attempt,
            run_id=run.id,
            traceparent=telemetry.current_traceparent(),
        )

    # --- routine side effects ---------------------------------------------------------------
    def _complete_timer(self, routine_id: str) -> None:
        self._update_routine(
            routine_id,
            lambda r: (
                r.model_copy(
                    update={
                        "state": RoutineState.completed,
                        "next_fire_at": None,
                        "due_at": None,
                        "version": r.version + 1,
                    }
                )
                if r.state is RoutineState.enabled and r.trigger.type == "timer"
                else None
            ),
        )

    def _record_thread(self, routine_id: str, index: int, old: str | None, new: str) -> None:
        def change(routine: Routine) -> Routine | None:
            action = routine.actions[index] if index < len(routine.actions) else None
            if not isinstance(action, ResponseAction) or action.thread_id != old:
                return None  # edited meanwhile: the user's change wins
            actions = list(routine.actions)
            actions[index] = action.model_copy(update={"thread_id": new})
            return routine.model_copy(update={"actions": actions, "version": routine.version + 1})

        self._update_routine(routine_id, change)

    def _update_routine(self, routine_id: str, change: Callable[[Routine], Routine | None]) -> None:
        for _ in range(5):
            try:
                routine, etag = self.store.get_routine(routine_id)
            except NotFound:
                return
            updated = change(routine)
            if updated is None:
                return
            updated.updated_at = self.clock()
            try:
                self.store.replace_routine(updated, etag, routine)
                return
            except PreconditionFailed:
                continue
            except NotFound:
                return
