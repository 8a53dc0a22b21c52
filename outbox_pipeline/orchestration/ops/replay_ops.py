"""Replaying one day of events into ClickHouse again, for ``replay_outbox_events``.

What a replay loads: the day's events (by ``event_date_time``, UTC) that the
relay has delivered and that are missing from ``event_log``, for instance after
a ClickHouse partition was dropped or restored from an older backup. Events the
relay has not delivered yet (pending, in flight, retrying) are left to it: the
relay inserts them under its own deduplication tokens, so a replay that inserted
them too would leave two copies. Failed events are left to requeueing.

No duplicates, however often a day is replayed or by how many runs at once:

* each chunk (in outbox id order) first asks ClickHouse which of its events are
  present and inserts only the missing ones;
* the insert carries a token derived from the day and the inserted event ids, so
  two replays that saw the same missing events insert one copy;
* after the insert the chunk is checked again. ClickHouse drops an insert whose
  token it has seen within its deduplication window even when the rows were
  deleted since; such a chunk is inserted again under a token of the next round.

Then the day's typed tables are refreshed from ``event_log``: events they lack are
added, copies the replayed rows brought in twice are merged (typed_tables.py).
"""

import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Callable

import dagster as dg
from pydantic import Field

from outbox_pipeline.config.errors import OutboxPipelineError, RetriesExhaustedError
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import shared_ops_pool
from outbox_pipeline.relay.retrying import BackoffPolicy, call_postgres_with_retries, call_with_retries
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore

# Rounds of insert-and-verify per chunk: round 2 only follows a token ClickHouse remembered from an older replay.
MAX_INSERT_ROUNDS = 3


class ReplayConfig(dg.Config):
    chunk_size: int = Field(
        default=5_000, ge=1, le=100_000, description="Events per ClickHouse presence query and insert."
    )


class ReplayOutsideRetentionError(OutboxPipelineError):
    """The day may have lost events to retention: a replay could not be complete."""


@dataclasses.dataclass
class ReplayReport:
    day: dt.date
    events_found: int = 0  # every event of the day still in the outbox, whatever its state
    already_present: int = 0  # delivered events that ClickHouse already held
    inserted: int = 0
    left_to_relay: int = 0  # pending, in flight or retrying: the relay delivers them
    failed_kept: int = 0  # failed events: `requeue_failed_events` puts them back
    chunks_inserted: int = 0
    token_rounds: int = 0  # inserts repeated because ClickHouse dropped a remembered token
    typed_inserted: int = 0  # events added to the day's typed tables
    typed_duplicates_removed: int = 0  # extra copies merged away there
    seconds: float = 0.0


def replay_token(installation_id: str, day: dt.date, event_ids: list[str], round_number: int = 1) -> str:
    """The same day and events always give the same token (within one round)."""
    digest = hashlib.sha256("\n".join(event_ids).encode()).hexdigest()[:40]
    suffix = f"-r{round_number}" if round_number > 1 else ""
    return f"replay-{installation_id}-{day.isoformat()}-{len(event_ids)}-{digest}{suffix}"


