"""The code location: every asset, check, job, sensor, schedule and resource of the project."""

import logging
import os

import dagster as dg

from outbox_pipeline.assets import EVENT_LOG_CHECKS, event_log
from outbox_pipeline.jobs import (
    check_event_log,
    cleanup_outbox,
    process_outbox_events,
    relay_low_latency,
    replay_outbox_events,
    requeue_failed_events,
)
from outbox_pipeline.monitoring.run_monitor import RelayRunMonitor
from outbox_pipeline.monitoring.sensors import MONITORING_SENSORS
from outbox_pipeline.monitoring.sentry_setup import init_sentry
from outbox_pipeline.resources import ClickHouseResource, OutboxDatabaseResource
from outbox_pipeline.schedules import SCHEDULES
from outbox_pipeline.sensors import outbox_pending_sensor
from outbox_pipeline.settings import RelaySettings

# Sensors run in the code server: start Sentry there too (a no-op without a DSN). A bad
# Sentry setting must not keep the code location from loading.
try:
    init_sentry()
except ValueError as exc:
    logging.getLogger(__name__).warning(f"Sentry is off in the code server: {exc}")

_settings = RelaySettings.from_env()


def build_resources(settings: RelaySettings | None = None) -> dict:
    settings = settings or RelaySettings.from_env()
    # EnvVar keeps the URL (and its password) out of the UI; None selects the embedded server.
    return {
        "outbox": OutboxDatabaseResource(
            url=dg.EnvVar("OUTBOX_DATABASE_URL") if settings.outbox_database_url else None,
            state_dir=str(settings.state_dir),
        ),
        "clickhouse": ClickHouseResource(
            url=dg.EnvVar("CLICKHOUSE_URL") if os.environ.get("CLICKHOUSE_URL") else settings.clickhouse_url
        ),
        "monitor": RelayRunMonitor(),
    }


JOBS = [
    process_outbox_events,
    relay_low_latency,
    requeue_failed_events,
    replay_outbox_events,
    cleanup_outbox,
    check_event_log,
]
SENSORS = [outbox_pending_sensor, *MONITORING_SENSORS]

defs = dg.Definitions(
    assets=[event_log],
    asset_checks=EVENT_LOG_CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=build_resources(_settings),
    # Checks launched from the asset page run in one process too, like every job here.
    executor=dg.in_process_executor,
)
