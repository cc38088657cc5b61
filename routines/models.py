"""The resources of docs/api.md as pydantic models, with every validation rule.

Validation that depends on the deployment or the clock (the minimum cron interval, "a timer must lie
in the future") reads them from the validation context: ``{"min_interval_seconds": int, "now": datetime}``.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationInfo,
    computed_field,
    field_validator,
    model_serializer,
    model_validator,
)

from routines import schedule

MAX_INPUT_BYTES = 32 * 1024
MAX_INPUT_DEPTH = 64  # nesting of objects and arrays in an action input
OUTPUT_LIMIT_BYTES = 4 * 1024
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_PAUSE_AFTER_FAILURES = 100


def utc_text(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix, whole seconds unless the instant has a fraction."""
    value = value.astimezone(UTC)
    text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, PlainSerializer(utc_text, return_type=str, when_used="json")]


def json_integers(value: Any) -> Any:
    """Before-validator of integer fields given by a user (or a list of them): pydantic's lax mode
    would also take ``true`` / ``false`` and numeric strings, which JSON Schema's integer is not."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool | str | bytes):
            raise ValueError("Input should be a valid integer")
    return value


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


class RuleError(ValueError):
    """A rule between fields broken at ``loc`` (relative to the model validated): reported there."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


def rfc3339_input(value: Any) -> Any:
    """Before-validator of a date-time given by a user: RFC 3339 text with an offset (or a datetime
    from code). pydantic alone also takes a Unix timestamp, as a number or a numeric string."""
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.fullmatch(value)):
        return value
    raise ValueError("must be an RFC 3339 date-time with a time zone offset, e.g. 2026-09-30T23:59:00Z")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


