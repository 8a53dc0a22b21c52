"""Retention, for ``cleanup_outbox``: delete processed events older than OUTBOX_RETENTION_DAYS.

Deletes go in chunks, each its own short statement in autocommit: no long
transaction holds back vacuum or the relay's horizon (``pg_snapshot_xmin``), and
no lock is held between chunks. Events still pending, in flight, retrying or
failed are never deleted: failed ones wait for `requeue_failed_events`.
"""

import dataclasses
import datetime as dt
import time
from collections.abc import Callable

import dagster as dg

from outbox_pipeline.orchestration.resources import OutboxDatabaseResource
from outbox_pipeline.orchestration.run_config import CleanupConfig
from outbox_pipeline.relay.retrying import BackoffPolicy, call_postgres_with_retries
from outbox_pipeline.stores.outbox_store import OutboxStore


@dataclasses.dataclass
class CleanupReport:
    cutoff: dt.datetime
    events_deleted: int = 0
    event_chunks: int = 0
    batches_deleted: int = 0
    failed_kept: int = 0
    seconds: float = 0.0


def _delete_in_chunks(delete_chunk: Callable[[], int], chunk_size: int) -> tuple[int, int]:
    """Call ``delete_chunk`` until a chunk deletes fewer than ``chunk_size``; (rows, chunks)."""
    total = chunks = 0
    while True:
        deleted = delete_chunk()
        total += deleted
        chunks += 1
        if deleted < chunk_size:
            return total, chunks


def clean_outbox(
    outbox: OutboxStore,
    *,
    retention_days: int,
    chunk_size: int,
    now: dt.datetime,
    retry: BackoffPolicy = BackoffPolicy(),
    log: Callable[[str], None] = lambda message: None,
) -> CleanupReport:
    started = time.perf_counter()
    report = CleanupReport(cutoff=now - dt.timedelta(days=retention_days))

    def postgres(what: str, fn):
        return call_postgres_with_retries(outbox, what, fn, retry)

    def events_chunk() -> int:
        deleted = postgres("deleting processed events", lambda: outbox.delete_processed_before(report.cutoff, chunk_size=chunk_size))
        if deleted:
            log(f"deleted {deleted} processed events created before {report.cutoff.isoformat(timespec='seconds')}")
        return deleted

    report.events_deleted, report.event_chunks = _delete_in_chunks(events_chunk, chunk_size)
    report.batches_deleted, _ = _delete_in_chunks(
        lambda: postgres(
            "deleting finished batches", lambda: outbox.delete_finished_batches_before(report.cutoff, chunk_size=chunk_size)
        ),
        chunk_size,
    )
    report.failed_kept = postgres("counting failed events", lambda: outbox.counts().failed)
    report.seconds = time.perf_counter() - started
    return report


@dg.op(description="Delete processed outbox events (and finished batches) older than the retention, in short chunks.")
def delete_old_outbox_events(
    context: dg.OpExecutionContext, config: CleanupConfig, outbox: OutboxDatabaseResource
) -> dg.Output[dict]:
    retention_days = config.retention_days or outbox.retention_days
    report = clean_outbox(
        outbox.store(),
        retention_days=retention_days,
        chunk_size=config.chunk_size,
        now=dt.datetime.now(dt.UTC),
        retry=outbox.retry,
        log=context.log.debug,
    )
    context.log.info(
        f"deleted {report.events_deleted} processed events and {report.batches_deleted} finished batches created before "
        f"{report.cutoff.isoformat(timespec='seconds')} ({retention_days} days) in {report.event_chunks} chunks; "
        f"{report.failed_kept} failed events kept"
    )
    metadata = {
        "events_deleted": dg.MetadataValue.int(report.events_deleted),
        "batches_deleted": dg.MetadataValue.int(report.batches_deleted),
        "chunks": dg.MetadataValue.int(report.event_chunks),
        "failed_kept": dg.MetadataValue.int(report.failed_kept),
        "cutoff": dg.MetadataValue.text(report.cutoff.isoformat(timespec="seconds")),
        "retention_days": dg.MetadataValue.int(retention_days),
        "duration_seconds": dg.MetadataValue.float(round(report.seconds, 3)),
    }
    return dg.Output({key: value.value for key, value in metadata.items()}, metadata=metadata)
