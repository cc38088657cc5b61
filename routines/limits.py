"""Concurrency keys (README "Flow control"): a counting semaphore per key, shared by every routine that
names it, as pure functions over one stored row (``Permits``).

A run takes a permit before it starts and gives it back when it ends (``admit`` / ``release``). A run
that finds no permit free waits in the row's queue, oldest scheduled time first; a release hands the
freed permit straight to the oldest waiter, whose run is then sent a message: no run polls for a
permit. Every change is one etag-conditional write of the row, so a permit is never given twice.
Nothing leaks: a run records the key it holds, its end releases it before its watch is dropped, and
the repair pass releases the permit of a finished run whose worker died in between.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from routines.errors import Conflict, PreconditionFailed

if TYPE_CHECKING:
    from routines.messages import DispatchQueue
    from routines.store import Store

log = logging.getLogger(__name__)

MAX_WAITERS = 1000  # runs queued behind one key; a fire beyond them fails with the reason


@dataclass(frozen=True, order=True)
class Waiter:
    scheduled_for: datetime  # oldest first
    run_id: str
    routine_id: str


@dataclass(frozen=True)
class Permits:
    """One key's permits: the runs holding one (run id -> routine id) and the runs waiting, oldest
    first. ``limit`` is the one named by the routine that last took or waited for a permit.
    ``etag``: the stored row's (``None``: not stored yet)."""

    key: str
    limit: int
    holders: dict[str, str] = field(default_factory=dict)
    waiters: tuple[Waiter, ...] = ()
    etag: str | None = None

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


# --- applying a release ---------------------------------------------------------------------------


def give_back(store: Store, queue: DispatchQueue, key: str, run_id: str) -> None:
    """Release ``run_id``'s permit of ``key`` in the store (again on a lost race) and send each waiter
    that got it its start. Idempotent: a run that holds nothing changes nothing."""
    from routines.decide import release_message_of

    for _ in range(10):
        permits = store.get_permits(key)
        if permits is None:
            return
        released, handed = release(permits, run_id)
        if released is permits:
            return
        try:
            store.put_permits(released)
        except (PreconditionFailed, Conflict):
            continue
        for waiter in handed:
            queue.send(release_message_of(waiter.routine_id, waiter.run_id, waiter.scheduled_for))
        return
    log.warning(
        "concurrency key %s kept changing; run %s's permit is released on its next check", key, run_id
    )
