"""Schedules of one relay: the relay on a fixed cadence and daily retention.

The asset checks and the pruning of Dagster's runs have one schedule for the whole code
location (fleet_defs.py): a run per tick, not a run per relay.

The relay schedule is the alternative to the pending-work sensor for teams that
prefer a fixed cadence: stopped unless OUTBOX_SCHEDULE_ENABLED=true, cron from
OUTBOX_SCHEDULE_CRON. Both skip a tick while a relay run is queued or running.
The cron expressions were validated with the rest of the settings.
"""

import dagster as dg

from outbox_pipeline.orchestration.jobs import RelayJobs, relay_run_tags
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.sensors import active_relay_run


def build_schedules(instance: RelayInstance, jobs: RelayJobs) -> list[dg.ScheduleDefinition]:
    settings = instance.settings
    relay_job_names = tuple(job.name for job in jobs.relay_jobs)
    tags = relay_run_tags(instance)

    @dg.schedule(
        name=instance.named("process_outbox_events_schedule"),
        job=jobs.process,
        cron_schedule=settings.schedule_cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING if settings.schedule_enabled else dg.DefaultScheduleStatus.STOPPED,
        description="Runs the relay on a fixed cadence (OUTBOX_SCHEDULE_CRON), skipping while a relay run is active.",
    )
    def process_outbox_events_schedule(context: dg.ScheduleEvaluationContext):
        active = active_relay_run(context.instance, relay_job_names)
        if active is not None:
            return dg.SkipReason(f"relay run {active.dagster_run.run_id} is {active.dagster_run.status.value}")
        return dg.RunRequest(tags=tags)

    cleanup = dg.ScheduleDefinition(
        name=instance.named("cleanup_outbox_schedule"),
        job=jobs.cleanup,
        cron_schedule=settings.cleanup_cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Daily retention: deletes processed events older than OUTBOX_RETENTION_DAYS (OUTBOX_CLEANUP_CRON).",
    )
    return [process_outbox_events_schedule, cleanup]
