"""The daily purge: retention, archiving to blob as JSON lines, runs of deleted routines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient

from routines.config import Settings
from routines.models import Run, RunStatus, RunTrigger, idempotency_key, scheduled_run_id
from routines.purge import blob_archiver, purge
from routines.store.memory import MemoryStore
from routines.store.tables import TableStore

NOW = datetime(2026, 11, 29, 3, 30, tzinfo=UTC)


def make_run(routine_id: str, days_ago: float) -> Run:
    at = NOW - timedelta(days=days_ago)
    return Run(
        id=scheduled_run_id(routine_id, at),
        routine_id=routine_id,
        trigger=RunTrigger.schedule,
        scheduled_for=at,
        status=RunStatus.succeeded,
        idempotency_key=idempotency_key(routine_id, at),
    )


def test_purge_deletes_only_runs_older_than_the_retention_and_archives_them_first() -> None:
    store = MemoryStore()
    old = [make_run("rt_a", 31), make_run("rt_a", 45), make_run("rt_gone", 60)]
    kept = [make_run("rt_a", 29), make_run("rt_gone", 1)]
    for run in old + kept:
        store.insert_run(run)
    archived: list[tuple[str, list[dict[str, object]]]] = []
    settings = Settings.from_env(
        {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "ROUTINES_RUN_RETENTION_DAYS": "30"}
    )

    deleted = purge(store, settings, NOW, archive=lambda name, rows: archived.append((name, rows)))

    assert deleted == 3
    assert sorted(r.id for r in store.runs_scheduled_before(NOW + timedelta(days=1))) == sorted(
        r.id for r in kept
    )
    assert [name for name, _ in archived] == ["runs-2026-11-29.jsonl"]
    assert sorted(str(row["id"]) for row in archived[0][1]) == sorted(r.id for r in old)
    assert all("progress" not in row for row in archived[0][1])  # the public shape, no internals


def test_purge_archives_json_lines_to_a_blob_container(azurite: object, table_prefix: str) -> None:
    connection = azurite.connection_string  # type: ignore[attr-defined]
    container = f"archive{table_prefix}"
    settings = Settings.from_env(
        {
            "AzureWebJobsStorage": connection,
            "ROUTINES_TABLE_PREFIX": table_prefix,
            "ROUTINES_RUN_ARCHIVE_CONTAINER": container,
        }
    )
    store = TableStore(TableServiceClient.from_connection_string(connection), table_prefix)
    store.ensure_tables()
    old = [make_run("rt_a", 40 + i) for i in range(3)]
    for run in [*old, make_run("rt_a", 2)]:
        store.insert_run(run)
    archive = blob_archiver(settings)
    assert archive is not None

    assert purge(store, settings, NOW, archive) == 3
    assert purge(store, settings, NOW, archive) == 0  # nothing left to purge, nothing appended

    blob = BlobServiceClient.from_connection_string(connection).get_blob_client(
        container, "runs-2026-11-29.jsonl"
    )
    lines = blob.download_blob().readall().decode().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(r.id for r in old)
    assert [r.scheduled_for for r in store.runs_scheduled_before(NOW)] == [NOW - timedelta(days=2)]
