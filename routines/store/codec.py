"""Model <-> stored row conversion and the key layout, shared by both stores (round-trip tested)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from routines.errors import ValidationError
from routines.limits import L, LimitRow
from routines.models import Routine, Run
from routines.store.base import DebounceWrite, Delivery, DueEntry, Page, Watch

log = logging.getLogger(__name__)

ROUTINE_PK = "r"
ROUTINE_PREFIX = "id:"
NAME_PREFIX = "name:"
DUE_PREFIX = "due:"
LEASE_PREFIX = "lease:"
WATCH_PREFIX = "watch:"
WATCH_END = "watch;"  # the character after ":": the end of the watch range
RUN_PREFIX = "run_"
RUN_END = "run`"  # the character after "_": the end of the run-id range
SLOT_RK = "slot"
DEBOUNCE_RK = "debounce"  # a webhook routine's open debounce window: the run that will take the burst
DELIVERY_PREFIX = "delivery:"  # a webhook delivery taken (its id hashed: ids may hold any character)
DELIVERY_END = "delivery;"
# A table string property holds at most 64 KiB of UTF-16. A code point takes up to 4 bytes of UTF-16
# (emoji and other astral characters are surrogate pairs), so 15,000 code points always fit.
CHUNK = 15_000


def routine_rk(routine_id: str) -> str:
    return ROUTINE_PREFIX + routine_id


def name_rk(name: str) -> str:
    return NAME_PREFIX + name


def due_rk(fire_at: datetime, routine_id: str) -> str:
    return f"{DUE_PREFIX}{int(fire_at.timestamp() * 1000):014d}:{routine_id}"


def due_bound(before: datetime) -> str:
    return f"{DUE_PREFIX}{int(before.timestamp() * 1000):014d}"


def lease_rk(name: str) -> str:
    return LEASE_PREFIX + name


def watch_rk(routine_id: str, run_id: str) -> str:
    return f"{WATCH_PREFIX}{routine_id}:{run_id}"


def watch_row(watch: Watch) -> dict[str, Any]:
    return {
        "PartitionKey": ROUTINE_PK,
        "RowKey": watch_rk(watch.routine_id, watch.run_id),
        "RoutineId": watch.routine_id,
        "RunId": watch.run_id,
        "ScheduledFor": iso(watch.scheduled_for),
        "Trigger": watch.trigger,
        "Version": watch.version,
        "CheckAt": iso(watch.check_at),
        "DispatchAt": iso(watch.dispatch_at),
    }


def watch_from_row(row: dict[str, Any]) -> Watch:
    return Watch(
        routine_id=str(row["RoutineId"]),
        run_id=str(row["RunId"]),
        scheduled_for=datetime.fromisoformat(str(row["ScheduledFor"])),
        trigger=str(row["Trigger"]),
        version=int(row["Version"]),
        check_at=datetime.fromisoformat(str(row["CheckAt"])),
        dispatch_at=datetime.fromisoformat(str(row["DispatchAt"])) if row.get("DispatchAt") else None,
    )


def watch_ops(watches: Sequence[Watch]) -> list[Op]:
    """Upserts: a watch written again (a tick replayed after a crash) must not fail its transaction."""
    return [("upsert", watch_row(w), None) for w in watches]


def _chunks(text: str) -> dict[str, str]:
    return {f"Data{i}": text[i * CHUNK : (i + 1) * CHUNK] for i in range(max(1, -(-len(text) // CHUNK)))}


def _join(row: dict[str, Any]) -> str:
    parts, i = [], 0
    while f"Data{i}" in row:
        parts.append(str(row[f"Data{i}"]))
        i += 1
    return "".join(parts)


# What the tick changes without reading the routine (``advance_ops`` merges them): columns of their own.
_ROUTINE_COLUMNS = {"state", "next_fire_at", "fire_count", "next_dispatch_at", "planned_until"}


def routine_row(routine: Routine) -> dict[str, Any]:
    body = routine.model_dump(mode="json", exclude=_ROUTINE_COLUMNS)
    body["schedule_version"] = routine.schedule_version
    if routine.failures or routine.failures_since:
        body["failures"] = routine.failures
        body["failures_since"] = iso(routine.failures_since) or None
    return {
        "PartitionKey": ROUTINE_PK,
        "RowKey": routine_rk(routine.id),
        "Name": routine.name,
        "State": routine.state.value,
        "NextFireAt": iso(routine.next_fire_at),
        "DueAt": iso(routine.due_at),
        "FireCount": routine.fire_count,
        "PlannedUntil": iso(routine.planned_until),
        **_chunks(json.dumps(body, separators=(",", ":"), ensure_ascii=False)),
    }


def routine_from_row(row: dict[str, Any]) -> Routine:
    body = json.loads(_join(row))
    body["state"] = row["State"]
    body["next_fire_at"] = row.get("NextFireAt") or None
    body["due_at"] = row.get("DueAt") or None
    body["fire_count"] = int(row.get("FireCount") or 0)
    body["planned_until"] = row.get("PlannedUntil") or None
    return Routine.model_validate(body)


def name_row(routine: Routine) -> dict[str, Any]:
    return {"PartitionKey": ROUTINE_PK, "RowKey": name_rk(routine.name), "RoutineId": routine.id}


def due_row(routine: Routine) -> dict[str, Any] | None:
    if routine.due_at is None:
        return None
    entry = DueEntry(
        routine_id=routine.id,
        name=routine.name,
        fire_at=routine.due_at,
        trigger=routine.trigger.model_dump(mode="json"),
        schedule_version=routine.schedule_version,
        catchup_window_seconds=routine.catchup_window_seconds,
        etag="",
        jitter_seconds=routine.jitter_seconds,
        end_at=routine.end_at,
        max_fires=routine.max_fires,
        fire_count=routine.fire_count,
    )
    return moved_due_row(entry, routine.due_at, 0)


def due_entry_from_row(row: dict[str, Any], etag: str) -> DueEntry:
    ms = int(str(row["RowKey"])[len(DUE_PREFIX) :].split(":", 1)[0])
    max_fires = row.get("MaxFires")
    return DueEntry(
        routine_id=row["RoutineId"],
        name=row["Name"],
        fire_at=datetime.fromtimestamp(ms / 1000, UTC),
        trigger=json.loads(row["Trigger"]),
        schedule_version=int(row["ScheduleVersion"]),
        catchup_window_seconds=int(row["Catchup"]),
        etag=etag,
        jitter_seconds=int(row.get("Jitter") or 0),
        end_at=datetime.fromisoformat(str(row["EndAt"])) if row.get("EndAt") else None,
        max_fires=int(max_fires) if max_fires else None,
        fire_count=int(row.get("FireCount") or 0),
    )


def moved_due_row(entry: DueEntry, fire_at: datetime, fired: int) -> dict[str, Any]:
    """``entry`` moved to ``fire_at``, ``fired`` more fires counted."""
    return {
        "PartitionKey": ROUTINE_PK,
        "RowKey": due_rk(fire_at, entry.routine_id),
        "RoutineId": entry.routine_id,
        "Name": entry.name,
        "Trigger": json.dumps(entry.trigger, separators=(",", ":")),
        "ScheduleVersion": entry.schedule_version,
        "Catchup": entry.catchup_window_seconds,
        "Jitter": entry.jitter_seconds,
        "EndAt": iso(entry.end_at),
        "MaxFires": entry.max_fires or 0,
        "FireCount": entry.fire_count + fired,
    }


def run_row(run: Run) -> dict[str, Any]:
    body = run.model_dump(mode="json")
    body["progress"] = run.progress.model_dump(mode="json")
    return {
        "PartitionKey": run.routine_id,
        "RowKey": run.id,
        "Status": run.status.value,
        "ScheduledFor": iso(run.scheduled_for),
        **_chunks(json.dumps(body, separators=(",", ":"), ensure_ascii=False)),
    }


def run_from_row(row: dict[str, Any]) -> Run:
    return Run.model_validate(json.loads(_join(row)))


def iso(value: datetime | None) -> str:
    """Fixed width (always microseconds), so stored times compare as text in instant order: the
    stores filter and compare them as strings (purge cutoff, lease expiry)."""
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def page_of(rows: list[dict[str, Any]], limit: int, convert: Callable[[dict[str, Any]], Any]) -> Page:
    """A page of at most ``limit`` of ``rows`` (one more tells there is a next page). A row that no
    longer parses is left out with a log line, so one bad row cannot take the whole list down."""
    items = []
    for row in rows[:limit]:
        try:
            items.append(convert(row))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("skipping unreadable row %s/%s: %s", row.get("PartitionKey"), row.get("RowKey"), exc)
    more = len(rows) > limit
    return Page(items, encode_continuation(str(rows[limit - 1]["RowKey"])) if more else None)


def encode_continuation(row_key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": row_key}).encode()).decode().rstrip("=")


def decode_continuation(token: str | None, prefix: str) -> str | None:
    """The row key to continue after. Raises ``ValidationError`` for a token we did not issue."""
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        after = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        after = None
    if not isinstance(after, str) or not after.startswith(prefix) or len(after) > 200:
        raise ValidationError(
            "continuation is not a token this API issued",
            [{"loc": ["query", "continuation"], "msg": "invalid continuation token"}],
        )
    return after


# --- write plans: the rows each operation touches, executed atomically by either store -----------

Op = tuple[str, dict[str, Any], str | None]  # (insert | replace | upsert | merge | delete, row, etag)


def create_routine_ops(routine: Routine, watches: Sequence[Watch] = ()) -> list[Op]:
    ops: list[Op] = [("insert", routine_row(routine), None), ("insert", name_row(routine), None)]
    due = due_row(routine)
    if due:
        ops.append(("insert", due, None))
    return ops + watch_ops(watches)


def replace_routine_ops(
    routine: Routine, etag: str, previous: Routine, watches: Sequence[Watch] = ()
) -> list[Op]:
    ops: list[Op] = [("replace", routine_row(routine), etag)]
    if routine.name != previous.name:
        ops.append(("delete", name_row(previous), None))
        ops.append(("insert", name_row(routine), None))
    old_due, new_due = due_row(previous), due_row(routine)
    if old_due != new_due:
        if old_due and new_due and old_due["RowKey"] == new_due["RowKey"]:
            ops.append(("replace", new_due, None))
        else:
            if old_due:
                ops.append(("delete", old_due, None))
            if new_due:
                ops.append(("insert", new_due, None))
    return ops + watch_ops(watches)


def delete_routine_ops(routine: Routine, etag: str) -> list[Op]:
    ops: list[Op] = [("delete", routine_row(routine), etag), ("delete", name_row(routine), None)]
    due = due_row(routine)
    if due:
        ops.append(("delete", due, None))
    return ops


def advance_ops(
    entry: DueEntry,
    next_fire_at: datetime | None,
    completed: bool,
    watches: Sequence[Watch] = (),
    fired: int = 0,
    planned_until: datetime | None = None,
) -> list[Op]:
    """Delete the due row (conditional on its etag: the lock against a concurrent tick or edit),
    merge the routine's next fire (and its count of fires, ``fired`` more), insert the moved due row,
    and watch each fire enqueued (the outbox: a fire whose message is lost after this write is sent
    again by the repair pass)."""
    key = {"PartitionKey": ROUTINE_PK, "RowKey": due_rk(entry.fire_at, entry.routine_id)}
    patch: dict[str, Any] = {
        "PartitionKey": ROUTINE_PK,
        "RowKey": routine_rk(entry.routine_id),
        "DueAt": iso(next_fire_at),
    }
    if next_fire_at is not None or completed:  # else: a timer enqueued, still shown until it runs
        patch["NextFireAt"] = iso(next_fire_at)
    if completed:
        patch["State"] = "completed"
    if fired:
        patch["FireCount"] = entry.fire_count + fired
    if planned_until is not None:
        patch["PlannedUntil"] = iso(planned_until)
    ops: list[Op] = [("delete", key, entry.etag), ("merge", patch, None)]
    if next_fire_at is not None:
        ops.append(("insert", moved_due_row(entry, next_fire_at, fired), None))
    return ops + watch_ops(watches)


def delivery_rk(delivery_id: str) -> str:
    return DELIVERY_PREFIX + hashlib.sha256(delivery_id.encode()).hexdigest()[:40]


def delivery_row(delivery: Delivery) -> dict[str, Any]:
    return {
        "PartitionKey": delivery.routine_id,
        "RowKey": delivery_rk(delivery.delivery_id),
        "DeliveryId": delivery.delivery_id,
        "RunId": delivery.run_id,
        "BodySha256": delivery.body_sha256,
        "ReceivedAt": iso(delivery.received_at),
    }


def delivery_from_row(row: dict[str, Any]) -> Delivery:
    return Delivery(
        routine_id=str(row["PartitionKey"]),
        delivery_id=str(row["DeliveryId"]),
        run_id=str(row["RunId"]),
        body_sha256=str(row["BodySha256"]),
        received_at=datetime.fromisoformat(str(row["ReceivedAt"])),
    )


def record_delivery_ops(
    run: Run, etag: str | None, delivery: Delivery, debounce: DebounceWrite | None
) -> list[Op]:
    """The run (inserted or replaced), the delivery (inserted: a second one with the same id fails
    the whole transaction) and the debounce pointer, all in the run's partition."""
    ops: list[Op] = [("insert" if etag is None else "replace", run_row(run), etag)]
    ops.append(("insert", delivery_row(delivery), None))
    if debounce is not None:
        pointer = {"PartitionKey": run.routine_id, "RowKey": DEBOUNCE_RK, "RunId": debounce.run_id}
        ops.append(("insert" if debounce.etag is None else "replace", pointer, debounce.etag))
    return ops


def slot_op(routine_id: str, holder: str | None, buffered: str | None, etag: str | None) -> Op:
    row = {"PartitionKey": routine_id, "RowKey": SLOT_RK, "Holder": holder or "", "Buffered": buffered or ""}
    if etag is None:
        return ("insert", row, None)
    return ("delete" if holder is None else "replace", row, etag)


def lease_row(name: str, owner: str, until: datetime) -> dict[str, Any]:
    return {"PartitionKey": ROUTINE_PK, "RowKey": lease_rk(name), "Owner": owner, "Until": iso(until)}


# --- flow-control rows (concurrency keys, rate limits) -----------------------------------------
LIMITS_PK = "limits"  # in the runs table: no routine id looks like this


def limit_row(row: LimitRow) -> dict[str, Any]:
    return {
        "PartitionKey": LIMITS_PK,
        "RowKey": row.PREFIX + row.key,
        **_chunks(json.dumps(row.body(), separators=(",", ":"))),
    }


def limit_from_row(kind: type[L], row: dict[str, Any], etag: str) -> L:
    return kind.from_body(str(row["RowKey"])[len(kind.PREFIX) :], json.loads(_join(row)), etag)