class CompactModel(Model):
    """Leaves unset optional fields (``None``) out of its JSON, e.g. ``agent_name`` of an action
    addressed by ``agent_id``."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# --- triggers -------------------------------------------------------------------------------------


class ScheduleTrigger(Model):
    type: Literal["schedule"]
    cron_expression: str = Field(min_length=1, max_length=200)
    time_zone: str = Field(default="UTC", min_length=1, max_length=64)

    @field_validator("cron_expression")
    @classmethod
    def _valid_cron(cls, value: str, info: ValidationInfo) -> str:
        minimum = int((info.context or {}).get("min_interval_seconds", 0) or 0)
        try:
            if minimum:
                schedule.validate_cron(value, "UTC", minimum)
            else:
                schedule.parse_cron(value, "UTC")
        except schedule.ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("time_zone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            schedule.parse_cron("0 0 * * *", value)
        except schedule.ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return value


class TimerTrigger(Model):
    type: Literal["timer"]
    at: UtcDatetime

    @field_validator("at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return rfc3339_input(value)

    @field_validator("at")
    @classmethod
    def _in_future(cls, value: datetime, info: ValidationInfo) -> datetime:
        try:
            value = to_utc(value)
        except OverflowError:
            raise ValueError("is out of range in UTC") from None
        now = (info.context or {}).get("now")
        # A timer fires at ``at`` truncated to the second (``schedule.next_fire_after``): that
        # instant must be ahead, or an ``at`` a fraction of a second ahead would never fire.
        if now is not None and value.replace(microsecond=0) <= now:
            raise ValueError(f"must lie in the future (now is {utc_text(now)})")
        if value.year >= 2200:
            raise ValueError("must be before the year 2200")
        return value


class EventCondition(Model):
    """A condition on a webhook delivery's JSON body: ``path`` is a dot path into it (list
    items by index; absent: the whole body). A path that is not there makes every ``op`` false but
    ``exists`` (``value: false`` asks for absence)."""

    path: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^.]+(\.[^.]+)*$")
    op: Literal["eq", "ne", "in", "contains", "gt", "gte", "lt", "lte", "exists"]
    value: Any = None

    @field_validator("value")
    @classmethod
    def _shallow(cls, value: Any) -> Any:
        if _depth(value) > MAX_INPUT_DEPTH:  # deep nesting cannot be serialized back
            raise ValueError(f"nests objects and arrays deeper than {MAX_INPUT_DEPTH} levels")
        return value

    @model_validator(mode="after")
    def _value_fits_op(self) -> EventCondition:
        if self.op == "exists":
            if self.value is not None and not isinstance(self.value, bool):
                raise ValueError("value of op exists is true (the default) or false")
        elif "value" not in self.model_fields_set:
            raise ValueError(f"op {self.op} needs a value")
        elif self.op == "in" and not isinstance(self.value, list):
            raise ValueError("value of op in is a list")
        return self


SECRET_SETTING_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class WebhookTrigger(Model):
    """Runs start from signed HTTP deliveries (``POST /api/hooks/{routine}``). The secret is read from
    the app setting ``secret_setting`` names, never stored. With a validation context holding
    ``app_setting`` (a name -> value lookup), an undefined or unusable setting is invalid."""

    type: Literal["webhook"]
    signature: Literal["standard-webhooks", "github"] = "standard-webhooks"
    secret_setting: str = Field(pattern=SECRET_SETTING_PATTERN)
    when: list[EventCondition] = Field(default_factory=list, max_length=20)
    debounce_seconds: int = Field(default=0, ge=0, le=86400)

    _integers = field_validator("debounce_seconds", mode="before")(json_integers)

    @field_validator("when", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value  # one condition, or a list of them (all)

    @field_validator("secret_setting")
    @classmethod
    def _setting_defined(cls, value: str, info: ValidationInfo) -> str:
        lookup = (info.context or {}).get("app_setting")
        if lookup is None:
            return value
        from routines.webhooks.signatures import secret_problem  # the scheme's rules, in one place

        problem = secret_problem(info.data.get("signature"), lookup(value))
        if problem:
            raise ValueError(f"app setting {value}: {problem}")
        return value


Trigger = Annotated[ScheduleTrigger | TimerTrigger | WebhookTrigger, Field(discriminator="type")]

# --- actions --------------------------------------------------------------------------------------

AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (iterative: the input may be hostile)."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, dict | list)]:
        depth += 1
        level = [item for v in level for item in (v.values() if isinstance(v, dict) else v)]
    return depth


STEP_ID_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
MAX_STEPS = 20
StepId = Annotated[str, Field(pattern=STEP_ID_PATTERN)]
ConditionOp = Literal["eq", "ne", "in", "contains", "gt", "gte", "lt", "lte", "exists"]


class Condition(CompactModel):
    """``when`` of a step (README "Steps"): on an earlier step's ``status``, and/or on its output parsed as
    JSON (``path`` a dot path into it; absent: the whole output) compared with ``op`` and ``value``."""

    step: StepId
    status: Literal["succeeded", "failed", "skipped"] | None = None
    path: str | None = Field(default=None, min_length=1, max_length=256)
    op: ConditionOp | None = None
    value: Any = None

    @model_validator(mode="after")
    def _complete(self) -> Condition:
        if self.status is None and self.op is None:
            raise ValueError("give status, or op (with path and value) to compare the step's output")
        if self.op is None and (self.path is not None or "value" in self.model_fields_set):
            raise ValueError("path and value go with op")
        if self.op not in (None, "exists") and "value" not in self.model_fields_set:
            raise ValueError(f"op {self.op} needs a value")
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op in needs a list as its value")
        if len(json.dumps(self.value)) > 4096:
            raise ValueError("value: at most 4 KiB of JSON")
        return self


class _Step(CompactModel):
    """What every step has (README "Steps"): an ``id`` (default ``step<position>``), ``after`` (the ids it
    waits for; absent: the step before it) and ``when`` (conditions on earlier steps)."""

    id: StepId | None = None
    after: list[StepId] | None = Field(default=None, max_length=MAX_STEPS)
    when: Condition | list[Condition] | None = None

    @field_validator("when")
    @classmethod
    def _some_conditions(
        cls, value: Condition | list[Condition] | None
    ) -> Condition | list[Condition] | None:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_STEPS:
            raise ValueError(f"give 1 to {MAX_STEPS} conditions")
        return value

    @property
    def conditions(self) -> list[Condition]:
        if self.when is None:
            return []
        return self.when if isinstance(self.when, list) else [self.when]


class _Action(_Step):
    agent_id: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    agent_name: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    agent_version: str | None = Field(default=None, min_length=1, max_length=64)
    input: str | dict[str, Any]

    @field_validator("input")
    @classmethod
    def _input_size(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        # Checked first: pydantic cannot serialize nesting much past 250 levels, and json.dumps
        # recurses; either would turn an accepted input into a server error.
        if _depth(value) > MAX_INPUT_DEPTH:
            raise ValueError(f"nests objects and arrays deeper than {MAX_INPUT_DEPTH} levels")
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > MAX_INPUT_BYTES:
            raise ValueError(f"JSON encoding is {size} bytes; at most {MAX_INPUT_BYTES} are allowed")
        return value

    @model_validator(mode="after")
    def _one_agent(self) -> _Action:
        if (self.agent_id is None) == (self.agent_name is None):
            raise ValueError("give exactly one of agent_id or agent_name")
        if self.agent_version is not None and self.agent_name is None:
            raise ValueError("agent_version goes with agent_name, not agent_id")
        return self

    @property
    def agent(self) -> str:
        return self.agent_id or self.agent_name or ""


class InvocationAction(_Action):
    type: Literal["invocation"]


class ResponseAction(_Action):
    type: Literal["response"]
    thread_id: str | None = Field(default=None, min_length=1, max_length=128)
    max_thread_messages: int = Field(default=200, ge=2, le=100_000)

    _integers = field_validator("max_thread_messages", mode="before")(json_integers)


class ApprovalStep(_Step):
    """A human gate: the run waits (no compute spent) until the step is approved or rejected through
    the API, or ``timeout_seconds`` pass (then ``on_timeout`` decides)."""

    type: Literal["approval"]
    timeout_seconds: int = Field(default=86400, ge=1, le=30 * 86400)
    on_timeout: Literal["reject", "approve"] = "reject"

    _integers = field_validator("timeout_seconds", mode="before")(json_integers)


AgentAction = InvocationAction | ResponseAction
Action = Annotated[InvocationAction | ResponseAction | ApprovalStep, Field(discriminator="type")]

# --- policies -------------------------------------------------------------------------------------


class RetryPolicy(CompactModel):
    """Both forms of docs/api.md#retry-policy: fixed ``delays_seconds``, or ``backoff: exponential``."""

    max_attempts: int = Field(default=4, ge=1, le=50)
    delays_seconds: list[Annotated[int, Field(ge=0, le=7 * 86400)]] | None = None
    backoff: Literal["fixed", "exponential"] | None = None
    initial_delay_seconds: int | None = Field(default=None, ge=0, le=86400)
    max_delay_seconds: int | None = Field(default=None, ge=1, le=7 * 86400)
    jitter: StrictBool | None = None
    max_age_seconds: int | None = Field(default=None, ge=1, le=30 * 86400)

    _integers = field_validator(
        "max_attempts",
        "delays_seconds",
        "initial_delay_seconds",
        "max_delay_seconds",
        "max_age_seconds",
        mode="before",
    )(json_integers)

    @model_validator(mode="after")
    def _one_form(self) -> RetryPolicy:
        if self.backoff == "exponential":
            if self.delays_seconds is not None:
                raise ValueError("delays_seconds is for fixed delays; drop it or drop backoff: exponential")
            if self.initial_delay_seconds is None:
                self.initial_delay_seconds = 30
            if self.max_delay_seconds is None:
                self.max_delay_seconds = 3600
            if self.jitter is None:
                self.jitter = True
        else:
            extras = [
                n
                for n in ("initial_delay_seconds", "max_delay_seconds", "jitter")
                if getattr(self, n) is not None
            ]
            if extras:
                raise ValueError(f"{', '.join(extras)} need backoff: exponential")
            if self.delays_seconds is None:
                self.delays_seconds = [60, 300, 900]
            if not self.delays_seconds and self.max_attempts > 1:
                raise ValueError("delays_seconds needs at least one delay when max_attempts is above 1")
        return self


