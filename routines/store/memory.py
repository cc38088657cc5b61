"""In-memory ``Store`` for fast unit tests. It executes the same write plans (``codec.*_ops``) on
the same row layout as ``TableStore``, so both pass one contract suite; ``requests`` counts the round
trips the table store would make."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from routines.errors import Conflict, NotFound, PreconditionFailed
from routines.models import Routine, Run, RunStatus
from routines.store import codec
from routines.store.base import Advance, DueEntry, Page, Slot, SlotTaken, SlotWrite

Table = dict[tuple[str, str], tuple[dict[str, Any], str]]


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._routines: Table = {}
        self._runs: Table = {}
        self._etags = itertools.count(1)
        self._leases: dict[tuple[str, str], str] = {}  # our own lease rows' etags
        self.requests = 0

    def _transact(self, table: Table, ops: list[codec.Op]) -> list[str]:
        """All or nothing, like an entity-group transaction. Raises Conflict / NotFound /
        PreconditionFailed with the failing op's index in ``args[1]``."""
        with self._lock:
            self.requests += 1
            for index, (kind, row, etag) in enumerate(ops):
                current = table.get((row["PartitionKey"], row["RowKey"]))
                if kind == "insert" and current is not None:
                    raise Conflict(f"row {row['RowKey']} exists", index)
                if kind in ("replace", "delete", "merge"):
                    if current is None:
                        raise NotFound(f"row {row['RowKey']} not found", index)
                    if etag is not None and current[1] != etag:
                        raise PreconditionFailed(f"row {row['RowKey']} changed", index)
            etags = []
            for kind, row, _ in ops:
                key = (row["PartitionKey"], row["RowKey"])
                if kind == "delete":
                    del table[key]
                    etags.append("")
                    continue
                merged = {**table[key][0], **row} if kind == "merge" else dict(row)
                etag = f'W/"{next(self._etags)}"'
                table[key] = (merged, etag)
                etags.append(etag)
            return etags

    def _get(self, table: Table, pk: str, rk: str) -> tuple[dict[str, Any], str] | None:
        with self._lock:
            self.requests += 1
            found = table.get((pk, rk))
            return (dict(found[0]), found[1]) if found else None

    def _range(self, table: Table, pk: str, low: str, high: str) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            self.requests += 1
            rows = [(dict(r), e) for (p, k), (r, e) in table.items() if p == pk and low <= k < high]
        return sorted(rows, key=lambda item: str(item[0]["RowKey"]))

    # --- routines ---------------------------------------------------------------------------
    def create_routine(self, routine: Routine) -> str:
        try:
            return self._transact(self._routines, codec.create_routine_ops(routine))[0]
        except Conflict:
            raise Conflict(f"a routine named {routine.name!r} exists") from None

    def get_routine(self, routine_id: str) -> tuple[Routine, str]:
        found = self._get(self._routines, codec.ROUTINE_PK, codec.routine_rk(routine_id))
        if not found:
            raise NotFound(f"routine {routine_id!r} not found")
        return codec.routine_from_row(found[0]), found[1]

    def replace_routine(self, routine: Routine, etag: str, previous: Routine) -> str:
        ops = codec.replace_routine_ops(routine, etag, previous)
        try:
            return self._transact(self._routines, ops)[0]
        except Conflict:
            raise Conflict(f"a routine named {routine.name!r} exists") from None
        except (NotFound, PreconditionFailed):
            self.get_routine(routine.id)  # NotFound when it was deleted
            raise PreconditionFailed(f"routine {routine.id!r} changed") from None

    def delete_routine(self, routine_id: str) -> None:
        while True:
            routine, etag = self.get_routine(routine_id)
            try:
                self._transact(self._routines, codec.delete_routine_ops(routine, etag))
                return
            except (NotFound, PreconditionFailed):
                continue  # changed under us: read again (NotFound from get_routine ends it)

    def list_routines(self, state: str | None, limit: int, continuation: str | None) -> Page:
        after = codec.decode_continuation(continuation, codec.ROUTINE_PREFIX)
        rows = [
            r
            for r, _ in self._range(self._routines, codec.ROUTINE_PK, after or codec.ROUTINE_PREFIX, "id;")
            if r["RowKey"] != after and (not state or r["State"] == state)
        ]
        return _page(rows, limit, codec.routine_from_row)

    # --- due index --------------------------------------------------------------------------
    def due_entries(self, before: datetime) -> list[DueEntry]:
        rows = self._range(self._routines, codec.ROUTINE_PK, codec.DUE_PREFIX, codec.due_bound(before))
        return [codec.due_entry_from_row(r, e) for r, e in rows]

    def advance(self, advances: Sequence[Advance]) -> list[bool]:
        results = []
        for a in advances:
            try:
                self._transact(self._routines, codec.advance_ops(a.entry, a.next_fire_at, a.completed))
                results.append(True)
            except (Conflict, NotFound, PreconditionFailed):
                results.append(False)
        return results

    # --- runs -------------------------------------------------------------------------------
    def _run_write(self, kind: str, run: Run, etag: str | None, slot: SlotWrite | None) -> str:
        ops: list[codec.Op] = [(kind, codec.run_row(run), etag)]
        if slot:
            ops.append(codec.slot_op(run.routine_id, slot.holder, slot.buffered, slot.etag))
        try:
            return self._transact(self._runs, ops)[0]
        except (Conflict, NotFound, PreconditionFailed) as exc:
            if len(exc.args) > 1 and exc.args[1] == 1:
                raise SlotTaken(run.routine_id) from None
            if kind == "insert":
                raise Conflict(f"run {run.id!r} exists") from None
            raise PreconditionFailed(f"run {run.id!r} changed") from None

    def insert_run(self, run: Run, slot: SlotWrite | None = None) -> str:
        return self._run_write("insert", run, None, slot)

    def replace_run(self, run: Run, etag: str, slot: SlotWrite | None = None) -> str:
        return self._run_write("replace", run, etag, slot)

    def get_run(self, routine_id: str, run_id: str) -> tuple[Run, str]:
        found = self._get(self._runs, routine_id, run_id) if run_id.startswith(codec.RUN_PREFIX) else None
        if not found:
            raise NotFound(f"run {run_id!r} of routine {routine_id!r} not found")
        return codec.run_from_row(found[0]), found[1]

    def list_runs(
        self, routine_id: str, status: RunStatus | None, limit: int, continuation: str | None
    ) -> Page:
        after = codec.decode_continuation(continuation, codec.RUN_PREFIX)
        rows = [
            r
            for r, _ in self._range(self._runs, routine_id, after or codec.RUN_PREFIX, codec.RUN_END)
            if r["RowKey"] != after and (status is None or r["Status"] == status.value)
        ]
        return _page(rows, limit, codec.run_from_row)

    def get_slot(self, routine_id: str) -> Slot | None:
        found = self._get(self._runs, routine_id, codec.SLOT_RK)
        if not found:
            return None
        return Slot(holder=found[0]["Holder"], buffered=found[0]["Buffered"] or None, etag=found[1])

    def runs_scheduled_before(self, cutoff: datetime) -> Iterator[Run]:
        bound = codec.iso(cutoff)
        with self._lock:
            self.requests += 1
            rows = [
                r
                for (_, k), (r, _) in self._runs.items()
                if k.startswith(codec.RUN_PREFIX) and r["ScheduledFor"] < bound
            ]
        return iter([codec.run_from_row(r) for r in rows])

    def delete_runs(self, runs: Sequence[Run]) -> int:
        with self._lock:
            self.requests += 1
            return sum(self._runs.pop((r.routine_id, r.id), None) is not None for r in runs)

    # --- coordination -----------------------------------------------------------------------
    def try_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        held = self._leases.get((name, owner))
        if held:  # renewing our own lease: one conditional write, unless someone wrote it since
            try:
                row = codec.lease_row(name, owner, until)
                self._leases[(name, owner)] = self._transact(self._routines, [("replace", row, held)])[0]
                return True
            except (Conflict, NotFound, PreconditionFailed):
                self._leases.pop((name, owner), None)
        found = self._get(self._routines, codec.ROUTINE_PK, codec.lease_rk(name))
        if found and found[0]["Owner"] != owner and found[0]["Until"] > codec.iso(now):
            return False
        op: codec.Op = (
            ("replace", codec.lease_row(name, owner, until), found[1])
            if found
            else ("insert", codec.lease_row(name, owner, until), None)
        )
        try:
            self._leases[(name, owner)] = self._transact(self._routines, [op])[0]
            return True
        except (Conflict, NotFound, PreconditionFailed):
            return False

    def ping(self) -> None:
        return None


def _page(rows: list[dict[str, Any]], limit: int, convert: Any) -> Page:
    if len(rows) > limit:
        return Page(
            [convert(r) for r in rows[:limit]], codec.encode_continuation(str(rows[limit - 1]["RowKey"]))
        )
    return Page([convert(r) for r in rows], None)
