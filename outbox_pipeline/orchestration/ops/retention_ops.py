"""Retention, for ``cleanup_outbox``: retire processed events older than OUTBOX_RETENTION_DAYS.

The outbox is partitioned by day (schema version 6): a day past the retention goes
whole, one DROP of its partition, once every relay has delivered it. The partitions
of the coming days are made here too. Only events no partition covered (in
``outbox_default``) are deleted row by row, in chunks, each its own short statement in
autocommit: no long transaction holds back vacuum or the relay's horizon
(``pg_snapshot_xmin``). Events still pending, in flight, retrying or failed are never
removed: a partition holding one is kept, and failed ones wait for `requeue_failed_events`.
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
from outbox_pipeline.stores.partitions import PartitionOutcome

# A partition found busy (a transaction holds a lock on the outbox) is tried again this often, this far apart.
BUSY_ATTEMPTS = 5
BUSY_PAUSE_SECONDS = 2.0


@dataclasses.dataclass
class CleanupReport:
    cutoff: dt.datetime
    partitions_made: int = 0
    partitions: list[PartitionOutcome] = dataclasses.field(default_factory=list)
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


def _drop_partitions(drop: Callable[[], list[PartitionOutcome]], log: Callable[[str], None]) -> list[PartitionOutcome]:
    """Drop what can go; partitions found busy are tried again a few times, then left for the next run."""
    final: dict[str, PartitionOutcome] = {}
    for attempt in range(BUSY_ATTEMPTS):
        outcomes = drop()
        final.update((o.name, o) for o in outcomes)
        if not any(o.busy for o in outcomes) or attempt == BUSY_ATTEMPTS - 1:
            break
        time.sleep(BUSY_PAUSE_SECONDS)
    for outcome in final.values():
        log(f"partition {outcome.name} (to {outcome.ends.isoformat(timespec='seconds')}, ~{outcome.estimated_rows} events): {outcome.outcome}")
    return sorted(final.values(), key=lambda o: o.ends)


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

    report.partitions_made = postgres("making the coming days' partitions", outbox.create_partitions)
    report.partitions = _drop_partitions(lambda: postgres("dropping delivered partitions", lambda: outbox.drop_delivered_partitions(report.cutoff)), log)
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
    dropped = [o for o in report.partitions if o.dropped]
    kept = [o for o in report.partitions if not o.dropped]
    for outcome in kept:
        context.log.warning(f"partition {outcome.name} is past the retention and {outcome.outcome}")
    context.log.info(
        f"dropped {len(dropped)} delivered partitions (~{sum(o.estimated_rows for o in dropped)} events), kept {len(kept)}; "
        f"made {report.partitions_made} partitions ahead; "
        f"deleted {report.events_deleted} processed events and {report.batches_deleted} finished batches created before "
        f"{report.cutoff.isoformat(timespec='seconds')} ({retention_days} days) in {report.event_chunks} chunks; "
        f"{report.failed_kept} failed events kept"
    )
    metadata = {
        "partitions_dropped": dg.MetadataValue.int(len(dropped)),
        "partitions_kept": dg.MetadataValue.json({o.name: o.outcome for o in kept}),
        "partitions_made": dg.MetadataValue.int(report.partitions_made),
        "events_dropped_estimate": dg.MetadataValue.int(sum(o.estimated_rows for o in dropped)),
        "events_deleted": dg.MetadataValue.int(report.events_deleted),
        "batches_deleted": dg.MetadataValue.int(report.batches_deleted),
        "chunks": dg.MetadataValue.int(report.event_chunks),
        "failed_kept": dg.MetadataValue.int(report.failed_kept),
        "cutoff": dg.MetadataValue.text(report.cutoff.isoformat(timespec="seconds")),
        "retention_days": dg.MetadataValue.int(retention_days),
        "duration_seconds": dg.MetadataValue.float(round(report.seconds, 3)),
    }
    return dg.Output({key: value.value for key, value in metadata.items()}, metadata=metadata)
