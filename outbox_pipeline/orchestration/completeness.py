"""The ``complete`` check: every event a relay delivered is in its ClickHouse table, day by day.

Per UTC day of event_date_time, the events PostgreSQL counts as delivered by the relay must all be
in the table (distinct event_ids of the relay's types). It notices what the other checks cannot: a
dropped partition, a mutation that deleted rows, a replica that lost data.

Cost: a full pass reads every day the outbox still holds (``OUTBOX_RETENTION_DAYS``), once per
``FULL_PASS_SECONDS``. In between, a pass reads only the days that can have changed since the last
one: the days of the events delivered since (through the batches finished since), and the days
the last pass found incomplete, so a missing day stays reported until it is repaired.
"""

import datetime as dt
import time

import dagster as dg

from outbox_pipeline.orchestration.check_outcome import CheckOutcome
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource

COMPLETENESS_CHECK = "complete"
FULL_PASS_SECONDS = 24 * 3600.0
# Batches finished just before the last pass began may not have been counted by it.
OVERLAP_SECONDS = 300.0


def completeness_outcome(
    delivered: dict[dt.date, int], present: dict[dt.date, int], since: dt.date, *, full_pass_at: float, full: bool
) -> CheckOutcome:
    """Each day's events the relay delivered against the distinct event_ids of its types in its table."""
    missing = {day: count - present.get(day, 0) for day, count in sorted(delivered.items()) if present.get(day, 0) < count}
    described = (
        f"{sum(missing.values())} delivered events missing from ClickHouse on "
        + ", ".join(f"{day.isoformat()} ({count})" for day, count in missing.items())
        + ": replay those days (replay_outbox_events)"
        if missing
        else f"every delivered event is in ClickHouse ({'all' if full else 'the changed'} {len(delivered)} days from {since.isoformat()})"
    )
    return CheckOutcome(
        passed=not missing,
        severity=dg.AssetCheckSeverity.ERROR,
        description=described,
        metadata={
            "pass": dg.MetadataValue.text("full" if full else "changed days"),
            "full_pass_at": dg.MetadataValue.float(full_pass_at),
            "days_checked": dg.MetadataValue.int(len(delivered)),
            "events_delivered": dg.MetadataValue.int(sum(delivered.values())),
            "events_missing": dg.MetadataValue.int(sum(missing.values())),
            "days_missing_events": dg.MetadataValue.text(", ".join(day.isoformat() for day in missing) or "none"),
        },
    )


def _last_pass(instance: dg.DagsterInstance, key: dg.AssetCheckKey) -> tuple[float, float, list[dt.date]] | None:
    """(when the last pass ran, when the last full pass ran, the days it found incomplete), if any."""
    # The newest record is this pass itself, still planned: the last finished one is behind it.
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=5):
        evaluation = record.evaluation
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            continue
        metadata = evaluation.metadata
        if "full_pass_at" not in metadata:
            return None
        missing = metadata["days_missing_events"].value
        days = [] if missing == "none" else [dt.date.fromisoformat(day) for day in missing.split(", ")]
        return record.create_timestamp, metadata["full_pass_at"].value, days
    return None


def check_completeness(
    instance: dg.DagsterInstance,
    key: dg.AssetCheckKey,
    outbox: OutboxDatabaseResource,
    clickhouse: ClickHouseResource,
    like_patterns: tuple[str, ...],
    *,
    now: float | None = None,
) -> CheckOutcome:
    now = time.time() if now is None else now
    # Retention deletes a day's oldest events first: the day at its cutoff is left out.
    since = dt.datetime.fromtimestamp(now, dt.UTC).date() - dt.timedelta(days=outbox.retention_days - 1)
    last = _last_pass(instance, key)
    full = last is None or now - last[1] >= FULL_PASS_SECONDS
    with outbox.short_lived_store() as store:
        days = None
        if not full:
            changed = store.days_delivered_since(dt.datetime.fromtimestamp(last[0] - OVERLAP_SECONDS, dt.UTC))
            days = sorted({day for day in [*changed, *last[2]] if day >= since})
        delivered = store.delivered_per_day(since, days) if days != [] else {}
    present = clickhouse.store().distinct_per_day(since, like_patterns, days) if delivered else {}
    return completeness_outcome(delivered, present, since, full_pass_at=now if full else last[1], full=full)
