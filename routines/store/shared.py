"""What both stores do the same way: run the write plans of ``codec`` and translate their failures.

A store supplies two primitives over its two tables (``"routines"`` and ``"runs"``): ``_write`` runs
a plan atomically (raising ``Conflict`` / ``NotFound`` / ``PreconditionFailed`` with the failing op's
index in ``op``) and ``_read`` gets one row with its etag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from routines.errors import Conflict, NotFound, PreconditionFailed
from routines.limits import L, LimitRow
from routines.models import Routine, Run
from routines.store import codec
from routines.store.base import DebounceWrite, Delivery, Slot, SlotTaken, SlotWrite, Watch

TableName = Literal["routines", "runs"]
_LOST = (Conflict, NotFound, PreconditionFailed)


class PlanStore:
    def __init__(self) -> None:
        self._leases: dict[tuple[str, str], str] = {}  # our own lease rows' etags

    def _write(self, table: TableName, ops: list[codec.Op], what: str) -> list[str]:
        raise NotImplementedError

    def _read(self, table: TableName, pk: str, rk: str, what: str) -> tuple[dict[str, Any], str] | None:
        raise NotImplementedError

    # --- routines ---------------------------------------------------------------------------
    def create_routine(self, routine: Routine, watches: Sequence[Watch] = ()) -> str:
        ops = codec.create_routine_ops(routine, watches)
        try:
            return self._write("routines", ops, f"routine {routine.id}")[0]
        except Conflict:
            raise Conflict(f"a routine named {routine.name!r} exists") from None

    def get_routine(self, routine_id: str) -> tuple[Routine, str]:
        found = self._read(
            "routines", codec.ROUTINE_PK, codec.routine_rk(routine_id), f"routine {routine_id}"
        )
        if not found:
            raise NotFound(f"routine {routine_id!r} not found")
        return codec.routine_from_row(found[0]), found[1]

    def get_routine_by_name(self, name: str) -> tuple[Routine, str]:
        for _ in range(3):  # the name row, then its routine; a rename in between: read again
            found = self._read("routines", codec.ROUTINE_PK, codec.name_rk(name), f"routine {name}")
            if not found:
                break
            try:
                routine, etag = self.get_routine(found[0]["RoutineId"])
            except NotFound:
                continue
            if routine.name == name:
                return routine, etag
        raise NotFound(f"routine named {name!r} not found")

    def replace_routine(
        self, routine: Routine, etag: str, previous: Routine, watches: Sequence[Watch] = ()
    ) -> str:
        ops = codec.replace_routine_ops(routine, etag, previous, watches)
        try:
            return self._write("routines", ops, f"routine {routine.id}")[0]
        except Conflict:
            raise Conflict(f"a routine named {routine.name!r} exists") from None
        except (NotFound, PreconditionFailed):
            self.get_routine(routine.id)  # NotFound when it was deleted
            raise PreconditionFailed(f"routine {routine.id!r} changed") from None

    def delete_routine(self, routine_id: str) -> None:
        while True:
            routine, etag = self.get_routine(routine_id)
            try:
                self._write("routines", codec.delete_routine_ops(routine, etag), f"routine {routine_id}")
                return
            except (NotFound, PreconditionFailed):
                continue  # changed under us: read again (NotFound from get_routine ends it)

    # --- runs -------------------------------------------------------------------------------
    def write_run(self, run: Run, etag: str | None, slot: SlotWrite | None = None) -> tuple[str, str | None]:
        kind = "insert" if etag is None else "replace"
        ops: list[codec.Op] = [(kind, codec.run_row(run), etag)]
        if slot:
            ops.append(codec.slot_op(run.routine_id, slot.holder, slot.buffered, slot.etag))
        try:
            etags = self._write("runs", ops, f"run {run.id}")
            return etags[0], (etags[1] or None) if slot and slot.holder else None
        except _LOST as exc:
            if exc.op == 1:
                raise SlotTaken(run.routine_id) from None
            if kind == "insert":
                raise Conflict(f"run {run.id!r} exists") from None
            raise PreconditionFailed(f"run {run.id!r} changed") from None

    def insert_run(self, run: Run, slot: SlotWrite | None = None) -> str:
        return self.write_run(run, None, slot)[0]

    def replace_run(self, run: Run, etag: str, slot: SlotWrite | None = None) -> str:
        return self.write_run(run, etag, slot)[0]

    def get_run(self, routine_id: str, run_id: str) -> tuple[Run, str]:
        found = None
        if run_id.startswith(codec.RUN_PREFIX):
            found = self._read("runs", routine_id, run_id, f"run {run_id}")
        if not found:
            raise NotFound(f"run {run_id!r} of routine {routine_id!r} not found")
        return codec.run_from_row(found[0]), found[1]

    def get_limit(self, kind: type[L], key: str) -> L | None:
        found = self._read("runs", codec.LIMITS_PK, kind.PREFIX + key, f"{kind.__name__} of key {key}")
        return codec.limit_from_row(kind, *found) if found else None

    def put_limit(self, row: LimitRow) -> str:
        stored = codec.limit_row(row)
        op: codec.Op = ("insert", stored, None) if row.etag is None else ("replace", stored, row.etag)
        what = f"{type(row).__name__} of key {row.key}"
        try:
            return self._write("runs", [op], what)[0]
        except _LOST as exc:
            if row.etag is None:
                raise Conflict(f"{what} was stored meanwhile") from exc
            raise PreconditionFailed(f"{what} changed") from exc

    def get_slot(self, routine_id: str) -> Slot | None:
        found = self._read("runs", routine_id, codec.SLOT_RK, f"slot of {routine_id}")
        if not found:
            return None
        return Slot(holder=found[0]["Holder"], buffered=found[0]["Buffered"] or None, etag=found[1])

    # --- webhook deliveries -----------------------------------------------------------------
    def get_delivery(self, routine_id: str, delivery_id: str) -> Delivery | None:
        found = self._read("runs", routine_id, codec.delivery_rk(delivery_id), f"delivery {delivery_id}")
        return codec.delivery_from_row(found[0]) if found else None

    def record_delivery(
        self, run: Run, etag: str | None, delivery: Delivery, debounce: DebounceWrite | None = None
    ) -> str:
        ops = codec.record_delivery_ops(run, etag, delivery, debounce)
        try:
            return self._write("runs", ops, f"run {run.id}")[0]
        except _LOST as exc:
            if exc.op == 1:
                raise Conflict(f"delivery {delivery.delivery_id!r} was taken already") from None
            raise PreconditionFailed(f"run {run.id!r} or the debounce window changed") from None

    def get_debounce(self, routine_id: str) -> tuple[str, str] | None:
        found = self._read("runs", routine_id, codec.DEBOUNCE_RK, f"debounce of {routine_id}")
        return (str(found[0]["RunId"]), found[1]) if found else None

    # --- watches ----------------------------------------------------------------------------
    def watch(self, watches: Sequence[Watch]) -> None:
        ops = codec.watch_ops(watches)
        for start in range(0, len(ops), 100):
            self._write("routines", ops[start : start + 100], "watches")

    def unwatch(self, routine_id: str, run_id: str, up_to_version: int | None = None) -> None:
        key = {"PartitionKey": codec.ROUTINE_PK, "RowKey": codec.watch_rk(routine_id, run_id)}
        etag = None
        if up_to_version is not None:
            found = self._read("routines", key["PartitionKey"], key["RowKey"], f"watch of {run_id}")
            if found is None or int(found[0]["Version"]) > up_to_version:
                return
            etag = found[1]
        with contextlib.suppress(NotFound, PreconditionFailed):  # gone, or written again since
            self._write("routines", [("delete", key, etag)], f"watch of {run_id}")

    def rewatch(self, watch: Watch, check_at: datetime) -> None:
        patch = {
            "PartitionKey": codec.ROUTINE_PK,
            "RowKey": codec.watch_rk(watch.routine_id, watch.run_id),
            "CheckAt": codec.iso(check_at),
        }
        with contextlib.suppress(NotFound):
            self._write("routines", [("merge", patch, None)], f"watch of {watch.run_id}")

    # --- coordination -----------------------------------------------------------------------
    def try_lease(self, name: str, owner: str, now: datetime, until: datetime) -> bool:
        row = codec.lease_row(name, owner, until)
        held = self._leases.get((name, owner))
        if held:  # renewing our own lease: one conditional write, unless someone wrote it since
            try:
                self._leases[(name, owner)] = self._write(
                    "routines", [("replace", row, held)], f"lease {name}"
                )[0]
                return True
            except _LOST:
                self._leases.pop((name, owner), None)
        found = self._read("routines", codec.ROUTINE_PK, codec.lease_rk(name), f"lease {name}")
        if found and found[0]["Owner"] != owner and found[0]["Until"] > codec.iso(now):
            return False
        op: codec.Op = ("replace", row, found[1]) if found else ("insert", row, None)
        try:
            self._leases[(name, owner)] = self._write("routines", [op], f"lease {name}")[0]
            return True
        except _LOST:
            return False
