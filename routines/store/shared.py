"""What both stores do the same way: run the write plans of ``codec`` and translate their failures.

A store supplies two primitives over its two tables (``"routines"`` and ``"runs"``): ``_write`` runs
a plan atomically (raising ``Conflict`` / ``NotFound`` / ``PreconditionFailed`` with the failing op's
index in ``args[1]``) and ``_read`` gets one row with its etag.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from routines.errors import Conflict, NotFound, PreconditionFailed
from routines.models import Routine, Run
from routines.store import codec
from routines.store.base import Slot, SlotTaken, SlotWrite

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
    def create_routine(self, routine: Routine) -> str:
        try:
            return self._write("routines", codec.create_routine_ops(routine), f"routine {routine.id}")[0]
        except Conflict:
            raise Conflict(f"a routine named {routine.name!r} exists") from None

    def get_routine(self, routine_id: str) -> tuple[Routine, str]:
        found = self._read(
            "routines", codec.ROUTINE_PK, codec.routine_rk(routine_id), f"routine {routine_id}"
        )
        if not found:
            raise NotFound(f"routine {routine_id!r} not found")
        return codec.routine_from_row(found[0]), found[1]

    def replace_routine(self, routine: Routine, etag: str, previous: Routine) -> str:
        ops = codec.replace_routine_ops(routine, etag, previous)
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
    def _run_write(self, kind: str, run: Run, etag: str | None, slot: SlotWrite | None) -> str:
        ops: list[codec.Op] = [(kind, codec.run_row(run), etag)]
        if slot:
            ops.append(codec.slot_op(run.routine_id, slot.holder, slot.buffered, slot.etag))
        try:
            return self._write("runs", ops, f"run {run.id}")[0]
        except _LOST as exc:
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
        found = None
        if run_id.startswith(codec.RUN_PREFIX):
            found = self._read("runs", routine_id, run_id, f"run {run_id}")
        if not found:
            raise NotFound(f"run {run_id!r} of routine {routine_id!r} not found")
        return codec.run_from_row(found[0]), found[1]

    def get_slot(self, routine_id: str) -> Slot | None:
        found = self._read("runs", routine_id, codec.SLOT_RK, f"slot of {routine_id}")
        if not found:
            return None
        return Slot(holder=found[0]["Holder"], buffered=found[0]["Buffered"] or None, etag=found[1])

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
