"""The resources of the Routines API as plain dataclasses.

Dataclasses rather than pydantic: the client stays a small install (``azure-core`` only), and the server
is the one place that validates. A model is what the API sends and takes, field for field:
``to_dict()`` gives its JSON (unset ``None`` fields left out, datetimes as RFC 3339 UTC text), and
``from_dict()`` reads an API answer. Fields a newer server sends that this client does not know are kept
in ``additional_properties`` rather than dropped or refused. Enumerated values (states, statuses,
policies) are plain strings, so a new value never breaks an old client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar, Union

__all__ = [
    "Routine",
    "RoutineAction",
    "RoutineApprovalStep",
    "RoutineConcurrency",
    "RoutineInvocationAction",
    "RoutineRateLimit",
    "RoutineResponseAction",
    "RoutineRetryPolicy",
    "RoutineRun",
    "RoutineRunStep",
    "RoutineScheduleTrigger",
    "RoutineTimerTrigger",
    "RoutineTrigger",
    "RoutineWebhookTrigger",
]

TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "skipped", "missed", "cancelled"})
_M = TypeVar("_M", bound="_Model")


def parse_time(value: Any) -> datetime | None:
    """An API timestamp (RFC 3339) as an aware datetime; None stays None."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def format_time(value: datetime | str) -> str:
    """RFC 3339 UTC text with ``Z``. Text is passed through as given (the server checks it); a naive
    datetime is refused here, since the API needs an offset and guessing one would move the time."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone; give an aware datetime (e.g. tzinfo=UTC)")
    text = value.astimezone(UTC).isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def to_json(value: Any) -> Any:
    """Models, datetimes, lists and mappings as JSON values."""
    if isinstance(value, _Model):
        return value.to_dict()
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


# A field the server sets: shown by ``to_dict()``, never sent in a create or update.
READ_ONLY = {"read_only": True}


@dataclass
class _Model:
    TYPE: ClassVar[str | None] = None  # the ``type`` tag of triggers and actions
    _PARSERS: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    def __post_init__(self) -> None:
        self.additional_properties: dict[str, Any] = {}

    def to_dict(self, *, writable_only: bool = False) -> dict[str, Any]:
        """The JSON of this model; ``writable_only`` leaves out what the server sets (ids, times,
        versions) and unknown server fields: the body of a create or update."""
        out: dict[str, Any] = {} if self.TYPE is None else {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.metadata.get("local") or (writable_only and f.metadata.get("read_only")):
                continue
            out[f.name] = to_json(value)
        if not writable_only:
            out.update({k: v for k, v in self.additional_properties.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls: type[_M], data: Mapping[str, Any]) -> _M:
        names = {f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("local")}
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key == "type" and cls.TYPE is not None:
                continue
            if key in names:
                parse = cls._PARSERS.get(key)
                known[key] = parse(value) if parse is not None and value is not None else value
            else:
                extra[key] = value
        model = cls(**known)
        model.additional_properties = extra
        return model


# --- triggers -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoutineScheduleTrigger(_Model):
    """A recurring cron schedule: 5 fields (``min hour day month weekday``) or 6 with leading seconds,
    evaluated in ``time_zone`` (an IANA name; the server's default is ``UTC``)."""

    TYPE: ClassVar[str | None] = "schedule"
    cron_expression: str
    time_zone: str | None = None


@dataclass(kw_only=True)
class RoutineTimerTrigger(_Model):
    """Fires once at ``at`` (an aware datetime or RFC 3339 text), then the routine is ``completed``.
    ``time=`` is accepted for ``at=``, as Foundry Routines' article writes it."""

    TYPE: ClassVar[str | None] = "timer"
    _PARSERS: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"at": parse_time}
    at: datetime | str | None = None
    time: InitVar[datetime | str | None] = None

    def __post_init__(self, time: datetime | str | None) -> None:
        super().__post_init__()
        if time is not None and self.at is not None:
            raise TypeError("give at= or time=, not both")
        if time is not None:
            self.at = time
        if self.at is None:
            raise TypeError("RoutineTimerTrigger needs at= (or time=)")
        if isinstance(self.at, str):
            self.at = parse_time(self.at.replace("z", "Z"))
        assert isinstance(self.at, datetime)
        if self.at.tzinfo is None:
            raise ValueError("RoutineTimerTrigger: at= needs a time zone offset (e.g. 2026-09-30T23:59:00Z)")


