"""The domain operations on routines and runs, independent of HTTP.

``routines.api`` (the management API) parses requests, calls these and renders their answers; any other
surface (a drop-in API shaped like another product's) calls the same operations. Each takes plain
values and returns models; errors are the domain's: ``NotFound``, ``Conflict``, ``PreconditionFailed``,
``Invalid`` (with ``errors`` items), ``StorageUnavailable``.

Every write lands before the fires it makes valid are enqueued (docs: the README's design notes).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic

from routines import decide, graph, lifecycle, scheduler, telemetry, validation
from routines.config import Settings
from routines.errors import Invalid, PreconditionFailed, StorageUnavailable
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    MUTABLE_FIELDS,
    SCHEDULE_FIELDS,
    ApprovalStep,
    Routine,
    RoutineCreate,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    _RoutineFields,
    manual_run_id,
    new_routine_id,
    now_utc,
)
from routines.store import Page, Store
from routines.webhooks import intake

log = logging.getLogger(__name__)
Change = Callable[[Routine, datetime], "Routine | scheduler.Immediate | None"]


@dataclass
class Service:
    store: Store
    queue: DispatchQueue
    settings: Settings
    clock: Callable[[], datetime] = now_utc

    def _context(self, now: datetime) -> dict[str, Any]:
        return {
            "min_interval_seconds": self.settings.min_interval_seconds,
            "now": now,
            "app_setting": self.settings.app_setting,  # a webhook's secret_setting must be defined
        }

    # --- routines ---------------------------------------------------------------------------
    def create_routine(self, data: dict[str, Any]) -> Routine:
        """Create a routine from its fields as given. Raises ``Invalid``, ``Conflict`` (name taken)."""
        now = self.clock()
        try:
            spec = RoutineCreate.model_validate(data, context=self._context(now))
        except pydantic.ValidationError as exc:
            raise validation.invalid(exc) from None
        routine = Routine(
            **spec.model_dump(exclude={"state"}),
            id=new_routine_id(),
            state=spec.state,
            created_at=now,
            updated_at=now,
            version=1,
            schedule_version=1,
            disabled_reason="manual" if spec.state is RoutineState.disabled else None,
        )
        # Written first, with a watch of each near fire; enqueued after (docs/guarantees.md #1).
        plan = scheduler.plan_immediately(routine, now) if routine.state is RoutineState.enabled else None
        routine = plan.routine if plan else routine
        self.store.create_routine(routine, plan.watches if plan else ())
        if plan:
            scheduler.send_immediate(self.queue, plan)
        return routine

    def get_routine(self, routine_id: str) -> Routine:
        return self.store.get_routine(routine_id)[0]

    def get_routine_by_name(self, name: str) -> Routine:
        """Raises ``NotFound``."""
        return self.store.get_routine_by_name(name)[0]

    def list_routines(self, state: RoutineState | None, limit: int, continuation: str | None) -> Page:
        return self.store.list_routines(state.value if state else None, limit, continuation)

    def delete_routine(self, routine_id: str) -> None:
        self.store.delete_routine(routine_id)

    def update_routine(self, routine_id: str, patch: dict[str, Any], expected_version: int | None) -> Routine:
        """Apply a JSON merge patch of the mutable fields. ``expected_version``: fail with
        ``PreconditionFailed`` unless the routine is at that version (checked after validation, so an
        invalid patch is ``Invalid`` whatever the version). Raises ``NotFound``, ``Invalid``,
        ``Conflict`` (name taken)."""
        unknown = [k for k in patch if k not in MUTABLE_FIELDS]
        if unknown:
            raise Invalid(
                f"{unknown[0]}: cannot be changed with PATCH",
                [{"loc": [k], "msg": "unknown or read-only field"} for k in unknown],
            )

        def change(current: Routine, now: datetime) -> Routine | scheduler.Immediate | None:
            merged = merge_patch(current.model_dump(mode="json", include=set(MUTABLE_FIELDS)), patch)
            old_trigger = current.trigger.model_dump(mode="json")
            if (
                isinstance(patch.get("trigger"), dict)
                and patch["trigger"].get("type", old_trigger["type"]) != old_trigger["type"]
            ):
                merged["trigger"] = patch["trigger"]  # a new kind of trigger replaces the old one whole
            # The rules that read the clock (a timer ahead, end_at ahead) apply when the schedule is edited.
            before = current.model_dump(mode="json", include=set(SCHEDULE_FIELDS))
            edited = any(merged.get(k) != before.get(k) for k in SCHEDULE_FIELDS)
            context = self._context(now) if edited else {"min_interval_seconds": 0}
            try:
                fields = _RoutineFields.model_validate(merged, context=context)
            except pydantic.ValidationError as exc:
                raise validation.invalid(exc) from None
            if expected_version is not None and expected_version != current.version:
                raise PreconditionFailed(
                    f"routine {current.id} is at version {current.version}, not {expected_version}"
                )
            values, old = fields.model_dump(), current.model_dump()
            if all(values[k] == old[k] for k in values):
                return None
            rescheduled = any(values[k] != old[k] for k in SCHEDULE_FIELDS)
            updated = current.model_copy(
                update={**dict(fields), "version": current.version + 1, "updated_at": now}
            )
            if rescheduled:
                updated = lifecycle.reschedule(updated, now, current)
                if updated.state is RoutineState.enabled:
                    return scheduler.plan_immediately(updated, now)
            return updated

        return self._update(routine_id, change)

    def disable_routine(self, routine_id: str) -> Routine:
        return self._update(routine_id, lifecycle.disable)

    def enable_routine(self, routine_id: str) -> Routine:
        """Raises ``NotFound``, ``Conflict`` (a completed timer, or one whose time has passed)."""

        def change(current: Routine, now: datetime) -> scheduler.Immediate | None:
            enabled = lifecycle.enable(current, now)
            return scheduler.plan_immediately(enabled, now) if enabled else None

        return self._update(routine_id, change)

    def _update(self, routine_id: str, change: Change) -> Routine:
        """Read, change, write conditionally; on a lost race read again. ``change`` returns None
        for "nothing to do", or a routine with near fires to enqueue once it is written."""
        for _ in range(8):
            now = self.clock()
            current, etag = self.store.get_routine(routine_id)
            updated = change(current, now)
            if updated is None:
                return current
            plan = updated if isinstance(updated, scheduler.Immediate) else scheduler.Immediate(updated)
            try:
                self.store.replace_routine(plan.routine, etag, current, plan.watches)
            except PreconditionFailed:
                continue
            scheduler.send_immediate(self.queue, plan)
            return plan.routine
        raise StorageUnavailable(f"routine {routine_id} kept changing; try again")

    # --- runs -------------------------------------------------------------------------------
    def dispatch_routine(self, routine_id: str, override: str | dict[str, Any] | None) -> Run:
        """Start a manual run now; ``override`` replaces the input of the steps that start with the
        run. Raises
        ``NotFound``, ``Invalid``."""
        routine = self.get_routine(routine_id)
        if override is not None:
            deps = graph.dependencies(routine.actions)
            for action, step in zip(routine.actions, graph.step_ids(routine.actions), strict=True):
                if deps[step] or isinstance(action, ApprovalStep):
                    continue
                try:  # the size and depth rules of an input
                    type(action).model_validate({**action.model_dump(), "input": override})
                except pydantic.ValidationError as exc:
                    raise validation.invalid(exc) from None
                break
        now = self.clock()
        run_id = manual_run_id(now)
        run = Run(
            id=run_id,
            routine_id=routine.id,
            trigger=RunTrigger.manual,
            scheduled_for=now,
            status=RunStatus.queued,
            max_attempts=routine.retry_policy.max_attempts,
            idempotency_key=f"{routine.id}:manual:{run_id}",
            progress=RunProgress(input_override=override, routine_version=routine.version),
        )
        message = DispatchMessage(
            kind="fire",
            routine_id=routine.id,
            scheduled_for=now,
            routine_version=routine.version,
            attempt=1,
            run_id=run_id,
            traceparent=telemetry.current_traceparent(),
        )
        # Watch, then the run, then its message: whichever step a failure stops at, nothing is left
        # queued for ever (the repair pass sends a watched run's message again, and drops a watch
        # whose run was never written).
        self.store.watch([scheduler.watch_for(message, "manual")])
        self.store.insert_run(run)
        try:
            self.queue.send(message)
        except StorageUnavailable as exc:
            log.warning("manual run %s accepted but not enqueued (%s); the repair pass sends it", run_id, exc)
        return run

    def receive_webhook(self, key: str, headers: Mapping[str, str], body: bytes) -> intake.Outcome:
        """Take one webhook delivery for the routine ``key`` names (id or name); see
        ``routines.webhooks.intake.Intake.receive`` for what it answers and raises."""
        return intake.Intake(self.store, self.queue, self.settings, self.clock).receive(key, headers, body)

    def list_runs(
        self, routine_id: str, status: RunStatus | None, limit: int, continuation: str | None
    ) -> Page:
        """Newest first. Raises ``NotFound`` for an unknown routine (a deleted one keeps its runs)."""
        page = self.store.list_runs(routine_id, status, limit, continuation)
        if not page.items and continuation is None:
            self.store.get_routine(routine_id)
        return page

    def get_run(self, routine_id: str, run_id: str) -> Run:
        return self.store.get_run(routine_id, run_id)[0]

    def decide_step(
        self, routine_id: str, run_id: str, step_id: str, approved: bool, comment: str | None
    ) -> Run:
        """Approve or reject the waiting approval step ``step_id``; the run moves on in the dispatcher
        (sent the step's ``poll`` once the decision is written; if that send is lost, the repair
        pass sends it). Raises ``NotFound`` (run or step), ``Conflict`` (the step is not waiting)."""
        for _ in range(8):
            run, etag = self.store.get_run(routine_id, run_id)
            decided = decide.decide_approval(run, step_id, approved, comment, self.clock())
            try:
                self.store.replace_run(decided, etag)
            except PreconditionFailed:
                continue  # a step of the run moved meanwhile: decide again on what is there now
            message = decide.step_message(decided, step_id, "poll")
            if run.trace_id:  # the run's own trace, so the decision shows with the rest of the run
                message = message.model_copy(
                    update={"traceparent": f"00-{run.trace_id}-{secrets.token_hex(8)}-01"}
                )
            try:
                self.queue.send(message)
            except StorageUnavailable as exc:
                log.warning(
                    "run %s: step %s decided, not enqueued (%s); the repair pass sends it",
                    run_id,
                    step_id,
                    exc,
                )
            return decided
        raise StorageUnavailable(f"run {run_id} kept changing; try again")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