def retention_cutoff(retention_days: int, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(days=retention_days)


def check_within_retention(day: dt.date, retention_days: int, now: dt.datetime) -> None:
    """A day reaching back before the retention cutoff may have lost events to cleanup_outbox."""
    cutoff = retention_cutoff(retention_days, now)
    day_start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    if day_start < cutoff:
        oldest = (cutoff + dt.timedelta(days=1)).date() if cutoff.time() != dt.time() else cutoff.date()
        raise ReplayOutsideRetentionError(
            f"cannot replay {day.isoformat()}: it is older than the outbox retention of {retention_days} days "
            f"(OUTBOX_RETENTION_DAYS), so cleanup_outbox may already have deleted some of its events and a replay "
            f"would be silently incomplete; the oldest day that can be replayed is {oldest.isoformat()}. "
            "Restore that day into ClickHouse from a backup instead."
        )


def replay_day(
    outbox: OutboxStore,
    event_log: EventLogStore,
    day: dt.date,
    *,
    chunk_size: int,
    retry: BackoffPolicy = BackoffPolicy(),
    log: Callable[[str], None] = lambda message: None,
) -> ReplayReport:
    """Insert the day's delivered events that ClickHouse is missing; see the module docstring."""
    started = time.perf_counter()
    report = ReplayReport(day)

    def postgres(what: str, fn):
        return call_postgres_with_retries(outbox, what, fn, retry)

    def clickhouse(what: str, fn):
        return call_with_retries(f"{what} in ClickHouse", fn, retry)

    installation_id = postgres("reading the installation id", lambda: outbox.installation_id)
    ids = postgres("listing the day's events", lambda: outbox.day_outbox_ids(day))
    report.events_found = len(ids)
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        states = postgres("reading delivery states", lambda: outbox.delivery_states(chunk))
        delivered = [(outbox_id, event_id) for outbox_id, event_id, state in states if state == "processed"]
        report.failed_kept += sum(1 for _, _, state in states if state == "failed")
        report.left_to_relay += sum(1 for _, _, state in states if state not in ("processed", "failed"))
        if not delivered:
            continue
        present = clickhouse("looking up present events", lambda: event_log.present_event_ids(day, [e for _, e in delivered]))
        report.already_present += len(present)
        missing = [(outbox_id, event_id) for outbox_id, event_id in delivered if event_id not in present]
        if not missing:
            continue
        to_insert = missing
        for round_number in range(1, MAX_INSERT_ROUNDS + 1):
            event_ids = [event_id for _, event_id in to_insert]
            sent_once = [False]

            def insert() -> None:
                rows = to_insert
                if sent_once[0]:
                    # The last attempt's outcome is unknown (it may have landed): send only what is still missing,
                    # whatever ClickHouse remembers of tokens.
                    held = event_log.present_event_ids(day, [event_id for _, event_id in rows])
                    rows = [(outbox_id, event_id) for outbox_id, event_id in rows if event_id not in held]
                    if not rows:
                        return
                sent_once[0] = True
                csv_block = postgres("reading the missing events", lambda: outbox.events_csv([i for i, _ in rows]))
                token = replay_token(installation_id, day, [event_id for _, event_id in rows], round_number)
                event_log.insert_csv(csv_block, deduplication_token=token)

            clickhouse("inserting replayed events", insert)
            now_present = clickhouse("verifying the insert", lambda: event_log.present_event_ids(day, event_ids))
            to_insert = [(outbox_id, event_id) for outbox_id, event_id in to_insert if event_id not in now_present]
            if not to_insert:
                break
            report.token_rounds += 1
            log(
                f"ClickHouse dropped the insert of {len(to_insert)} events as a repeat of an earlier replay "
                f"(their rows were deleted since); inserting them again under a new token (round {round_number + 1})"
            )
        else:
            raise OutboxPipelineError(
                f"{len(to_insert)} events of {day.isoformat()} are still missing from ClickHouse after "
                f"{MAX_INSERT_ROUNDS} inserts; check the event_log table and its deduplication settings"
            )
        report.inserted += len(missing)
        report.chunks_inserted += 1
        log(f"inserted {len(missing)} missing events (outbox ids {missing[0][0]}..{missing[-1][0]})")
    for refreshed in clickhouse("refreshing the typed tables", lambda: event_log.refresh_typed_day(day)):
        report.typed_inserted += refreshed.inserted
        report.typed_duplicates_removed += refreshed.duplicates_removed
        if refreshed.inserted or refreshed.duplicates_removed:
            log(f"{refreshed.table}: {refreshed.inserted} events added, {refreshed.duplicates_removed} extra copies merged")
    report.seconds = time.perf_counter() - started
    return report


def partition_day(context: dg.OpExecutionContext) -> dt.date:
    if not context.has_partition_key:
        raise dg.Failure(
            "replay_outbox_events replays one day: choose a partition in the UI, or pass "
            """--tags '{"dagster/partition": "YYYY-MM-DD"}' to `dagster job execute`"""
        )
    try:
        return dt.date.fromisoformat(context.partition_key)
    except ValueError:
        raise dg.Failure(f"partition {context.partition_key!r} is not a day; use YYYY-MM-DD") from None


@dg.op(
    description="Insert the partition's delivered events that ClickHouse is missing, without duplicates.",
    pool=shared_ops_pool(),
)
def replay_outbox_day(
    context: dg.OpExecutionContext,
    config: ReplayConfig,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
) -> dg.Output[dict]:
    day = partition_day(context)
    try:
        check_within_retention(day, outbox.retention_days, dt.datetime.now(dt.UTC))
    except ReplayOutsideRetentionError as exc:
        raise dg.Failure(str(exc), metadata={"day": day.isoformat(), "retention_days": outbox.retention_days}) from None
    try:
        report = replay_day(
            outbox.store(), clickhouse.store(), day, chunk_size=config.chunk_size, retry=outbox.retry, log=context.log.info
        )
    except RetriesExhaustedError as exc:
        raise dg.Failure(
            f"replay of {day.isoformat()} stopped: {exc}. Run the partition again: what was inserted is found and skipped."
        ) from exc
    metadata = {
        "day": dg.MetadataValue.text(day.isoformat()),
        "events_found": dg.MetadataValue.int(report.events_found),
        "already_present": dg.MetadataValue.int(report.already_present),
        "inserted": dg.MetadataValue.int(report.inserted),
        "left_to_relay": dg.MetadataValue.int(report.left_to_relay),
        "failed_kept": dg.MetadataValue.int(report.failed_kept),
        "chunks_inserted": dg.MetadataValue.int(report.chunks_inserted),
        "typed_inserted": dg.MetadataValue.int(report.typed_inserted),
        "typed_duplicates_removed": dg.MetadataValue.int(report.typed_duplicates_removed),
        "duration_seconds": dg.MetadataValue.float(round(report.seconds, 3)),
    }
    context.log.info(
        f"{day.isoformat()}: {report.events_found} events in the outbox, {report.already_present} already in ClickHouse, "
        f"{report.inserted} inserted, {report.left_to_relay} left to the relay, {report.failed_kept} failed (kept)"
    )
    if report.left_to_relay:
        context.log.info(f"{report.left_to_relay} events of the day are not delivered yet: process_outbox_events loads them")
    if report.inserted:
        context.log_event(
            dg.AssetMaterialization(
                asset_key=clickhouse.asset,
                description=f"replay of {day.isoformat()}",
                metadata={"replayed_day": metadata["day"], "events_replayed": metadata["inserted"]},
            )
        )
    return dg.Output({key: value.value for key, value in metadata.items()}, metadata=metadata)
