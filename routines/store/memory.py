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
from routines.models import Run, RunStatus
from routines.store import codec
from routines.store.base import Advance, DueEntry, Page, Watch
from routines.store.shared import PlanStore, TableName

Table = dict[tuple[str, str], tuple[dict[str, Any], str]]


class MemoryStore(PlanStore):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._routines: Table = {}
        self._runs: Table = {}
        self._etags = itertools.count(1)
        self.requests = 0

    def _transact(self, table: Table, ops: list[codec.Op]) -> list[str]:
        """All or nothing, like an entity-group transaction. Raises Conflict / NotFound /
        PreconditionFailed with the failing op's index in ``op``."""
        with self._lock:
            self.requests += 1
            for index, (kind, row, etag) in enumerate(ops):
                current = table.get((row["PartitionKey"], row["RowKey"]))
                if kind == "insert" and current is not None:
                    raise Conflict(f"row {row['RowKey']} exists", op=index)
                if kind in ("replace", "delete", "merge"):
                    if current is None:
                        raise NotFound(f"row {row['RowKey']} not found", op=index)
                    if etag is not None and current[1] != etag:
                        raise PreconditionFailed(f"row {row['RowKey']} changed", op=index)
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

    def _write(self, table: TableName, ops: list[codec.Op], what: str) -> list[str]:
        return self._transact(self._routines if table == "routines" else self._runs, ops)

    def _read(self, table: TableName, pk: str, rk: str, what: str) -> tuple[dict[str, Any], str] | None:
        return self._get(self._routines if table == "routines" else self._runs, pk, rk)

    def _range(self, table: Table, pk: str, low: str, high: str) -> list[tuple[dict[str, Any], str]]:
        with self._lock:
            self.requests += 1
            rows = [(dict(r), e) for (p, k), (r, e) in table.items() if p == pk and low <= k < high]
        return sorted(rows, key=lambda item: str(item[0]["RowKey"]))

    # --- routines ---------------------------------------------------------------------------
    def list_routines(self, state: str | None, limit: int, continuation: str | None) -> Page:
        after = codec.decode_continuation(continuation, codec.ROUTINE_PREFIX)
        rows = [
            r
            for r, _ in self._range(self._routines, codec.ROUTINE_PK, after or codec.ROUTINE_PREFIX, "id;")
            if r["RowKey"] != after and (not state or r["State"] == state)
        ]
        return codec.page_of(rows, limit, codec.routine_from_row)

    # --- due index --------------------------------------------------------------------------
    def due_entries(self, before: datetime) -> list[DueEntry]:
        rows = self._range(self._routines, codec.ROUTINE_PK, codec.DUE_PREFIX, codec.due_bound(before))
        return [codec.due_entry_from_row(r, e) for r, e in rows]

    def advance(self, advances: Sequence[Advance]) -> list[bool]:
        results = []
        for a in advances:
            try:
                ops = codec.advance_ops(
                    a.entry, a.next_fire_at, a.completed, a.watches, a.fired, a.planned_until
                )
                self._transact(self._routines, ops)
                results.append(True)
            except (Conflict, NotFound, PreconditionFailed):
                results.append(False)
        return results

    # --- runs -------------------------------------------------------------------------------
    def list_runs(
        self, routine_id: str, status: RunStatus | None, limit: int, continuation: str | None
    ) -> Page:
        after = codec.decode_continuation(continuation, codec.RUN_PREFIX)
        rows = [
            r
            for r, _ in self._range(self._runs, routine_id, after or codec.RUN_PREFIX, codec.RUN_END)
            if r["RowKey"] != after and (status is None or r["Status"] == status.value)
        ]
        return codec.page_of(rows, limit, codec.run_from_row)

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

    def delete_deliveries_before(self, cutoff: datetime) -> int:
        bound = codec.iso(cutoff)
        with self._lock:
            self.requests += 1
            old = [
                key
                for key, (row, _) in self._runs.items()
                if key[1].startswith(codec.DELIVERY_PREFIX) and row["ReceivedAt"] < bound
            ]
            for key in old:
                del self._runs[key]
        return len(old)

    def watched(self, before: datetime, limit: int) -> list[Watch]:
        bound = codec.iso(before)
        rows = self._range(self._routines, codec.ROUTINE_PK, codec.WATCH_PREFIX, codec.WATCH_END)
        return [codec.watch_from_row(r) for r, _ in rows if r["CheckAt"] < bound][:limit]

    # --- coordination -----------------------------------------------------------------------
    def ping(self) -> None:
        return None
