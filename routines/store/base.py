"""The storage interface: everything Routines keeps, behind one small protocol.

Two implementations pass the same contract suite (``tests/test_store_contract.py``):
``MemoryStore`` (fast unit tests) and ``TableStore`` (Azure Tables / Azurite).

Layout and costs (TableStore):
- One partition holds every routine, its name-index row and its due-index row, so a create, rename,
  reschedule or delete is a single entity-group transaction and the due index can never disagree with
  the routine. The due index is keyed by fire time, so finding due fires is one range query whose cost
  grows with the number of due fires, not the number of routines (docs/guarantees.md #5).
- Runs live in their own table, one partition per routine, row key = run id (newest first). The
  overlap slot of a routine is one more row in that partition, written in the same transaction as the
  run it admits or releases.

ETags: every read returns an opaque ``etag``; conditional writes raise ``PreconditionFailed`` when the
entity changed since. Errors: ``NotFound``, ``Conflict``, ``PreconditionFailed``, ``StorageUnavailable``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from routines.errors import RoutinesError
from routines.limits import L, LimitRow
from routines.models import Routine, Run, RunStatus


@dataclass(frozen=True)
class Page:
    items: list[Any]
    continuation: str | None


@dataclass(frozen=True)
class DueEntry:
    """One routine's next fire in the due index, with what the tick needs to schedule it
    without reading the routine."""

    routine_id: str
    name: str
    fire_at: datetime
    trigger: dict[str, Any]
    schedule_version: int
    catchup_window_seconds: int
    etag: str
    jitter_seconds: int = 0
    end_at: datetime | None = None  # the schedule's bounds and count (README "Flow control")
    max_fires: int | None = None
    fire_count: int = 0


@dataclass(frozen=True)
class Watch:
    """One fire or run the repair pass keeps an eye on until its run is terminal: written with (or
    before) the write that makes the fire valid, deleted when the run ends. ``check_at``: when the
    repair pass next looks at it."""

    routine_id: str
    run_id: str
    scheduled_for: datetime
    trigger: str  # schedule | timer | manual | webhook
    version: int  # the routine's schedule version the fire was planned at
    check_at: datetime
    dispatch_at: datetime | None = None  # a jittered fire's start (``None``: at ``scheduled_for``)


@dataclass(frozen=True)
class Advance:
    """Move ``entry`` to ``next_fire_at`` (``None``: nothing more to fire; ``completed`` marks the
    routine done), watching the fires enqueued with it and counting ``fired`` more fires."""

    entry: DueEntry
    next_fire_at: datetime | None
    completed: bool = False
    watches: tuple[Watch, ...] = ()
    fired: int = 0
    planned_until: datetime | None = None  # the last fire enqueued with it


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery already taken: its id is the fire's identity (``run_id`` is the run it
    started or was folded into). ``body_sha256`` tells a redelivery from a replayed id with another body."""

    routine_id: str
    delivery_id: str
    run_id: str
    body_sha256: str
    received_at: datetime


@dataclass(frozen=True)
class DebounceWrite:
    """Point the routine's open debounce window at ``run_id``: ``etag=None`` creates the pointer
    (fails if one exists), else it is replaced on that etag."""

    run_id: str
    etag: str | None = None


@dataclass(frozen=True)
class Slot:
    """The overlap slot of a routine: the run holding it and at most one buffered run."""

    holder: str
    buffered: str | None
    etag: str


@dataclass(frozen=True)
class SlotWrite:
    """A change to the slot made atomically with a run write. ``holder=None`` releases (deletes) it;
    ``etag=None`` creates it (fails with ``Conflict`` if someone holds it)."""

    holder: str | None
    buffered: str | None = None
    etag: str | None = None


