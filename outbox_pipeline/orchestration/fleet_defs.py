"""What the code location's relays share: one job that follows every relay and the one sensor that starts it,
one lag sensor, and one check run and one prune run per tick for all of them.

A following run per relay would hold a run slot and a resident process per relay, and run
limits would make some relays wait behind the others for as long as a run follows. The
fleet's run follows them all in one process (see ``ops/fleet_ops.py``); each relay keeps
its own jobs for a one-off run, replays, requeue, retention and checks.
"""

import dagster as dg

from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.orchestration.hooks import sentry_on_failure
from outbox_pipeline.orchestration.lag_sensor import build_lag_sensor
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_JOB, build_follow_fleet_op
from outbox_pipeline.orchestration.ops.run_history_ops import build_prune_op
from outbox_pipeline.orchestration.relay_instance import DEFAULT_RELAY, definition_name
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.orchestration.run_limits import clickhouse_run_tags
from outbox_pipeline.orchestration.sensors import build_pending_sensor

# Every fleet run carries this tag, and no relay tag: the limits on relay runs never hold the fleet back.
FLEET_TAG = "outbox_pipeline/fleet"


def relay_names(relays: dg.Definitions) -> list[str]:
    """The relays of the definitions, the default one first: each brought its outbox as a code-location resource."""
    names = {resource.relay_name for resource in (relays.resources or {}).values() if isinstance(resource, OutboxDatabaseResource)}
    return sorted(names, key=lambda name: (name != DEFAULT_RELAY, name))


def build_fleet_defs(relays: dg.Definitions, settings: RelaySettings) -> dg.Definitions:
    names = relay_names(relays)
    resources = relays.resources or {}
    uses_chdb = any(
        isinstance(clickhouse := resources.get(definition_name("clickhouse", name)), ClickHouseResource) and clickhouse.is_embedded
        for name in names
    )
    follow_fleet = build_follow_fleet_op(names)

    @dg.job(
        name=FLEET_JOB,
        description=f"Relay every relay's events as they arrive, in one run and one process ({', '.join(names)}); "
        "started by outbox_pending_sensor, ends once no event arrived for OUTBOX_FOLLOW_QUIET_SECONDS or after "
        "OUTBOX_FOLLOW_SECONDS. Config follow_seconds: 0 drains what is pending and ends.",
        tags={FLEET_TAG: "true", **clickhouse_run_tags(uses_chdb)},
        executor_def=dg.in_process_executor,
        hooks={sentry_on_failure},
    )
    def follow_outbox_fleet():
        follow_fleet()

    low_latency_names = {definition_name("relay_low_latency", name) for name in names}
    low_latency_jobs = [job for job in relays.jobs or [] if isinstance(job, dg.JobDefinition) and job.name in low_latency_names]
    checks, prune = build_location_maintenance(relays, names, settings, uses_chdb)
    return dg.Definitions(
        jobs=[follow_outbox_fleet, checks.job, prune.job],
        schedules=[checks, prune],
        sensors=[build_pending_sensor(settings, names, follow_outbox_fleet, low_latency_jobs), build_lag_sensor(settings, names)],
    )


def build_location_maintenance(
    relays: dg.Definitions, names: list[str], settings: RelaySettings, uses_chdb: bool
) -> tuple[dg.ScheduleDefinition, dg.ScheduleDefinition]:
    """One run per tick for every relay's checks, and one for every relay's run history: not a run per relay."""
    asset_keys = [spec.key for spec in relays.assets or [] if isinstance(spec, dg.AssetSpec)]
    checks = dg.define_asset_job(
        name="check_all_event_logs",
        selection=dg.AssetSelection.checks_for_assets(*asset_keys),
        description=f"Run every relay's asset checks ({', '.join(names)}): freshness and duplicates.",
        executor_def=dg.in_process_executor,
        hooks={sentry_on_failure},
        tags=clickhouse_run_tags(uses_chdb),
    )
    prune_op = build_prune_op("prune_run_histories", [definition_name("run_history", name) for name in names])

    @dg.job(
        name="prune_all_dagster_runs",
        description="Every relay's retention of Dagster's own storage: hourly rollups of its asset's figures, then its runs "
        "past OUTBOX_RUN_RETENTION_HOURS (failed ones: OUTBOX_FAILED_RUN_RETENTION_DAYS) deleted with their event logs.",
        executor_def=dg.in_process_executor,
        hooks={sentry_on_failure},
    )
    def prune_all_dagster_runs():
        prune_op()

    return (
        dg.ScheduleDefinition(
            name="check_event_log_schedule", job=checks, cron_schedule=settings.check_cron, execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description="Runs every relay's freshness and duplicate checks in one run (OUTBOX_CHECK_CRON).",
        ),
        dg.ScheduleDefinition(
            name="prune_dagster_runs_schedule", job=prune_all_dagster_runs, cron_schedule=settings.prune_cron,
            execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING if settings.prune_enabled else dg.DefaultScheduleStatus.STOPPED,
            description="Hourly rollups of every relay's asset, then old runs deleted, in one run (OUTBOX_PRUNE_CRON).",
        ),
    )
