"""A relay's ClickHouse table as a Dagster asset, and its checks.

The table is an external asset: no asset function builds it. A relay run records
a materialization of it for its backlog and, while it follows a stream, one per
time window, with the figures as numeric metadata (plotted on the asset page),
each followed by the evaluations of the asset's two checks, so the asset page
always shows their status against the latest materialization (see
relay_asset_events). A replay records a materialization too. The checks also run
in the relay's check job, on its schedule or from the asset page; there the
duplicate check reads the whole table. They reach the relay's stores through the
code location's resources named ``outbox`` / ``clickhouse`` (the default relay)
or ``outbox_<relay>`` / ``clickhouse_<relay>``.
"""


import dagster as dg
from pydantic import Field

from outbox_pipeline.orchestration.check_outcome import CheckOutcome
from outbox_pipeline.orchestration.completeness import COMPLETENESS_CHECK, check_completeness
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.run_limits import clickhouse_pool
from outbox_pipeline.stores.reporting import OutboxCounts

FRESHNESS_CHECK = "freshness"
DUPLICATES_CHECK = "no_duplicates"


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


def freshness_outcome(counts: OutboxCounts, max_lag: float) -> CheckOutcome:
    lag = counts.oldest_pending_age_seconds or 0.0
    return CheckOutcome(
        passed=lag <= max_lag,
        # Late data is a warning; wrong data (duplicates) is an error.
        severity=dg.AssetCheckSeverity.WARN,
        description=f"oldest pending event is {lag:.0f} s old (limit {max_lag:.0f} s)" if counts.pending else "no event is waiting",
        metadata={
            "oldest_pending_age_seconds": dg.MetadataValue.float(round(lag, 3)),
            "max_lag_seconds": dg.MetadataValue.float(max_lag),
            "queue_size": dg.MetadataValue.int(counts.pending),
            "failed_events": dg.MetadataValue.int(counts.failed),
        },
    )


def duplicates_outcome(rows: int, distinct: int, scope: str | None = None) -> CheckOutcome:
    """``scope``: None for the whole table, else which rows were counted (a relay run's window)."""
    described = f"{rows} rows, {distinct} distinct event_ids"
    metadata = {
        "rows": dg.MetadataValue.int(rows),
        "distinct_event_ids": dg.MetadataValue.int(distinct),
        "duplicate_rows": dg.MetadataValue.int(rows - distinct),
    }
    if scope is not None:
        described += f" among {scope}"
        metadata["scope"] = dg.MetadataValue.text(scope)
    return CheckOutcome(passed=rows == distinct, severity=dg.AssetCheckSeverity.ERROR, description=described, metadata=metadata)


def build_event_log_checks(instance: RelayInstance) -> list[dg.AssetChecksDefinition]:
    outbox_key, clickhouse_key = resource_keys(instance)
    default_max_lag = instance.settings.freshness_max_lag_seconds

    @dg.asset_check(
        asset=instance.asset_key,
        name=FRESHNESS_CHECK,
        description="The oldest event waiting in the outbox is younger than the threshold: ClickHouse is up to date.",
        required_resource_keys={outbox_key},
    )
    def freshness(context: dg.AssetCheckExecutionContext, config: FreshnessCheckConfig) -> dg.AssetCheckResult:
        with getattr(context.resources, outbox_key).short_lived_store() as store:
            counts = store.counts()
        return freshness_outcome(counts, config.max_lag_seconds or default_max_lag).result()

    @dg.asset_check(
        asset=instance.asset_key,
        name=DUPLICATES_CHECK,
        description=(
            "Every event_id appears once: count() == uniqExact(event_id), read without FINAL (here over the whole "
            "table; relay runs evaluate it over the events they loaded)."
        ),
        required_resource_keys={clickhouse_key},
        # Queues behind runs holding the embedded ClickHouse, also when run from the asset page.
        pool=clickhouse_pool(instance.uses_chdb),
    )
    def no_duplicates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        rows, distinct = getattr(context.resources, clickhouse_key).store().counts()
        return duplicates_outcome(rows, distinct).result()

    @dg.asset_check(
        asset=instance.asset_key,
        name=COMPLETENESS_CHECK,
        description=(
            "Every event the relay delivered is in ClickHouse: per day of event_date_time, the table holds at least as "
            "many distinct event_ids of the relay's types as PostgreSQL counts delivered events (a dropped partition, "
            "a mutation or a replica that lost rows shows as a day to replay). Covers the days the outbox still holds."
        ),
        required_resource_keys={outbox_key, clickhouse_key},
        pool=clickhouse_pool(instance.uses_chdb),
    )
    def complete(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return check_completeness(
            context.instance, dg.AssetCheckKey(instance.asset_key, COMPLETENESS_CHECK), getattr(context.resources, outbox_key),
            getattr(context.resources, clickhouse_key), instance.identity.like_patterns,
        ).result()

    return [freshness, no_duplicates, complete]
