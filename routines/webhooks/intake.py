"""One webhook delivery in, at most one run out (README "Webhook triggers").

A delivery is verified, parsed, deduplicated and filtered, then becomes a run through the path every
run takes: a watch, then the run (here written together with the delivery's row, so the delivery id
is claimed by storage, not by hope), then its ``fire`` message; the dispatcher, the overlap policy,
retries and the repair pass take it from there as for any other run.

- Identity: the delivery id (``webhook-id`` / ``X-GitHub-Delivery``). Its row is inserted in the same
  transaction as the run, so two concurrent copies of a delivery cannot both start a run; the loser
  answers with the winner's run.
- Debounce: the routine's open window is one ``queued`` run held until ``next_attempt_at`` and a
  pointer row naming it. A delivery in the window replaces the run's event and moves
  ``next_attempt_at`` on (one etag-conditional transaction); the run's single delayed message, when
  it comes early, re-queues itself until the window has been quiet (no polling), and the run's watch
  has the repair pass send it again if it is lost. Once the run is claimed the window is closed: the
  next delivery opens a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from routines import scheduler, telemetry
from routines.config import Settings
from routines.errors import (
    Conflict,
    NotFound,
    PreconditionFailed,
    RoutinesError,
    StorageUnavailable,
    TooLarge,
    ValidationError,
)
from routines.messages import DispatchMessage, DispatchQueue
from routines.models import (
    NAME_PATTERN,
    ROUTINE_ID_PATTERN,
    Routine,
    RoutineState,
    Run,
    RunProgress,
    RunStatus,
    RunTrigger,
    WebhookEvent,
    WebhookTrigger,
    run_id_for,
)
from routines.models import _depth as nesting
from routines.store import DebounceWrite, Delivery, Store
from routines.webhooks import events, signatures

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # a delivery's body as received
MAX_EVENT_BYTES = MAX_BODY_BYTES + 16 * 1024  # the stored event: body re-encoded, plus its headers
MAX_EVENT_DEPTH = 64
_NAME = re.compile(NAME_PATTERN)
_ATTEMPTS = 8  # read-decide-write rounds of a debounce window before giving up (503)


class SecretUnavailable(RoutinesError):
    """The routine's secret setting is not usable now (removed, or an unresolved Key Vault
    reference): nothing can be verified. Answered ``503`` so the sender delivers again later."""


@dataclass(frozen=True)
class Outcome:
    """``status``: 202 a run started or took this event (debounce), 200 a redelivery of a delivery
    already taken (``run`` is its run; ``None`` if that run was purged), 204 filtered out by ``when``."""

    status: int
    run: Run | None = None
    run_id: str | None = None


def event_run_id(routine_id: str, delivery_id: str, received: datetime) -> str:
    """The run of a delivery: sorted by the time it came (like every run id), and told apart by a
    digest of the delivery id. ``w`` marks a run written before its message (``decide``)."""
    digest = hashlib.sha256(f"{routine_id}\n{delivery_id}".encode()).hexdigest()[:10]
    return run_id_for(received, "w" + digest)


def idempotency_key(routine_id: str, delivery_id: str) -> str:
    return f"{routine_id}:event:{delivery_id}"


def parse_body(body: bytes) -> Any:
    """The delivery's JSON. Raises ``ValidationError`` (400) for anything that is not JSON."""

    def no_constant(constant: str) -> Any:
        raise ValueError(f"{constant} is not a JSON value")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{text} is out of range")
        return value

    try:
        document = json.loads(body, parse_constant=no_constant, parse_float=finite)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(
            f"the body is not JSON ({str(exc)[:200]}); webhook deliveries must be application/json",
            [{"loc": ["body"], "msg": "not JSON"}],
        ) from None
    if nesting(document) > MAX_EVENT_DEPTH:  # it could be neither stored nor serialized back
        raise ValidationError(
            f"the body nests objects and arrays deeper than {MAX_EVENT_DEPTH} levels",
            [{"loc": ["body"], "msg": "nested too deeply"}],
        )
    return document