class Store(Protocol):
    # --- routines -----------------------------------------------------------------------------
    def create_routine(self, routine: Routine, watches: Sequence[Watch] = ()) -> str:
        """Insert a new routine (and its due entry when ``due_at`` is set, and ``watches``) in one
        transaction; returns its etag. Raises ``Conflict`` when the name is taken."""
        ...

    def get_routine(self, routine_id: str) -> tuple[Routine, str]:
        """Raises ``NotFound``."""
        ...

    def get_routine_by_name(self, name: str) -> tuple[Routine, str]:
        """The routine named ``name`` (two point reads: the name index, then the routine).
        Raises ``NotFound``."""
        ...

    def replace_routine(
        self, routine: Routine, etag: str, previous: Routine, watches: Sequence[Watch] = ()
    ) -> str:
        """Replace ``previous`` (read with ``etag``) by ``routine``, moving its name and due entry
        as needed and writing ``watches``, atomically. Raises ``NotFound``, ``PreconditionFailed``,
        ``Conflict`` (name taken)."""
        ...

    def delete_routine(self, routine_id: str) -> None:
        """Delete a routine with its name and due entries. Runs stay. Raises ``NotFound``."""
        ...

    def list_routines(self, state: str | None, limit: int, continuation: str | None) -> Page:
        """Routines in id order. Raises ``ValidationError`` for a malformed continuation."""
        ...

    # --- due index ----------------------------------------------------------------------------
    def due_entries(self, before: datetime) -> list[DueEntry]:
        """Every due entry firing before ``before``, oldest first."""
        ...

    def advance(self, advances: Sequence[Advance]) -> list[bool]:
        """Move due entries forward, each conditional on its etag; returns, per advance, whether it
        was applied (``False``: the entry changed since it was read, someone else moved it)."""
        ...

    # --- runs ---------------------------------------------------------------------------------
    def insert_run(self, run: Run, slot: SlotWrite | None = None) -> str:
        """Insert a run (and change the slot) atomically; returns the run's etag. Raises ``Conflict``
        when the run exists, ``SlotTaken`` when the slot write loses."""
        ...

    def get_run(self, routine_id: str, run_id: str) -> tuple[Run, str]:
        """Raises ``NotFound``."""
        ...

    def replace_run(self, run: Run, etag: str, slot: SlotWrite | None = None) -> str:
        """Conditional replace (and slot change) atomically; returns the new etag. Raises
        ``PreconditionFailed`` (run changed) or ``SlotTaken`` (slot changed)."""
        ...

    def write_run(self, run: Run, etag: str | None, slot: SlotWrite | None = None) -> tuple[str, str | None]:
        """``insert_run`` (``etag`` None) or ``replace_run``; returns the run's etag and the slot's
        (None when ``slot`` is None or releases it)."""
        ...

    def list_runs(
        self, routine_id: str, status: RunStatus | None, limit: int, continuation: str | None
    ) -> Page:
        """Runs of one routine, newest first."""
        ...

    def get_slot(self, routine_id: str) -> Slot | None: ...

    # --- flow control (routines.limits) -------------------------------------------------------
    def get_limit(self, kind: type[L], key: str) -> L | None:
        """The ``kind`` row (``Permits``, ``Starts``) of key ``key`` (``etag`` set), or None before
        its first use."""
        ...

    def put_limit(self, row: LimitRow) -> str:
        """Insert (``row.etag`` None) or replace on its etag; returns the new etag. Raises
        ``Conflict`` (inserted meanwhile) or ``PreconditionFailed`` (changed meanwhile)."""
        ...

    def runs_scheduled_before(self, cutoff: datetime) -> Iterator[Run]:
        """Every run (of any routine) scheduled before ``cutoff``, for the purge."""
        ...

    def delete_runs(self, runs: Sequence[Run]) -> int:
        """Delete runs; returns how many were deleted (already gone ones are not errors)."""
        ...

    # --- webhook deliveries -------------------------------------------------------------------
    def get_delivery(self, routine_id: str, delivery_id: str) -> Delivery | None: ...

    def record_delivery(
        self, run: Run, etag: str | None, delivery: Delivery, debounce: DebounceWrite | None = None
    ) -> str:
        """Insert ``run`` (``etag`` None) or replace it on ``etag``, with the delivery row and the
        debounce pointer, in one transaction; returns the run's etag. Raises ``Conflict`` when the
        delivery was recorded already, ``PreconditionFailed`` when the run or the pointer changed."""
        ...

    def get_debounce(self, routine_id: str) -> tuple[str, str] | None:
        """The run id the routine's debounce pointer names, and the pointer's etag."""
        ...

    def delete_deliveries_before(self, cutoff: datetime) -> int:
        """Forget deliveries received before ``cutoff`` (the purge); returns how many."""
        ...

    # --- watches (the repair pass's index of runs not yet terminal) -----------------------------
    def watch(self, watches: Sequence[Watch]) -> None:
        """Write (upsert) watches, one request per 100."""
        ...

    def unwatch(self, routine_id: str, run_id: str, up_to_version: int | None = None) -> None:
        """Delete a watch (with ``up_to_version``: only one written for that schedule version or an
        older one); one already gone is not an error."""
        ...

    def watched(self, before: datetime, limit: int) -> list[Watch]:
        """Up to ``limit`` watches whose ``check_at`` is before ``before``. Its cost grows with the
        number of watches (runs not yet terminal), not with all runs or routines."""
        ...

    def rewatch(self, watch: Watch, check_at: datetime) -> None:
        """Move a watch's ``check_at``; a watch already gone stays gone."""
        ...

    # --- coordination -------------------------------------------------------------------------
    def try_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        """Take or renew the named lease if it is free, expired or already ``owner``'s."""
        ...

    def ping(self) -> None:
        """Raises ``StorageUnavailable`` when storage does not answer."""
        ...


class SlotTaken(RoutinesError):  # a signal between store and dispatcher, not a user error
    """The overlap slot changed (or is held) since it was read."""
