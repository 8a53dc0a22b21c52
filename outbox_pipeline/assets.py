"""A relay's ClickHouse table as a Dagster asset, and its checks.

The table is an external asset: no asset function builds it. The relay's
``report_relay_run`` op records a materialization of it after every run that
loaded events, with the run's figures as numeric metadata (plotted on the asset
page); a replay records one too. The checks run in the relay's check job, on its
schedule or from the asset page. They reach the relay's stores through the
code location's resources named ``outbox`` / ``clickhouse`` (the default relay)
or ``outbox_<relay>`` / ``clickhouse_<relay>``.
"""

import dagster as dg
from pydantic import Field

from outbox_pipeline.relay_instance import RelayInstance
from outbox_pipeline.run_limits import clickhouse_pool


def resource_keys(instance: RelayInstance) -> tuple[str, str]:
    """Code-location resource keys of the relay's outbox and ClickHouse (for sensors and checks)."""
    return instance.named("outbox"), instance.named("clickhouse")


def event_log_spec(instance: RelayInstance) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=instance.asset_key,
        description=(
            f"Domain events in the ClickHouse table {instance.table}, one row per event_id, loaded from the PostgreSQL "
            f"outbox by {instance.named('process_outbox_events')} (relay {instance.name}: {instance.described_event_types}) "
            f"and by {instance.named('replay_outbox_events')}."
        ),
        group_name="outbox",
        kinds={"clickhouse"},
        metadata={
            "table": instance.table,
            "relay": instance.name,
            "event_types": instance.described_event_types,
            "engine": "ReplacingMergeTree, PARTITION BY toYYYYMM(event_date_time), ORDER BY (event_type, event_date_time, event_id)",
        },
    )


class FreshnessCheckConfig(dg.Config):
    max_lag_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Fail when the oldest event waiting for delivery is older than this (unset: OUTBOX_FRESHNESS_MAX_LAG_SECONDS).",
    )


def build_event_log_checks(instance: RelayInstance) -> list[dg.AssetChecksDefinition]:
    outbox_key, clickhouse_key = resource_keys(instance)
    default_max_lag = instance.settings.freshness_max_lag_seconds

    @dg.asset_check(
        asset=instance.asset_key,
        name="freshness",
        description="The oldest event waiting in the outbox is younger than the threshold: ClickHouse is up to date.",
        required_resource_keys={outbox_key},
    )
    def freshness(context: dg.AssetCheckExecutionContext, config: FreshnessCheckConfig) -> dg.AssetCheckResult:
        max_lag = config.max_lag_seconds or default_max_lag
        with getattr(context.resources, outbox_key).short_lived_store() as store:
            counts = store.counts()
        lag = counts.oldest_pending_age_seconds or 0.0
        return dg.AssetCheckResult(
            passed=lag <= max_lag,
            # Late data is a warning; wrong data (duplicates) is an error.
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"oldest pending event is {lag:.0f} s old (limit {max_lag:.0f} s)" if counts.pending else "no event is waiting"
            ),
            metadata={
                "oldest_pending_age_seconds": dg.MetadataValue.float(round(lag, 3)),
                "max_lag_seconds": dg.MetadataValue.float(max_lag),
                "queue_size": dg.MetadataValue.int(counts.pending),
                "failed_events": dg.MetadataValue.int(counts.failed),
            },
        )

    @dg.asset_check(
        asset=instance.asset_key,
        name="no_duplicates",
        description="Every event_id appears once: count() == uniqExact(event_id), read without FINAL.",
        required_resource_keys={clickhouse_key},
        # Queues behind runs holding the embedded ClickHouse, also when run from the asset page.
        pool=clickhouse_pool(instance.uses_chdb),
    )
    def no_duplicates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        rows, distinct = getattr(context.resources, clickhouse_key).store().counts()
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

    return [freshness, no_duplicates]
