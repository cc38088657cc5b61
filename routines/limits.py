"""Concurrency keys and rate limits (README "Flow control"), as pure functions over one stored row per
key, shared by every routine that names the key.

Concurrency (``Permits``): a counting semaphore.
A run takes a permit before it starts and gives it back when it ends (``admit`` / ``release``). A run
that finds no permit free waits in the row's queue, oldest scheduled time first; a release hands the
freed permit straight to the oldest waiter, whose run is then sent a message: no run polls for a
permit. Every change is one etag-conditional write of the row, so a permit is never given twice.
Nothing leaks: a run records the key it holds, its end releases it before its watch is dropped, and
the repair pass releases the permit of a finished run whose worker died in between.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar

from routines.errors import Conflict, PreconditionFailed, StorageUnavailable

if TYPE_CHECKING:
    from routines.messages import DispatchQueue
    from routines.store import Store

MAX_WAITERS = 1000  # runs queued behind one key; a fire beyond them fails with the reason


@dataclass(frozen=True, order=True)
class Waiter:
    scheduled_for: datetime  # oldest first
    run_id: str
    routine_id: str


class LimitRow(Protocol):
    """What the store keeps of a flow-control row: ``PREFIX + key`` names it, ``body()`` is its JSON."""

    PREFIX: ClassVar[str]

    @property
    def key(self) -> str: ...

    @property
    def etag(self) -> str | None: ...

    def body(self) -> dict[str, Any]: ...

    @classmethod
    def from_body(cls, key: str, body: dict[str, Any], etag: str) -> Self: ...


L = TypeVar("L", bound=LimitRow)


def _iso(value: datetime) -> str:
    return value.isoformat()


@dataclass(frozen=True)
class Permits:
    """One key's permits: the runs holding one (run id -> routine id) and the runs waiting, oldest
    first. ``limit`` is the one named by the routine that last took or waited for a permit.
    ``etag``: the stored row's (``None``: not stored yet)."""

    PREFIX: ClassVar[str] = "permits:"

    key: str
    limit: int
    holders: dict[str, str] = field(default_factory=dict)
    waiters: tuple[Waiter, ...] = ()
    etag: str | None = None

    def body(self) -> dict[str, Any]:
        waiters = [[_iso(w.scheduled_for), w.run_id, w.routine_id] for w in self.waiters]
        return {"limit": self.limit, "holders": self.holders, "waiters": waiters}

    @classmethod
    def from_body(cls, key: str, body: dict[str, Any], etag: str) -> Self:
        waiters = tuple(
            Waiter(datetime.fromisoformat(t), run, routine) for t, run, routine in body["waiters"]
        )
        return cls(key, int(body["limit"]), dict(body["holders"]), waiters, etag)

    def holds(self, run_id: str) -> bool:
        return run_id in self.holders

    def position(self, run_id: str) -> int | None:
        """Where ``run_id`` waits (0: next), or None."""
        return next((i for i, w in enumerate(self.waiters) if w.run_id == run_id), None)


class QueueFull(Exception):
    """More than ``MAX_WAITERS`` runs wait for the key."""


def admit(permits: Permits | None, key: str, limit: int, waiter: Waiter) -> tuple[Permits, bool]:
    """``waiter``'s run asks for a permit of ``key``: it gets one when it holds one already, or when
    one is free and no older run waits; else it waits in line. Returns the row to write (the same
    object when nothing changes) and whether the run holds a permit. Raises ``QueueFull``."""
    current = permits or Permits(key, limit)
    if current.holds(waiter.run_id):
        return current, True
    older = [w for w in current.waiters if w < waiter and w.run_id != waiter.run_id]
    if len(current.holders) < limit and not older:
        holders = {**current.holders, waiter.run_id: waiter.routine_id}
        waiters = tuple(w for w in current.waiters if w.run_id != waiter.run_id)
        return dataclasses.replace(current, limit=limit, holders=holders, waiters=waiters), True
    if current.position(waiter.run_id) is not None and current.limit == limit:
        return current, False
    if current.position(waiter.run_id) is None and len(current.waiters) >= MAX_WAITERS:
        raise QueueFull(f"more than {MAX_WAITERS} runs wait for concurrency key {key}")
    waiters = tuple(sorted({*current.waiters, waiter}))
    return dataclasses.replace(current, limit=limit, waiters=waiters), False


def release(permits: Permits, run_id: str) -> tuple[Permits, list[Waiter]]:
    """``run_id`` ended: its permit (or its place in line) goes; each freed permit passes to the
    oldest waiter. Returns the row to write (the same object when ``run_id`` had neither) and the
    waiters that got a permit, to be sent their start."""
    if not permits.holds(run_id) and permits.position(run_id) is None:
        return permits, []
    holders = {k: v for k, v in permits.holders.items() if k != run_id}
    waiters = [w for w in permits.waiters if w.run_id != run_id]
    handed: list[Waiter] = []
    while waiters and len(holders) < permits.limit:
        first = waiters.pop(0)
        holders[first.run_id] = first.routine_id
        handed.append(first)
    return dataclasses.replace(permits, holders=holders, waiters=tuple(waiters)), handed


# --- rate limits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Starts:
    """One rate-limit key's agent starts within the last period, oldest first: (when, whose) where
    whose is ``<run id>/<step>/<attempt>``, so a start asked for twice is counted once."""

    PREFIX: ClassVar[str] = "starts:"

    key: str
    starts: tuple[tuple[datetime, str], ...] = ()
    etag: str | None = None

    def body(self) -> dict[str, Any]:
        return {"starts": [[_iso(t), whose] for t, whose in self.starts]}

    @classmethod
    def from_body(cls, key: str, body: dict[str, Any], etag: str) -> Self:
        return cls(key, tuple((datetime.fromisoformat(t), whose) for t, whose in body["starts"]), etag)


def take(
    window: Starts | None, key: str, limit: int, period_seconds: int, now: datetime, whose: str
) -> tuple[Starts, datetime | None]:
    """``whose`` wants to start an agent at ``now``: allowed when fewer than ``limit`` starts of the
    key fall in the last ``period_seconds`` (a sliding window). Returns the row to write (the same
    object when nothing changes) and ``None`` when allowed, else when the oldest start leaves the
    window (the earliest instant a start is allowed)."""
    current = window or Starts(key)
    if any(w == whose for _, w in current.starts):
        return current, None
    since = now - timedelta(seconds=period_seconds)
    recent = tuple((t, w) for t, w in current.starts if t > since)
    if len(recent) >= limit:
        return current, recent[-limit][0] + timedelta(seconds=period_seconds)
    return dataclasses.replace(current, starts=(*recent, (now, whose))), None


# --- applying a release ---------------------------------------------------------------------------


def give_back(store: Store, queue: DispatchQueue, key: str, run_id: str) -> None:
    """Release ``run_id``'s permit of ``key`` in the store (again on a lost race) and send each waiter
    that got it its start. Idempotent: a run that holds nothing changes nothing."""
    from routines.decide import release_message_of

    for _ in range(10):
        permits = store.get_limit(Permits, key)
        if permits is None:
            return
        released, handed = release(permits, run_id)
        if released is permits:
            return
        try:
            store.put_limit(released)
        except (PreconditionFailed, Conflict):
            continue
        for waiter in handed:
            queue.send(release_message_of(waiter.routine_id, waiter.run_id, waiter.scheduled_for))
        return
    # The message fails and comes back; its run is finished by then, and gives the permit back again.
    raise StorageUnavailable(f"concurrency key {key} kept changing; run {run_id}'s permit goes back later")
