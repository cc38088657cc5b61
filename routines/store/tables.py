"""``Store`` on Azure Table Storage (or Azurite). Layout: see ``routines.store.base``.

Every SDK error is translated here into the error tree (``raise ... from exc``); filters are always
parameterised (``@name``), never built by pasting strings.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, cast

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from routines.errors import Conflict, NotFound, PreconditionFailed, Refused, RoutinesError, StorageUnavailable
from routines.models import Run, RunStatus
from routines.store import codec
from routines.store.base import Advance, DueEntry, Page, Watch
from routines.store.shared import PlanStore, TableName

_CONDITION_FAILED = {"UpdateConditionNotSatisfied", "ConditionNotMet"}
_UNKNOWN = object()  # a write's outcome that could not be read back
WRITE_ATTEMPTS = 6  # a write failing on the wire is tried for about 6 s (a storage restart, a reset)
WRITE_BACKOFF, WRITE_BACKOFF_MAX = 0.25, 2.0


def _translate(exc: AzureError, what: str) -> RoutinesError:
    if isinstance(exc, ResourceExistsError):
        return Conflict(f"{what}: exists")
    if isinstance(exc, ResourceNotFoundError):
        return NotFound(f"{what}: not found")
    if isinstance(exc, ResourceModifiedError):
        return PreconditionFailed(f"{what}: changed")
    if isinstance(exc, HttpResponseError):
        code = str(getattr(exc, "error_code", "") or "")
        if exc.status_code == 409 or code == "EntityAlreadyExists":
            return Conflict(f"{what}: exists")
        if exc.status_code == 404 or code == "ResourceNotFound":
            return NotFound(f"{what}: not found")
        if exc.status_code == 412 or code in _CONDITION_FAILED:
            return PreconditionFailed(f"{what}: changed")
        if exc.status_code is not None and exc.status_code < 500:
            return RoutinesError(f"{what}: storage refused the request ({exc.status_code} {code})")
    return StorageUnavailable(f"{what}: storage unavailable ({type(exc).__name__})")


class TableStore(PlanStore):
    def __init__(self, service: TableServiceClient, prefix: str) -> None:
        super().__init__()
        self._service = service
        self.routines_table = f"{prefix}Routines"
        self.runs_table = f"{prefix}Runs"
        self._routines: TableClient = service.get_table_client(self.routines_table)
        self._runs: TableClient = service.get_table_client(self.runs_table)

    def _write(self, table: TableName, ops: list[codec.Op], what: str) -> list[str]:
        return self._execute(self._routines if table == "routines" else self._runs, ops, what)

    def _read(self, table: TableName, pk: str, rk: str, what: str) -> tuple[dict[str, Any], str] | None:
        return self._get(self._routines if table == "routines" else self._runs, pk, rk, what)

    def ensure_tables(self) -> None:
        """Create the tables if missing (idempotent; run once per process at start)."""
        for name in (self.routines_table, self.runs_table):
            try:
                self._service.create_table_if_not_exists(name)
            except AzureError as exc:
                raise _translate(exc, f"create table {name}") from exc

    # --- plumbing ---------------------------------------------------------------------------
    def _execute(self, table: TableClient, ops: list[codec.Op], what: str) -> list[str]:
        """Run a write plan: one request, a transaction when it has several ops. On failure raises
        Conflict / NotFound / PreconditionFailed with the failing op's index in ``op``, or
        StorageUnavailable.

        A try that fails on the wire (no answer, or a 5xx) is made again here, for a few seconds:
        the SDK never retries a POST (inserts, transactions), and when it retries a conditional
        write whose first try went through, the second fails its own condition. So once an answer
        was lost, a Conflict / NotFound / PreconditionFailed is checked by reading the rows back:
        if they hold what was written, the write succeeded."""
        unsure = False
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return self._execute_once(table, ops, what)
            except _WireError as exc:
                unsure = unsure or exc.maybe_applied
                if attempt == WRITE_ATTEMPTS - 1:
                    if isinstance(exc.error, StorageUnavailable):
                        exc.error.retried = True  # callers must not try it all again
                    raise exc.error from exc.__cause__
                time.sleep(min(WRITE_BACKOFF_MAX, WRITE_BACKOFF * 2**attempt))
            except (Conflict, NotFound, PreconditionFailed):
                if not unsure:
                    raise
                written = self._written(table, ops)
                if written is None:
                    raise
                if written is _UNKNOWN:  # could not read back: whether the write landed is unknown
                    raise StorageUnavailable(f"{what}: the outcome of a write is unknown") from None
                return cast(list[str], written)
        raise AssertionError("unreachable")  # pragma: no cover

    def _execute_once(self, table: TableClient, ops: list[codec.Op], what: str) -> list[str]:
        try:
            if len(ops) == 1:
                return [self._single(table, *ops[0])]
            results = table.submit_transaction([_transaction_op(*op) for op in ops], retry_total=0)
            return [str(r.get("etag", "")) for r in results]
        except TableTransactionError as exc:
            error = _translate(exc, what)
            if isinstance(error, Refused):
                error.op = exc.index
            raise error from exc
        except AzureError as exc:
            error = _translate(exc, what)
            if isinstance(error, Refused):
                error.op = 0
            if isinstance(exc, ServiceRequestError | ServiceResponseError) or (
                isinstance(exc, HttpResponseError) and (exc.status_code or 0) >= 500
            ):
                # A request never sent (connection refused) cannot have been applied.
                raise _WireError(error, maybe_applied=not isinstance(exc, ServiceRequestError)) from exc
            raise error from exc

    def _written(self, table: TableClient, ops: list[codec.Op]) -> Any:
        """The etags of ``ops``' rows when storage holds exactly what they wrote, None when it does
        not, ``_UNKNOWN`` when it could not be read back."""
        etags = []
        try:
            for kind, row, _ in ops:
                found = self._get(table, row["PartitionKey"], row["RowKey"], "read back")
                if kind == "delete":
                    if found is not None:
                        return None
                    etags.append("")
                    continue
                if found is None or any(
                    _plain(found[0].get(name)) != _plain(value)
                    for name, value in row.items()
                    if name not in ("PartitionKey", "RowKey")
                ):
                    return None
                etags.append(found[1])
        except StorageUnavailable:
            return _UNKNOWN
        return etags

    @staticmethod
    def _single(table: TableClient, kind: str, row: dict[str, Any], etag: str | None) -> str:
        cond: dict[str, Any] = (
            {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        )
        # retry_total=0: _execute tries again itself, and can tell when a lost answer was a success.
        if kind == "insert":
            result = table.create_entity(row, retry_total=0)
        elif kind == "delete":
            table.delete_entity(row["PartitionKey"], row["RowKey"], retry_total=0, **cond)
            return ""
        elif kind == "upsert":
            result = table.upsert_entity(row, mode=UpdateMode.REPLACE, retry_total=0)
        else:
            mode = UpdateMode.MERGE if kind == "merge" else UpdateMode.REPLACE
            if not etag:
                cond = {"match_condition": MatchConditions.Unconditionally}  # If-Match: *, 404 if absent
            result = table.update_entity(row, mode=mode, retry_total=0, **cond)
        return str(result.get("etag", ""))

    def _get(self, table: TableClient, pk: str, rk: str, what: str) -> tuple[dict[str, Any], str] | None:
        if not (_storable_key(pk) and _storable_key(rk)):
            return None  # no such row can exist; the service would answer 400 or 500, not 404
        try:
            entity = table.get_entity(pk, rk)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _translate(exc, what) from exc
        return dict(entity), str(entity.metadata["etag"])

    def _query(
        self, table: TableClient, query: str, params: dict[str, Any], limit: int | None = None
    ) -> Iterator[tuple[dict[str, Any], str]]:
        try:
            pages = table.query_entities(query, parameters=params, results_per_page=min(limit or 1000, 1000))
            for count, entity in enumerate(pages, start=1):
                yield dict(entity), str(entity.metadata["etag"])
                if limit is not None and count >= limit:
                    return
        except AzureError as exc:
            raise _translate(exc, "query") from exc

    def _page(
        self,
        table: TableClient,
        query: str,
        params: dict[str, Any],
        limit: int,
        convert: Callable[[dict[str, Any]], Any],
    ) -> Page:
        rows = [r for r, _ in self._query(table, query, params, limit + 1)]
        return codec.page_of(rows, limit, convert)

    # --- routines ---------------------------------------------------------------------------
    def list_routines(self, state: str | None, limit: int, continuation: str | None) -> Page:
        after = codec.decode_continuation(continuation, codec.ROUTINE_PREFIX)
        query = "PartitionKey eq @pk and RowKey gt @after and RowKey lt @end"
        params: dict[str, Any] = {
            "pk": codec.ROUTINE_PK,
            "after": after or codec.ROUTINE_PREFIX,
            "end": "id;",
        }
        if state:
            query += " and State eq @state"
            params["state"] = state
        return self._page(self._routines, query, params, limit, codec.routine_from_row)

    # --- due index --------------------------------------------------------------------------
    def due_entries(self, before: datetime) -> list[DueEntry]:
        rows = self._query(
            self._routines,
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            {"pk": codec.ROUTINE_PK, "lo": codec.DUE_PREFIX, "hi": codec.due_bound(before)},
        )
        return [codec.due_entry_from_row(r, e) for r, e in rows]

    def advance(self, advances: Sequence[Advance]) -> list[bool]:
        """Batches advances (3 rows each, plus their watches) up to 100 rows per transaction, since
        they share a partition; a batch that fails is replayed one advance at a time so one lost race
        costs only itself."""
        results: list[bool] = []
        plans = [
            codec.advance_ops(a.entry, a.next_fire_at, a.completed, a.watches, a.fired, a.planned_until)
            for a in advances
        ]
        chunks: list[list[int]] = []
        size = 0
        for index, plan in enumerate(plans):
            if not chunks or size + len(plan) > 100:
                chunks.append([])
                size = 0
            chunks[-1].append(index)
            size += len(plan)
        for indexes in chunks:
            chunk = [advances[i] for i in indexes]
            ops = [op for i in indexes for op in plans[i]]
            try:
                self._execute(self._routines, ops, "advance")
                results.extend([True] * len(chunk))
                continue
            except (Conflict, NotFound, PreconditionFailed):
                if len(chunk) == 1:
                    results.append(False)
                    continue
            for i in indexes:
                try:
                    self._execute(self._routines, plans[i], "advance")
                    results.append(True)
                except (Conflict, NotFound, PreconditionFailed):
                    results.append(False)
        return results

    def watched(self, before: datetime, limit: int) -> list[Watch]:
        rows = self._query(
            self._routines,
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and CheckAt lt @before",
            {
                "pk": codec.ROUTINE_PK,
                "lo": codec.WATCH_PREFIX,
                "hi": codec.WATCH_END,
                "before": codec.iso(before),
            },
            limit,
        )
        return [codec.watch_from_row(r) for r, _ in rows]

    # --- runs -------------------------------------------------------------------------------
    def list_runs(
        self, routine_id: str, status: RunStatus | None, limit: int, continuation: str | None
    ) -> Page:
        after = codec.decode_continuation(continuation, codec.RUN_PREFIX)
        query = "PartitionKey eq @pk and RowKey gt @after and RowKey lt @end"
        params: dict[str, Any] = {"pk": routine_id, "after": after or codec.RUN_PREFIX, "end": codec.RUN_END}
        if status is not None:
            query += " and Status eq @status"
            params["status"] = status.value
        return self._page(self._runs, query, params, limit, codec.run_from_row)

    def runs_scheduled_before(self, cutoff: datetime) -> Iterator[Run]:
        rows = self._query(
            self._runs,
            "ScheduledFor lt @cutoff and RowKey ge @lo and RowKey lt @hi",
            {"cutoff": codec.iso(cutoff), "lo": codec.RUN_PREFIX, "hi": codec.RUN_END},
        )
        return (codec.run_from_row(r) for r, _ in rows)

    def delete_runs(self, runs: Sequence[Run]) -> int:
        by_routine: dict[str, dict[str, None]] = defaultdict(dict)  # ordered, without duplicates
        for run in runs:
            by_routine[run.routine_id][run.id] = None
        deleted = 0
        for routine_id, run_ids in by_routine.items():
            ids = list(run_ids)
            for start in range(0, len(ids), 100):
                # One transaction per 100 rows of a partition. TableClient.delete_entity swallows a
                # 404, which would count a row that was already gone; a transaction reports it with
                # its index, so it is dropped from the batch and the rest is tried again.
                batch = ids[start : start + 100]
                while batch:
                    ops = [("delete", {"PartitionKey": routine_id, "RowKey": run_id}) for run_id in batch]
                    try:
                        self._runs.submit_transaction(ops)
                    except TableTransactionError as exc:
                        if exc.status_code != 404 or not 0 <= exc.index < len(batch):
                            raise _translate(exc, f"delete runs of {routine_id}") from exc
                        del batch[exc.index]
                        continue
                    except AzureError as exc:
                        raise _translate(exc, f"delete runs of {routine_id}") from exc
                    deleted += len(batch)
                    break
        return deleted

    def delete_deliveries_before(self, cutoff: datetime) -> int:
        rows = self._query(
            self._runs,
            "ReceivedAt lt @cutoff and RowKey ge @lo and RowKey lt @hi",
            {"cutoff": codec.iso(cutoff), "lo": codec.DELIVERY_PREFIX, "hi": codec.DELIVERY_END},
        )
        deleted = 0
        for row, etag in list(rows):
            try:
                self._execute(self._runs, [("delete", row, etag)], "old delivery")
                deleted += 1
            except (NotFound, PreconditionFailed):
                pass  # gone already, or written again since
        return deleted

    # --- coordination -----------------------------------------------------------------------
    def ping(self) -> None:
        try:
            next(
                iter(
                    self._routines.query_entities(
                        "PartitionKey eq @pk", parameters={"pk": "ping"}, results_per_page=1
                    )
                ),
                None,
            )
        except AzureError as exc:
            raise _translate(exc, "ping") from exc


class _WireError(Exception):
    """A write try that got no usable answer (``maybe_applied``: it reached storage, or may have)."""

    def __init__(self, error: RoutinesError, *, maybe_applied: bool) -> None:
        super().__init__(str(error))
        self.error, self.maybe_applied = error, maybe_applied


def _plain(value: Any) -> Any:
    """A property as stored or as read back (the SDK wraps some values in an ``EntityProperty``)."""
    return getattr(value, "value", value)


def _storable_key(key: str) -> bool:
    """Whether Azure Tables can hold ``key`` as a PartitionKey / RowKey: at most 1 KiB, without
    ``/ \\ # ?`` or control characters (ids come from URLs and queue messages, so anything arrives)."""
    return len(key.encode("utf-16-le", "surrogatepass")) <= 1024 and not any(
        c in "/\\#?" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key
    )


def _transaction_op(kind: str, row: dict[str, Any], etag: str | None) -> tuple[Any, ...]:
    cond: dict[str, Any] = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
    if kind == "insert":
        return ("create", row)
    if kind == "delete":
        return ("delete", row, cond)
    if kind == "upsert":
        return ("upsert", row, {"mode": UpdateMode.REPLACE})
    mode = UpdateMode.MERGE if kind == "merge" else UpdateMode.REPLACE
    return ("update", row, {"mode": mode, **cond})
