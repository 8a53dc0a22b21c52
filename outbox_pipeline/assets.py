"""The ClickHouse ``event_log`` table as a Dagster asset, and its checks.

The table is an external asset: no asset function builds it. The relay's
``report_relay_run`` op records a materialization of it after every run that
loaded events, with the run's figures as numeric metadata (plotted on the asset
page); a replay records one too. The checks run in the ``check_event_log`` job,
on its schedule or from the asset page.
"""

import os

import dagster as dg
from pydantic import Field

from outbox_pipeline.settings import parse_number
from outbox_pipeline.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.stores.event_log_store import DEFAULT_TABLE


MAX_LAG_SECONDS = parse_number(
    "OUTBOX_FRESHNESS_MAX_LAG_SECONDS", os.environ.get("OUTBOX_FRESHNESS_MAX_LAG_SECONDS"), 300.0, exclusive=True
)

event_log = dg.AssetSpec(
    key=DEFAULT_TABLE,
    description=(
        "Domain events in ClickHouse, one row per event_id, loaded from the PostgreSQL outbox by "
        "process_outbox_events (materialized by its report_relay_run op) and by replay_outbox_events."
    ),
    group_name="outbox",
    kinds={"clickhouse"},
    metadata={
        "engine": "ReplacingMergeTree, PARTITION BY toYYYYMM(event_date_time), ORDER BY (event_type, event_date_time, event_id)",
        "loaded_by": "process_outbox_events, replay_outbox_events",
    },
)


class FreshnessCheckConfig(dg.Config):
    max_lag_seconds: float = Field(
        default=MAX_LAG_SECONDS,
        gt=0,
        description="Fail when the oldest event waiting for delivery is older than this (OUTBOX_FRESHNESS_MAX_LAG_SECONDS).",
    )


@dg.asset_check(
    asset=event_log.key,
    name="freshness",
    description="The oldest event waiting in the outbox is younger than the threshold: ClickHouse is up to date.",
)
def event_log_freshness(config: FreshnessCheckConfig, outbox: OutboxDatabaseResource) -> dg.AssetCheckResult:
    with outbox.short_lived_store() as store:
        counts = store.counts()
    lag = counts.oldest_pending_age_seconds or 0.0
    passed = lag <= config.max_lag_seconds
    return dg.AssetCheckResult(
        passed=passed,
        # Late data is a warning; wrong data (duplicates) is an error.
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"oldest pending event is {lag:.0f} s old (limit {config.max_lag_seconds:.0f} s)"
            if counts.pending
            else "no event is waiting"
        ),
        metadata={
            "oldest_pending_age_seconds": dg.MetadataValue.float(round(lag, 3)),
            "max_lag_seconds": dg.MetadataValue.float(config.max_lag_seconds),
            "queue_size": dg.MetadataValue.int(counts.pending),
            "failed_events": dg.MetadataValue.int(counts.failed),
        },
    )


@dg.asset_check(
    asset=event_log.key,
    name="no_duplicates",
    description="Every event_id appears once: count() == uniqExact(event_id), read without FINAL.",
)
def event_log_no_duplicates(clickhouse: ClickHouseResource) -> dg.AssetCheckResult:
    rows, distinct = clickhouse.store().counts()
    return dg.AssetCheckResult(
        passed=rows == distinct,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{rows} rows, {distinct} distinct event_ids",
        metadata={
            "rows": dg.MetadataValue.int(rows),
            "distinct_event_ids": dg.MetadataValue.int(distinct),
            "duplicate_rows": dg.MetadataValue.int(rows - distinct),
        },
    )


EVENT_LOG_CHECKS = [event_log_freshness, event_log_no_duplicates]
