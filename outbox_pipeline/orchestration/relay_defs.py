"""Everything one relay contributes to a code location: resources, jobs, sensors, schedules, its asset and checks."""

import functools

import dagster as dg

from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.monitoring.run_monitor import RELAY_JOB, RelayRunMonitor
from outbox_pipeline.orchestration.assets import build_event_log_checks, event_log_spec, resource_keys
from outbox_pipeline.orchestration.jobs import RELAY_TAG, build_jobs, pruned_job_names
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_JOB, member_resource_keys
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.resources import ClickHouseResource, OutboxDatabaseResource, RunHistoryResource
from outbox_pipeline.orchestration.schedules import build_schedules
from outbox_pipeline.orchestration.typed_assets import build_typed_table_checks, typed_table_specs


def build_resources(instance: RelayInstance) -> dict:
    """The relay's run resources: ``outbox``, ``clickhouse``, ``monitor`` and ``run_history``."""
    settings = instance.settings
    return {
        "outbox": OutboxDatabaseResource(
            url=instance.outbox_database_url,
            state_dir=str(settings.state_dir),
            relay_name=instance.name,
            event_types=list(instance.event_types),
            batch_size=settings.batch_size,
            max_batches_per_run=settings.max_batches_per_run,
            batches_per_step=settings.batches_per_step,
            max_seconds_per_run=settings.max_seconds_per_run,
            lease_seconds=settings.lease_seconds,
            retry_attempts=settings.transient_retry_attempts,
            retry_base_seconds=settings.transient_retry_base_seconds,
            max_event_attempts=settings.max_event_attempts,
            event_retry_base_seconds=settings.event_retry_base_seconds,
            retention_days=settings.retention_days,
            follow_seconds=settings.follow_seconds,
            follow_quiet_seconds=settings.follow_quiet_seconds,
            follow_interval_seconds=settings.follow_interval_seconds,
            materialization_window_seconds=settings.materialization_window_seconds,
            freshness_max_lag_seconds=settings.freshness_max_lag_seconds,
        ),
        "clickhouse": ClickHouseResource(
            url=instance.clickhouse_url, table=instance.table, asset_key=list(instance.asset_key.path),
            event_classes=list(instance.event_classes),
        ),
        "monitor": RelayRunMonitor.from_settings(settings, instance.name, instance.named(RELAY_JOB)),
        "run_history": RunHistoryResource(
            job_names=pruned_job_names(instance),
            asset_key=list(instance.asset_key.path),
            run_retention_hours=settings.run_retention_hours,
            failed_run_retention_days=settings.failed_run_retention_days,
        ),
    }


@functools.cache
def location_monitor(settings: RelaySettings) -> RelayRunMonitor:
    return RelayRunMonitor.from_settings(settings)


def build_relay_defs(instance: RelayInstance) -> dg.Definitions:
    resources = build_resources(instance)
    jobs = build_jobs(instance, resources)
    outbox_key, clickhouse_key = resource_keys(instance)
    location_resources = {
        outbox_key: resources["outbox"], clickhouse_key: resources["clickhouse"],
        instance.named("run_history"): resources["run_history"],
    }
    # Asset jobs (the checks) take the code location's resources, and their failure hook needs a
    # monitor: one object shared by every relay with these settings, so the definitions merge.
    location_resources["monitor"] = location_monitor(instance.settings)
    # The relay's Sentry reporting inside the fleet's run: its own transaction, check-ins and issues.
    location_resources[member_resource_keys(instance.name)[2]] = RelayRunMonitor.from_settings(
        instance.settings, instance.name, FLEET_JOB, fleet_member=True
    )
    return dg.Definitions(
        assets=[event_log_spec(instance), *typed_table_specs(instance)],
        asset_checks=[*build_event_log_checks(instance), *build_typed_table_checks(instance, clickhouse_key)],
        jobs=jobs.all(),
        schedules=build_schedules(instance, jobs),
        resources=location_resources,
    )


__all__ = ["RELAY_TAG", "build_relay_defs", "build_resources"]
