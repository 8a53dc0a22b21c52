"""Schedules: the relay on a fixed cadence, daily retention, and the event_log checks.

The relay schedule is the alternative to ``outbox_pending_sensor`` for teams that
prefer a fixed cadence: stopped unless OUTBOX_SCHEDULE_ENABLED=true, cron from
OUTBOX_SCHEDULE_CRON. Both skip a tick while a relay run is queued or running.
"""

import os

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string

from outbox_pipeline.errors import ConfigurationError
from outbox_pipeline.jobs import check_event_log, cleanup_outbox, process_outbox_events, relay_run_tags
from outbox_pipeline.sensors import active_relay_run
from outbox_pipeline.settings import RelaySettings

_settings = RelaySettings.from_env()


def cron_from(name: str, value: str) -> str:
    # The same validation Dagster applies, turned into a line that names the variable.
    if len(value.split()) != 5 or not is_valid_cron_string(value):
        raise ConfigurationError(f"{name}={value!r} is not a cron expression of five fields, such as '*/5 * * * *'")
    return value


RELAY_CRON = cron_from("OUTBOX_SCHEDULE_CRON", _settings.schedule_cron)
CLEANUP_CRON = cron_from("OUTBOX_CLEANUP_CRON", os.environ.get("OUTBOX_CLEANUP_CRON") or "30 3 * * *")
CHECK_CRON = cron_from("OUTBOX_CHECK_CRON", os.environ.get("OUTBOX_CHECK_CRON") or "*/15 * * * *")


@dg.schedule(
    name="process_outbox_events_schedule",
    job=process_outbox_events,
    cron_schedule=RELAY_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING if _settings.schedule_enabled else dg.DefaultScheduleStatus.STOPPED,
    description="Runs the relay on a fixed cadence (OUTBOX_SCHEDULE_CRON), skipping while a relay run is active.",
)
def process_outbox_events_schedule(context: dg.ScheduleEvaluationContext):
    active = active_relay_run(context.instance)
    if active is not None:
        return dg.SkipReason(f"relay run {active.dagster_run.run_id} is {active.dagster_run.status.value}")
    return dg.RunRequest(tags=relay_run_tags(_settings))


cleanup_outbox_schedule = dg.ScheduleDefinition(
    name="cleanup_outbox_schedule",
    job=cleanup_outbox,
    cron_schedule=CLEANUP_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily retention: deletes processed events older than OUTBOX_RETENTION_DAYS (OUTBOX_CLEANUP_CRON).",
)

check_event_log_schedule = dg.ScheduleDefinition(
    name="check_event_log_schedule",
    job=check_event_log,
    cron_schedule=CHECK_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Runs the event_log freshness and duplicate checks (OUTBOX_CHECK_CRON).",
)

SCHEDULES = [process_outbox_events_schedule, cleanup_outbox_schedule, check_event_log_schedule]