@dataclass
class Intake:
    store: Store
    queue: DispatchQueue
    settings: Settings
    clock: Callable[[], datetime]

    def routine(self, key: str) -> Routine:
        """The webhook routine ``key`` names (its id or its name). Raises ``NotFound``."""
        routine: Routine | None = None
        if ROUTINE_ID_PATTERN.fullmatch(key):
            routine = self.store.get_routine(key)[0]
        elif _NAME.fullmatch(key):
            routine = self.store.get_routine_by_name(key)[0]
        if routine is None:
            raise NotFound(f"no routine {key!r}")
        if not isinstance(routine.trigger, WebhookTrigger):
            raise NotFound(f"routine {key!r} has a {routine.trigger.type} trigger, not a webhook")
        return routine

    def receive(self, key: str, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Take one delivery (``headers`` with lower-case names). Raises ``NotFound`` (404),
        ``SecretUnavailable`` (503), ``SignatureError`` (401), ``ValidationError`` (400),
        ``Conflict`` (409: disabled), ``TooLarge`` (413), ``StorageUnavailable`` (503)."""
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge(f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
        now = self.clock()
        routine = self.routine(key)
        trigger = routine.trigger
        assert isinstance(trigger, WebhookTrigger)
        attributes = telemetry.run_attributes(routine.id, routine_name=routine.name)
        with telemetry.span(telemetry.HOOK_SPAN, {**attributes, "webhook.signature": trigger.signature}):
            secret = self.settings.app_setting(trigger.secret_setting)
            problem = signatures.secret_problem(trigger.signature, secret)
            if problem or secret is None:
                log.error("routine %s: app setting %s %s", routine.id, trigger.secret_setting, problem)
                raise SecretUnavailable(
                    f"the routine's secret setting {problem}; deliveries cannot be verified"
                )
            delivery_id = signatures.verify(trigger.signature, secret, headers, body, now)
            telemetry.set_attributes({"webhook.delivery_id": delivery_id})
            document = parse_body(body)
            outcome = self._take(routine, trigger, delivery_id, headers, body, document, now)
            telemetry.set_attributes({"run.id": outcome.run_id, "webhook.outcome": outcome.status})
            return outcome

    def _take(
        self,
        routine: Routine,
        trigger: WebhookTrigger,
        delivery_id: str,
        headers: Mapping[str, str],
        body: bytes,
        document: Any,
        now: datetime,
    ) -> Outcome:
        digest = hashlib.sha256(body).hexdigest()
        # No read of the delivery row first: its insert, in the run's transaction, is the check (a
        # redelivery fails it and is answered from the row), so a new delivery costs one request less.
        if routine.state is not RoutineState.enabled:
            raise Conflict(f"routine {routine.id} is {routine.state.value}; enable it to take deliveries")
        if not events.matches(trigger.when, document):
            log.debug("routine %s: delivery %s filtered out by its when conditions", routine.id, delivery_id)
            return Outcome(204)
        event = WebhookEvent(
            id=delivery_id, received_at=now, headers=signatures.event_headers(headers), body=document
        )
        size = len(json.dumps(event.model_dump(mode="json"), ensure_ascii=False).encode())
        if size > MAX_EVENT_BYTES:
            raise TooLarge(f"the event (body and headers) takes {size} bytes; at most {MAX_EVENT_BYTES}")
        delivery = Delivery(routine.id, delivery_id, "", digest, now)
        if trigger.debounce_seconds:
            return self._debounce(routine, timedelta(seconds=trigger.debounce_seconds), event, delivery, now)
        try:
            return self._start(self._new_run(routine, event, now, now), delivery, None, 0)
        except (Conflict, PreconditionFailed):
            return self._lost(routine, delivery)

    def _again(self, routine: Routine, known: Delivery, digest: str) -> Outcome:
        """A delivery id seen before: answered with the run it went to, never a second run."""
        if known.body_sha256 != digest:
            log.warning(
                "routine %s: delivery id %s came again with another body; the first delivery's run stands",
                routine.id,
                known.delivery_id,
            )
        try:
            run: Run | None = self.store.get_run(routine.id, known.run_id)[0]
        except NotFound:
            run = None  # purged
        return Outcome(200, run, known.run_id)

    def _lost(self, routine: Routine, delivery: Delivery) -> Outcome:
        """The delivery id was taken already (a redelivery, or a copy racing this one): answer with
        the run it went to."""
        known = self.store.get_delivery(routine.id, delivery.delivery_id)
        if known is None:
            raise StorageUnavailable(f"delivery {delivery.delivery_id}: a concurrent write won; try again")
        return self._again(routine, known, delivery.body_sha256)

    def _new_run(self, routine: Routine, event: WebhookEvent, now: datetime, due: datetime) -> Run:
        run_id = event_run_id(routine.id, event.id, now)
        return Run(
            id=run_id,
            routine_id=routine.id,
            trigger=RunTrigger.webhook,
            scheduled_for=due,
            next_attempt_at=due if due > now else None,
            status=RunStatus.queued,
            max_attempts=routine.retry_policy.max_attempts,
            idempotency_key=idempotency_key(routine.id, event.id),
            event=event,
            progress=RunProgress(routine_version=routine.version),
        )

    def _start(self, run: Run, delivery: Delivery, debounce: DebounceWrite | None, delay: float) -> Outcome:
        """Watch, write the run with its delivery, then send its message (write-then-send)."""
        message = DispatchMessage(
            kind="fire",
            routine_id=run.routine_id,
            scheduled_for=run.scheduled_for,
            routine_version=run.progress.routine_version or 1,
            attempt=1,
            run_id=run.id,
            traceparent=telemetry.current_traceparent(),  # the delivery's span: one trace to the agent
        )
        self.store.watch([scheduler.watch_for(message, RunTrigger.webhook.value)])
        self.store.record_delivery(run, None, _for(delivery, run.id), debounce)
        try:
            self.queue.send(message, delay)
        except StorageUnavailable as exc:
            log.warning("webhook run %s accepted, not enqueued (%s); the repair pass sends it", run.id, exc)
        telemetry.record_fires(1, "webhook")
        return Outcome(202, run, run.id)

    def _debounce(
        self, routine: Routine, window: timedelta, event: WebhookEvent, delivery: Delivery, now: datetime
    ) -> Outcome:
        quiet = now + window
        for _ in range(_ATTEMPTS):
            pointer = self.store.get_debounce(routine.id)
            open_run, etag = self._open_window(routine.id, pointer[0] if pointer else None)
            try:
                if open_run is None:
                    run = self._new_run(routine, event, now, quiet)
                    write = DebounceWrite(run.id, pointer[1] if pointer else None)
                    return self._start(run, delivery, write, window.total_seconds())
                folded = open_run.model_copy(
                    update={
                        "event": event,
                        "scheduled_for": quiet,
                        "next_attempt_at": quiet,
                        "coalesced_fires": open_run.coalesced_fires + 1,
                    }
                )
                self.store.record_delivery(folded, etag, _for(delivery, folded.id))
                log.info("routine %s: delivery %s folded into run %s", routine.id, event.id, folded.id)
                return Outcome(202, folded, folded.id)
            except Conflict:
                return self._lost(routine, delivery)
            except PreconditionFailed:
                # The window moved (another delivery, or its run started), or this very delivery
                # landed within the same millisecond: look again.
                if self.store.get_delivery(routine.id, delivery.delivery_id) is not None:
                    return self._lost(routine, delivery)
        raise StorageUnavailable(f"routine {routine.id}: its debounce window kept changing; deliver again")

    def _open_window(self, routine_id: str, run_id: str | None) -> tuple[Run | None, str | None]:
        """The run of the routine's open debounce window and its etag: one still held ``queued``
        until its ``next_attempt_at``. ``(None, None)`` when the window is closed."""
        if run_id is None:
            return None, None
        try:
            run, etag = self.store.get_run(routine_id, run_id)
        except NotFound:
            return None, None
        if run.status is RunStatus.queued and run.next_attempt_at is not None and not run.progress.waiting_on:
            return run, etag  # (a run waiting for a concurrency permit has closed its window)
        return None, None


def _for(delivery: Delivery, run_id: str) -> Delivery:
    return dataclasses.replace(delivery, run_id=run_id)
