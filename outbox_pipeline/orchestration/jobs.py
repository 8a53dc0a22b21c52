"""The jobs of one relay. All run in-process: one process per run, ops in sequence.

In-process execution costs about 0.1 s of overhead per run against about 1 s
per step for the multiprocess executor, keeps one connection per store for the
whole run, and keeps the embedded ClickHouse directory in a single process.

The op graphs are defined once; each relay binds them to its own resources
(``resource_defs``) under its own names.
"""

import dataclasses

import dagster as dg

from outbox_pipeline.orchestration.hooks import sentry_on_failure
from outbox_pipeline.orchestration.ops.follow_ops import follow_outbox
from outbox_pipeline.orchestration.ops.low_latency_ops import relay_continuously
from outbox_pipeline.orchestration.ops.maintenance_ops import requeue_failed
from outbox_pipeline.orchestration.ops.relay_ops import extract_outbox_batches, load_batch, mark_batch_processed, report_relay_run
from outbox_pipeline.orchestration.ops.replay_ops import replay_outbox_day
from outbox_pipeline.orchestration.ops.retention_ops import delete_old_outbox_events
from outbox_pipeline.orchestration.ops.run_history_ops import build_prune_op
from outbox_pipeline.orchestration.relay_instance import RELAY_NAME_TAG, RelayInstance
from outbox_pipeline.orchestration.run_limits import clickhouse_run_tags

# Every relay run carries this tag; dagster.yaml limits how many run at once.
RELAY_TAG = "outbox_pipeline/relay"


def relay_run_tags(instance: RelayInstance) -> dict[str, str]:
    return {RELAY_TAG: "true", RELAY_NAME_TAG: instance.name, **clickhouse_run_tags(instance.uses_chdb)}


@dg.graph(
    description="Move pending outbox events into ClickHouse: claim batches, load each, mark each processed; "
    "then keep relaying new events while a steady stream lasts (follow_outbox)."
)
def relay_graph():
    claimed = extract_outbox_batches()
    marked = claimed.map(lambda batch: mark_batch_processed(load_batch(batch)))
    follow_outbox(report_relay_run(marked.collect()))


@dg.graph(description="Put failed events back in line (config: event_ids, event_type or all_failed); the next relay run delivers them.")
def requeue_graph():
    requeue_failed()


@dg.graph(description="Load one day of delivered events (by event_date_time) into ClickHouse again, inserting only what is missing.")
def replay_graph():
    replay_outbox_day()


@dg.graph(description="Delete processed outbox events older than OUTBOX_RETENTION_DAYS in short chunks; failed events are kept.")
def cleanup_graph():
    delete_old_outbox_events()


@dg.graph(
    description="Retention of Dagster's own storage: hourly rollups of the asset's figures, then the relay's runs past "
    "OUTBOX_RUN_RETENTION_HOURS (failed ones: OUTBOX_FAILED_RUN_RETENTION_DAYS) deleted with their event logs."
)
def prune_graph():
    build_prune_op("prune_run_history", ["run_history"])()


@dg.graph(description="Low-latency mode: one long run that relays on every producer commit (LISTEN/NOTIFY), then ends.")
def low_latency_graph():
    relay_continuously()


@dataclasses.dataclass(frozen=True)
class RelayJobs:
    process: dg.JobDefinition
    low_latency: dg.JobDefinition
    requeue: dg.JobDefinition
    replay: dg.JobDefinition
    cleanup: dg.JobDefinition
    prune: dg.JobDefinition
    check: object  # an asset job, resolved when the code location loads

    @property
    def relay_jobs(self) -> tuple[dg.JobDefinition, dg.JobDefinition]:
        """The jobs that claim and load batches."""
        return (self.process, self.low_latency)

    def all(self) -> list:
        return [self.process, self.low_latency, self.requeue, self.replay, self.cleanup, self.prune, self.check]


def replay_partitions(instance: RelayInstance) -> dg.DailyPartitionsDefinition:
    """One partition per UTC day of event_date_time, from OUTBOX_REPLAY_START_DATE through today."""
    # end_offset=1: today's partition exists too, for a replay of the day so far.
    return dg.DailyPartitionsDefinition(
        start_date=instance.settings.replay_start_date.isoformat(), timezone="UTC", end_offset=1
    )


# The code location's jobs that run often (fleet_defs.py), pruned with the default relay's.
LOCATION_JOBS = ("follow_outbox_fleet", "check_all_event_logs", "prune_all_dagster_runs")


def pruned_job_names(instance: RelayInstance) -> list[str]:
    """The relay's jobs that run often, whose old runs the prune jobs delete."""
    names = [instance.named(base) for base in ("process_outbox_events", "relay_low_latency", "check_event_log", "prune_dagster_runs")]
    return [*names, *LOCATION_JOBS] if instance.is_default else names


def build_jobs(instance: RelayInstance, resources: dict) -> RelayJobs:
    """The relay's jobs, bound to its resources (``outbox``, ``clickhouse``, ``monitor``)."""
    common = {"executor_def": dg.in_process_executor, "hooks": {sentry_on_failure}, "resource_defs": resources}
    which = f" (relay {instance.name}: {instance.described_event_types} into {instance.table})"
    return RelayJobs(
        process=relay_graph.to_job(
            name=instance.named("process_outbox_events"),
            description=relay_graph.description + which,
            tags=relay_run_tags(instance),
            **common,
        ),
        low_latency=low_latency_graph.to_job(
            name=instance.named("relay_low_latency"),
            description=low_latency_graph.description + which,
            tags=relay_run_tags(instance),
            **common,
        ),
        requeue=requeue_graph.to_job(
            name=instance.named("requeue_failed_events"), description=requeue_graph.description + which, **common
        ),
        replay=replay_graph.to_job(
            name=instance.named("replay_outbox_events"),
            description=replay_graph.description + which,
            tags=clickhouse_run_tags(instance.uses_chdb),
            partitions_def=replay_partitions(instance),
            **common,
        ),
        cleanup=cleanup_graph.to_job(
            name=instance.named("cleanup_outbox"),
            description=cleanup_graph.description + which,
            **common,
        ),
        prune=prune_graph.to_job(
            name=instance.named("prune_dagster_runs"), description=prune_graph.description + which, **common
        ),
        check=dg.define_asset_job(
            name=instance.named("check_event_log"),
            selection=dg.AssetSelection.checks_for_assets(instance.asset_key, *map(instance.typed_asset_key, instance.typed_tables)),
            description=(
                "Run the asset's checks: freshness (lag of the oldest pending event) and duplicates, and those of its typed tables"
                + which + "."
            ),
            executor_def=dg.in_process_executor,
            hooks={sentry_on_failure},
            tags=clickhouse_run_tags(instance.uses_chdb),
        ),
    )
