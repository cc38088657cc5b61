"""The daily purge: runs older than the retention are archived (when configured) then deleted."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from routines.config import Settings
from routines.models import Run
from routines.store import Store

log = logging.getLogger(__name__)
BATCH = 500
Archiver = Callable[[str, list[dict[str, Any]]], None]


def blob_archiver(settings: Settings) -> Archiver | None:
    """Appends JSON lines to ``<container>/runs-<date>.jsonl`` (an append blob per purge day)."""
    if not settings.run_archive_container:
        return None
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    target = settings.storage
    if target.connection_string:
        service = BlobServiceClient.from_connection_string(target.connection_string)
    else:
        from routines.runtime import _credential

        service = BlobServiceClient(target.blob_endpoint or "", credential=_credential(settings))
    container = service.get_container_client(settings.run_archive_container)
    with contextlib.suppress(ResourceExistsError):
        container.create_container()

    def archive(name: str, rows: list[dict[str, Any]]) -> None:
        blob = container.get_blob_client(name)
        if not blob.exists():
            with contextlib.suppress(ResourceExistsError):
                blob.create_append_blob()
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()
        for start in range(0, len(data), 4 * 1024 * 1024):  # an append block holds at most 4 MiB
            blob.append_block(data[start : start + 4 * 1024 * 1024])

    return archive


def purge(store: Store, settings: Settings, now: datetime, archive: Archiver | None = None) -> int:
    """Delete finished runs scheduled before ``now - retention``; archive each batch first when
    configured.
    Returns how many were deleted. A failure part-way leaves the rest for the next day."""
    archive = archive or blob_archiver(settings)
    cutoff = now - timedelta(days=settings.run_retention_days)
    name = f"runs-{now:%Y-%m-%d}.jsonl"
    total = 0
    # A run still going (a long retry back-off, an approval) is kept until it ends, however old.
    ended = (run for run in store.runs_scheduled_before(cutoff) if run.status.terminal)
    for batch in _batches(ended, BATCH):
        if archive:
            archive(name, [r.public() for r in batch])
        total += store.delete_runs(batch)
    # Webhook deliveries are remembered (a redelivery finds its run) as long as runs are kept.
    forgotten = store.delete_deliveries_before(cutoff)
    log.info(
        "purge: deleted %d runs scheduled before %s, forgot %d webhook deliveries",
        total,
        cutoff.isoformat(),
        forgotten,
    )
    return total


def _batches(runs: Iterable[Run], size: int) -> Iterable[list[Run]]:
    batch: list[Run] = []
    for run in runs:
        batch.append(run)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