FLOW_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class Concurrency(CompactModel):
    """At most ``limit`` runs at once across every routine naming ``key`` (README "Flow control")."""

    key: str = Field(pattern=FLOW_KEY_PATTERN)
    limit: int = Field(ge=1, le=1000)

    _integers = field_validator("limit", mode="before")(json_integers)


class RateLimit(CompactModel):
    """At most ``limit`` agent starts in any ``period_seconds`` across every routine naming ``key``."""

    key: str = Field(pattern=FLOW_KEY_PATTERN)
    limit: int = Field(ge=1, le=1000)
    period_seconds: int = Field(ge=1, le=86400)

    _integers = field_validator("limit", "period_seconds", mode="before")(json_integers)


class OverlapPolicy(StrEnum):
    skip = "skip"
    buffer_one = "buffer_one"
    allow_all = "allow_all"


class RoutineState(StrEnum):
    enabled = "enabled"
    disabled = "disabled"
    completed = "completed"


class _RoutineFields(Model):
    """The user-settable fields of a routine (create body, merge-patch result)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2048)
    trigger: Trigger
    actions: list[Action] = Field(min_length=1, max_length=MAX_STEPS)
    retry_policy: RetryPolicy = Field(default_factory=RetryPolicy)
    overlap_policy: OverlapPolicy = OverlapPolicy.skip
    catchup_window_seconds: int = Field(default=3600, ge=0, le=30 * 86400)
    timeout_seconds: int = Field(default=600, ge=1, le=86400)
    # Flow control (README "Flow control"): how many run at once, when the schedule fires and stops.
    concurrency: Concurrency | None = None
    rate_limit: RateLimit | None = None
    jitter_seconds: int = Field(default=0, ge=0, le=3600)
    start_at: UtcDatetime | None = None
    end_at: UtcDatetime | None = None
    max_fires: int | None = Field(default=None, ge=1, le=1_000_000_000)
    pause_after_failures: int = Field(default=0, ge=0, le=MAX_PAUSE_AFTER_FAILURES)

    _integers = field_validator(
        "catchup_window_seconds",
        "timeout_seconds",
        "jitter_seconds",
        "max_fires",
        "pause_after_failures",
        mode="before",
    )(json_integers)

    @field_validator("start_at", "end_at", mode="before")
    @classmethod
    def _rfc3339_or_null(cls, value: Any) -> Any:
        return None if value is None else rfc3339_input(value)

    @model_validator(mode="after")
    def _bounds(self, info: ValidationInfo) -> _RoutineFields:
        """The rules between the trigger and the flow controls. ``now`` in the context (the fields
        that shape the schedule were set): ``end_at`` must lie ahead."""
        trigger, start, end = self.trigger, self.start_at, self.end_at
        if isinstance(trigger, WebhookTrigger):
            for name in ("jitter_seconds", "start_at", "end_at", "max_fires"):
                if getattr(self, name):
                    raise RuleError((name,), "applies to schedule and timer triggers, not webhooks")
            return self
        if start is not None and end is not None and end < start:
            raise RuleError(("end_at",), f"must not be before start_at ({utc_text(start)})")
        now = (info.context or {}).get("now")
        if end is not None and now is not None and end <= now:
            raise RuleError(("end_at",), f"must lie in the future (now is {utc_text(now)})")
        if isinstance(trigger, TimerTrigger):
            at = trigger.at.replace(microsecond=0)
            if (start is not None and at < start) or (end is not None and at > end):
                raise RuleError(("trigger", "at"), "must lie between start_at and end_at")
        check_jitter(trigger, self.jitter_seconds)
        return self

    @field_validator("actions")
    @classmethod
    def _a_graph(cls, value: list[Action]) -> list[Action]:
        from routines import graph  # the graph rules read the models

        graph.check(value)
        return value

    @field_validator("description", mode="before")
    @classmethod
    def _null_description(cls, value: Any) -> Any:
        return "" if value is None else value


def check_jitter(trigger: ScheduleTrigger | TimerTrigger | WebhookTrigger, jitter_seconds: int) -> None:
    """Jitter may not push a fire past the next one. Raises ``RuleError`` at ``jitter_seconds``."""
    if isinstance(trigger, WebhookTrigger):
        if jitter_seconds:
            raise RuleError(("jitter_seconds",), "applies to schedule and timer triggers, not webhooks")
    elif isinstance(trigger, ScheduleTrigger) and jitter_seconds:
        interval = schedule.parse_cron(trigger.cron_expression, trigger.time_zone).min_interval_seconds()
        if jitter_seconds > interval:
            raise RuleError(
                ("jitter_seconds",),
                f"must not exceed the schedule's interval ({interval:g} seconds): a fire would start "
                "after the next one",
            )


class RoutineCreate(_RoutineFields):
    state: Literal[RoutineState.enabled, RoutineState.disabled] = RoutineState.enabled


MUTABLE_FIELDS = tuple(n for n in _RoutineFields.model_fields)
# The fields that shape when a routine fires: editing one is a reschedule (queued fires become stale).
SCHEDULE_FIELDS = ("trigger", "start_at", "end_at", "max_fires", "jitter_seconds")


class Routine(_RoutineFields):
    id: str
    state: RoutineState
    next_fire_at: UtcDatetime | None = None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    version: int = Field(ge=1)
    # Internal: the version at which the schedule last changed (trigger edit, enable). A queued fire
    # carrying an older version is stale (docs/guarantees.md #4); other edits leave queued fires valid.
    schedule_version: int = Field(default=1, ge=1, exclude=True)
    # Internal: the fire the due index holds (None when nothing is left to enqueue). Equal to
    # next_fire_at, except for a timer whose fire is already enqueued but not yet run.
    due_at: UtcDatetime | None = Field(default=None, exclude=True)
    fire_count: int = Field(default=0, ge=0)  # fires planned by the schedule (max_fires counts these)
    # Internal: the last fire planned (queued) so far; the ones after now are dropped by a reschedule.
    planned_until: UtcDatetime | None = Field(default=None, exclude=True)
    disabled_reason: Literal["manual", "failures"] | None = None
    # Internal (pause_after_failures): the failed runs since the streak last restarted (a success, an
    # enable, at ``failures_since``), by id, so counting a run twice changes nothing.
    failures: list[str] = Field(default_factory=list, max_length=MAX_PAUSE_AFTER_FAILURES, exclude=True)
    failures_since: UtcDatetime | None = Field(default=None, exclude=True)

    @computed_field(return_type=UtcDatetime | None)  # type: ignore[prop-decorator]
    @property
    def next_dispatch_at(self) -> datetime | None:
        """When the next fire starts: ``next_fire_at`` plus its jitter offset."""
        if self.next_fire_at is None:
            return None
        return self.next_fire_at + schedule.jitter_offset(self.id, self.next_fire_at, self.jitter_seconds)

    def as_of(self, now: datetime) -> Routine:
        """The routine as shown at ``now``: ``next_fire_at`` is the earliest fire not yet due. The
        stored value is the next fire the tick has still to plan; fires it already queued ahead (a
        06:00 fire read at 05:59) come before it, and a fire that has come due is no longer next."""
        shown, trigger = self.next_fire_at, self.trigger
        if (
            self.state is not RoutineState.enabled
            or shown is None
            or not isinstance(trigger, ScheduleTrigger)
        ):
            return self
        after = now if self.start_at is None else max(now, self.start_at)
        try:
            earliest = schedule.parse_cron(trigger.cron_expression, trigger.time_zone).next_after(after)
        except schedule.ScheduleError:
            return self
        return self.model_copy(update={"next_fire_at": earliest}) if earliest < shown else self

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def new_routine_id() -> str:
    return "rt_" + secrets.token_hex(8)


# --- runs -----------------------------------------------------------------------------------------


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    retrying = "retrying"
    waiting = "waiting"  # held by an approval step
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"
    missed = "missed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.skipped, RunStatus.missed, RunStatus.cancelled}
)


class RunTrigger(StrEnum):
    schedule = "schedule"
    timer = "timer"
    manual = "manual"
    webhook = "webhook"


class StepStatus(StrEnum):
    pending = "pending"  # not started yet: waiting for its dependencies, its start, or a retry
    running = "running"
    waiting = "waiting"  # an approval step waiting for a person
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in STEP_TERMINAL


STEP_TERMINAL = frozenset({StepStatus.succeeded, StepStatus.failed, StepStatus.skipped, StepStatus.cancelled})


class ActionResult(Model):
    """One step of a run as the API shows it."""

    index: int
    id: str = ""
    status: StepStatus = StepStatus.pending
    attempt: int = 0
    started_at: UtcDatetime | None = None
    ended_at: UtcDatetime | None = None
    next_attempt_at: UtcDatetime | None = None
    agent_run_id: str | None = None
    thread_id: str | None = None
    output: str | None = None
    error_message: str | None = None
    comment: str | None = None  # approval steps: the person's comment
    decided_at: UtcDatetime | None = None  # approval steps: when it was approved, rejected or timed out


class RunPlan(Model):
    """What a run executes, copied from its routine when its first attempt is claimed: an edit of the
    routine during the run never changes the run (it finishes with this snapshot)."""

    version: int
    name: str
    actions: list[Action]
    retry_policy: RetryPolicy
    timeout_seconds: int
    overlap_policy: OverlapPolicy
    pause_after_failures: int = 0
    concurrency: Concurrency | None = None
    rate_limit: RateLimit | None = None

    @classmethod
    def of(cls, routine: Routine) -> RunPlan:
        return cls(
            version=routine.version,
            name=routine.name,
            actions=list(routine.actions),
            retry_policy=routine.retry_policy,
            timeout_seconds=routine.timeout_seconds,
            overlap_policy=routine.overlap_policy,
            pause_after_failures=routine.pause_after_failures,
            concurrency=routine.concurrency,
            rate_limit=routine.rate_limit,
        )


class StepProgress(Model):
    """Dispatcher bookkeeping of one step, never shown in the API: the attempt's lease, the pending
    agent call, and when its start (or an approval's timeout) is due."""

    lease_owner: str | None = None
    lease_until: UtcDatetime | None = None
    poll: dict[str, Any] | None = None  # backend handle of a started agent run, for status polls
    poll_deadline: UtcDatetime | None = None
    polled_at: UtcDatetime | None = None  # last heartbeat of the poll chain (the repair pass reads it)
    attempt_started_at: UtcDatetime | None = None  # the timeout runs from here
    sent_at: UtcDatetime | None = None  # a start message was sent for the next attempt at this time
    ready_at: UtcDatetime | None = None  # when its dependencies were done (the lag of its start)
    decide_by: UtcDatetime | None = None  # an approval: its timeout


class RunProgress(Model):
    """Dispatcher bookkeeping, never shown in the API: the snapshot, the overlap slot, the steps."""

    plan: RunPlan | None = None
    steps: dict[str, StepProgress] = Field(default_factory=dict)
    input_override: str | dict[str, Any] | None = None
    routine_version: int | None = None
    holds_slot: bool = False  # this run holds the routine's overlap slot and must release it
    slot_etag: str | None = None  # the slot row as this run last wrote it: released without a read
    handed_to: str | None = None  # a finished run: the buffered run it handed the overlap slot to
    permit: str | None = None  # the concurrency key this run holds a permit of (kept once it ended)
    waiting_on: str | None = None  # the concurrency key this queued run waits for
    waiting_since: UtcDatetime | None = None


class WebhookEvent(Model):
    """The delivery a webhook run was started by (for a debounced run: the latest of its burst).
    ``body`` is the parsed JSON; ``headers`` are lower-cased, without the signature or credentials."""

    id: str  # the delivery id: webhook-id or X-GitHub-Delivery
    received_at: UtcDatetime
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None


class Run(Model):
    id: str
    routine_id: str
    trigger: RunTrigger
    scheduled_for: UtcDatetime
    dispatch_at: UtcDatetime | None = None  # jitter_seconds: when this fire was to start
    status: RunStatus
    attempt: int = 0
    max_attempts: int = 1
    next_attempt_at: UtcDatetime | None = None
    started_at: UtcDatetime | None = None
    ended_at: UtcDatetime | None = None
    idempotency_key: str
    actions: list[ActionResult] = Field(default_factory=list)
    error_message: str | None = None
    trace_id: str | None = None
    coalesced_fires: int = 0  # fires a late tick or catch-up folded into this run (besides its own)
    wait_reason: str | None = None  # why it waited to start (a concurrency key), while and after
    waited_seconds: float = 0.0  # how long it waited for that
    event: WebhookEvent | None = None  # webhook runs only
    progress: RunProgress = Field(default_factory=RunProgress, exclude=True)

    @property
    def due(self) -> datetime:
        """When the run was to start: its scheduled time plus its jitter offset. Lateness and
        ``max_age_seconds`` count from here."""
        return self.dispatch_at or self.scheduled_for

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"progress"} if self.event else {"progress", "event"})


