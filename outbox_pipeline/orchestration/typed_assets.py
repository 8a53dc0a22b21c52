"""The typed tables of a relay's registered event classes as Dagster assets, downstream of its table.

Like the relay's table, a typed table is an external asset: ClickHouse fills it
inside the relay's own inserts (a materialized view), so no asset function builds
it; the lineage shows where its rows come from. Each has two checks:

* ``parses``: the events of its type in the relay's table that do not parse into
  the class's columns (schema drift), with one example event_id;
* ``matches_event_log``: every event that parses is in the typed table, once.
"""

import dagster as dg

from outbox_pipeline.orchestration.check_outcome import CheckOutcome
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.run_limits import clickhouse_pool
from outbox_pipeline.stores.typed_columns import TypedTable
from outbox_pipeline.stores.typed_tables import ParseCounts

PARSES_CHECK = "parses"
MATCHES_CHECK = "matches_event_log"


def typed_table_specs(instance: RelayInstance) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            key=instance.typed_asset_key(table),
            deps=[instance.asset_key],
            description=(
                f"The {table.event_type} events of {instance.table} with a column per field of {table.class_name}, "
                f"filled by the materialized view {table.view_name} as the relay inserts (ReplacingMergeTree, "
                "ORDER BY (event_date_time, event_id))."
            ),
            group_name="typed_events" if instance.is_default else f"{instance.name}_typed_events",
            kinds={"clickhouse"},
            metadata={
                "table": table.name,
                "event_type": table.event_type,
                "event_class": table.class_name,
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(name, clickhouse_type) for name, clickhouse_type in table.all_columns]
                ),
            },
        )
        for table in instance.typed_tables
    ]


def parse_outcome(counts: ParseCounts) -> CheckOutcome:
    described = f"{counts.failures} of {counts.source_rows} {counts.event_type} events do not parse into {counts.table}"
    metadata = {
        "events": dg.MetadataValue.int(counts.source_rows),
        "parse_failures": dg.MetadataValue.int(counts.failures),
    }
    if counts.example_event_id:
        described += (
            f", for example event_id {counts.example_event_id}: compare its event_context with the class, "
            "then fix the producer or register the changed class under a new event_type"
        )
        metadata["example_event_id"] = dg.MetadataValue.text(counts.example_event_id)
    # The events are safe in the relay's table; only their typed copy is missing.
    return CheckOutcome(passed=counts.failures == 0, severity=dg.AssetCheckSeverity.WARN, description=described, metadata=metadata)


def matches_outcome(counts: ParseCounts) -> CheckOutcome:
    duplicates = counts.typed_rows - counts.typed_distinct
    described = f"{counts.typed_rows} rows, {counts.typed_distinct} distinct event_ids; {counts.missing} parsing events missing"
    if counts.missing or duplicates:
        described += ": replay the days concerned (replay_outbox_events refreshes their typed tables)"
    return CheckOutcome(
        passed=counts.missing == 0 and duplicates == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        description=described,
        metadata={
            "rows": dg.MetadataValue.int(counts.typed_rows),
            "distinct_event_ids": dg.MetadataValue.int(counts.typed_distinct),
            "duplicate_rows": dg.MetadataValue.int(duplicates),
            "missing_events": dg.MetadataValue.int(counts.missing),
        },
    )


def build_typed_table_checks(instance: RelayInstance, clickhouse_key: str) -> list[dg.AssetChecksDefinition]:
    return [_checks(instance, table, clickhouse_key) for table in instance.typed_tables]


def _checks(instance: RelayInstance, table: TypedTable, clickhouse_key: str) -> dg.AssetChecksDefinition:
    key = instance.typed_asset_key(table)

    @dg.multi_asset_check(
        name=f"check_{key.to_python_identifier()}",
        specs=[
            dg.AssetCheckSpec(
                PARSES_CHECK, asset=key,
                description=f"Every {table.event_type} event in {instance.table} parses into the columns of {table.class_name}.",
            ),
            dg.AssetCheckSpec(
                MATCHES_CHECK, asset=key,
                description=f"Every parsing {table.event_type} event of {instance.table} is in {table.name}, once (count() without FINAL).",
            ),
        ],
        required_resource_keys={clickhouse_key},
        pool=clickhouse_pool(instance.uses_chdb),
    )
    def typed_checks(context: dg.AssetCheckExecutionContext):
        counts = getattr(context.resources, clickhouse_key).store().typed.parse_counts(table)
        for name, outcome in ((PARSES_CHECK, parse_outcome(counts)), (MATCHES_CHECK, matches_outcome(counts))):
            yield dg.AssetCheckResult(
                asset_key=key, check_name=name, passed=outcome.passed, severity=outcome.severity,
                description=outcome.description, metadata=outcome.metadata,
            )

    return typed_checks