@dataclass(kw_only=True)
class RoutineWebhookTrigger(_Model):
    """Runs on a signed HTTP delivery to ``POST /api/hooks/{routine id or name}``. ``secret_setting``
    names the app setting holding the secret (the secret itself is never sent)."""

    TYPE: ClassVar[str | None] = "webhook"
    secret_setting: str
    signature: str | None = None  # standard-webhooks | github
    when: list[dict[str, Any]] | dict[str, Any] | None = None
    debounce_seconds: int | None = None


RoutineTrigger = Union[RoutineScheduleTrigger, RoutineTimerTrigger, RoutineWebhookTrigger]  # noqa: UP007
_TRIGGERS: dict[str, type[_Model]] = {
    cls.TYPE: cls
    for cls in (RoutineScheduleTrigger, RoutineTimerTrigger, RoutineWebhookTrigger)
    if cls.TYPE is not None
}


def trigger_from_dict(data: Mapping[str, Any]) -> Any:
    """The trigger model for ``data["type"]``; a type this client does not know stays a dict."""
    cls = _TRIGGERS.get(str(data.get("type")))
    return cls.from_dict(data) if cls is not None else dict(data)


# --- actions (steps) ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Step(_Model):
    id: str | None = None
    after: list[str] | None = None
    when: list[dict[str, Any]] | dict[str, Any] | None = None


@dataclass(kw_only=True)
class _AgentStep(_Step):
    agent_id: str | None = None
    agent_name: str | None = None
    agent_version: str | None = None
    input: str | dict[str, Any]


@dataclass(kw_only=True)
class RoutineInvocationAction(_AgentStep):
    """Starts the agent fresh (a new thread or conversation) with ``input``. Address the agent with
    ``agent_id`` (a classic Foundry agent ``asst_...``, or the HTTP backend's agent name) or
    ``agent_name`` (+ ``agent_version``)."""

    TYPE: ClassVar[str | None] = "invocation"


@dataclass(kw_only=True)
class RoutineResponseAction(_AgentStep):
    """Appends ``input`` to the thread ``thread_id`` (created on first use when absent) and runs the
    agent on it; past ``max_thread_messages`` the routine moves to a fresh thread."""

    TYPE: ClassVar[str | None] = "response"
    thread_id: str | None = None
    max_thread_messages: int | None = None


@dataclass(kw_only=True)
class RoutineApprovalStep(_Step):
    """A human gate: the run waits (no compute spent) until ``approve_step`` or ``reject_step``, or
    ``timeout_seconds`` pass (then ``on_timeout``: ``reject`` or ``approve``)."""

    TYPE: ClassVar[str | None] = "approval"
    timeout_seconds: int | None = None
    on_timeout: str | None = None


RoutineAction = Union[RoutineInvocationAction, RoutineResponseAction, RoutineApprovalStep]  # noqa: UP007
_ACTIONS: dict[str, type[_Model]] = {
    cls.TYPE: cls
    for cls in (RoutineInvocationAction, RoutineResponseAction, RoutineApprovalStep)
    if cls.TYPE is not None
}


def action_from_dict(data: Mapping[str, Any]) -> Any:
    cls = _ACTIONS.get(str(data.get("type")))
    return cls.from_dict(data) if cls is not None else dict(data)


# --- policies -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoutineRetryPolicy(_Model):
    """Fixed delays (``delays_seconds``) or ``backoff="exponential"`` with ``initial_delay_seconds``,
    ``max_delay_seconds``, ``jitter``. ``max_attempts=1`` turns retries off."""

    max_attempts: int | None = None
    delays_seconds: list[int] | None = None
    backoff: str | None = None
    initial_delay_seconds: int | None = None
    max_delay_seconds: int | None = None
    jitter: bool | None = None
    max_age_seconds: int | None = None


@dataclass(kw_only=True)
class RoutineConcurrency(_Model):
    """At most ``limit`` running runs across every routine naming the same ``key``."""

    key: str
    limit: int


@dataclass(kw_only=True)
class RoutineRateLimit(_Model):
    """At most ``limit`` agent starts in any window of ``period_seconds`` across the ``key``."""

    key: str
    limit: int
    period_seconds: int