_EPOCH_LIMIT_MS = 10**13  # year 2286: keeps inverted timestamps 13 digits wide


def run_id_for(scheduled_for: datetime, discriminator: str) -> str:
    """Run ids sort newest first (inverted milliseconds), so they double as the run table's row key."""
    ms = int(scheduled_for.timestamp() * 1000)
    return f"run_{_EPOCH_LIMIT_MS - ms:013d}_{discriminator}"


def run_time(run_id: str) -> datetime | None:
    """The instant a run id was made for (``run_id_for``), or None for an id of another shape."""
    parts = run_id.split("_")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        return datetime.fromtimestamp((_EPOCH_LIMIT_MS - int(parts[1])) / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return None


def scheduled_run_id(routine_id: str, scheduled_for: datetime) -> str:
    """The run of fire ``(routine_id, scheduled_for)``: deterministic, so every delivery of a fire
    finds the same run (insert-if-absent is the dedup)."""
    import hashlib

    digest = hashlib.sha256(idempotency_key(routine_id, scheduled_for).encode()).hexdigest()[:10]
    return run_id_for(scheduled_for, digest)


def manual_run_id(now: datetime) -> str:
    return run_id_for(now, "m" + secrets.token_hex(5))


def idempotency_key(routine_id: str, scheduled_for: datetime) -> str:
    return f"{routine_id}:{utc_text(scheduled_for)}"


RUN_ID_PATTERN = re.compile(r"^run_\d{13}_[a-z0-9]{10,11}$")
ROUTINE_ID_PATTERN = re.compile(r"^rt_[0-9a-f]{16}$")


def now_utc() -> datetime:
    return datetime.now(UTC)