# --- routine --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Routine(_Model):
    """A routine: a trigger bound to one or more actions, with its policies.

    Build one to create it (``name``, ``trigger`` and ``actions`` are needed; what you leave ``None`` takes
    the server's default). A routine read from the server also has ``id``, ``state``, ``next_fire_at``,
    times, ``version`` and ``etag`` (for ``update_routine(..., match_condition=IfNotModified)``).
    Triggers and actions may also be given as plain JSON dicts.
    """

    _PARSERS: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "trigger": trigger_from_dict,
        "actions": lambda items: [action_from_dict(a) for a in items],
        "retry_policy": RoutineRetryPolicy.from_dict,
        "concurrency": RoutineConcurrency.from_dict,
        "rate_limit": RoutineRateLimit.from_dict,
        **dict.fromkeys(
            ("start_at", "end_at", "next_fire_at", "next_dispatch_at", "created_at", "updated_at"),
            parse_time,
        ),
    }

    name: str
    trigger: RoutineTrigger | dict[str, Any]
    actions: list[RoutineAction | dict[str, Any]]
    description: str | None = None
    retry_policy: RoutineRetryPolicy | dict[str, Any] | None = None
    overlap_policy: str | None = None  # skip | buffer_one | allow_all
    catchup_window_seconds: int | None = None
    timeout_seconds: int | None = None
    concurrency: RoutineConcurrency | dict[str, Any] | None = None
    rate_limit: RoutineRateLimit | dict[str, Any] | None = None
    jitter_seconds: int | None = None
    start_at: datetime | str | None = None
    end_at: datetime | str | None = None
    max_fires: int | None = None
    pause_after_failures: int | None = None
    state: str | None = None  # enabled | disabled | completed; settable at create only
    # Set by the server.
    id: str | None = field(default=None, metadata=READ_ONLY)
    next_fire_at: datetime | None = field(default=None, metadata=READ_ONLY)
    next_dispatch_at: datetime | None = field(default=None, metadata=READ_ONLY)
    created_at: datetime | None = field(default=None, metadata=READ_ONLY)
    updated_at: datetime | None = field(default=None, metadata=READ_ONLY)
    version: int | None = field(default=None, metadata=READ_ONLY)
    fire_count: int | None = field(default=None, metadata=READ_ONLY)
    disabled_reason: str | None = field(default=None, metadata=READ_ONLY)
    # From the ETag header (or the version): not part of the JSON.
    etag: str | None = field(default=None, compare=False, metadata={"local": True})

    def update_body(self) -> dict[str, Any]:
        """The fields an update sends: every settable field but ``state`` (use enable / disable)."""
        body = self.to_dict(writable_only=True)
        body.pop("state", None)
        return body


# --- runs -----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RoutineRunStep(_Model):
    """One action (step) of a run: its status, the agent's run and thread ids, the first 4 KiB of its
    output, an approval's ``comment`` and ``decided_at``."""

    _PARSERS: ClassVar[Mapping[str, Callable[[Any], Any]]] = dict.fromkeys(
        ("started_at", "ended_at", "decided_at"), parse_time
    )
    index: int | None = None
    id: str | None = None
    status: str | None = None
    attempt: int | None = None
    agent_run_id: str | None = None
    thread_id: str | None = None
    output: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    comment: str | None = None
    decided_at: datetime | None = None


@dataclass(kw_only=True)
class RoutineRun(_Model):
    """One fire of a routine, whatever the number of attempts. ``status`` is one of ``queued``,
    ``running``, ``retrying``, ``waiting``, ``succeeded``, ``failed``, ``skipped``, ``missed``,
    ``cancelled``; ``is_terminal`` says whether it can still change."""

    _PARSERS: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "actions": lambda items: [RoutineRunStep.from_dict(a) for a in items],
        **dict.fromkeys(
            ("scheduled_for", "next_attempt_at", "started_at", "ended_at", "dispatch_at"), parse_time
        ),
    }

    id: str
    routine_id: str
    status: str
    trigger: str | None = None  # schedule | timer | manual | webhook
    scheduled_for: datetime | None = None
    attempt: int | None = None
    max_attempts: int | None = None
    next_attempt_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    idempotency_key: str | None = None
    actions: list[RoutineRunStep] = field(default_factory=list)
    error_message: str | None = None
    trace_id: str | None = None
    dispatch_at: datetime | None = None
    coalesced_fires: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES
