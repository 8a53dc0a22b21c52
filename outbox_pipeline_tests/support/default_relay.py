"""The default relay's definitions as the code location builds them, by name."""

from outbox_pipeline.definitions import defs
from outbox_pipeline.orchestration.jobs import RELAY_TAG

process_outbox_events = defs.resolve_job_def("process_outbox_events")
follow_outbox_fleet = defs.resolve_job_def("follow_outbox_fleet")
relay_low_latency = defs.resolve_job_def("relay_low_latency")
requeue_failed_events = defs.resolve_job_def("requeue_failed_events")
replay_outbox_events = defs.resolve_job_def("replay_outbox_events")
cleanup_outbox = defs.resolve_job_def("cleanup_outbox")
check_event_log = defs.resolve_job_def("check_event_log")
outbox_pending_sensor = defs.resolve_sensor_def("outbox_pending_sensor")
outbox_lag_sensor = defs.resolve_sensor_def("outbox_lag_sensor")
sentry_run_failure_sensor = defs.resolve_sensor_def("sentry_run_failure_sensor")
process_outbox_events_schedule = defs.resolve_schedule_def("process_outbox_events_schedule")

__all__ = [
    "RELAY_TAG",
    "check_event_log",
    "cleanup_outbox",
    "follow_outbox_fleet",
    "outbox_lag_sensor",
    "outbox_pending_sensor",
    "process_outbox_events",
    "process_outbox_events_schedule",
    "relay_low_latency",
    "replay_outbox_events",
    "requeue_failed_events",
    "sentry_run_failure_sensor",
]


def lag_sensor_from_env():
    """The code location's lag sensor built from the environment as it is now (tests set variables first)."""
    from outbox_pipeline.config.settings import load_settings
    from outbox_pipeline.definitions import build_defs

    return build_defs(load_settings(), with_defs_folder=False).resolve_sensor_def("outbox_lag_sensor")


def run_failure_sensor_from_env():
    """The code location's run-failure sensor built from the environment as it is now."""
    from outbox_pipeline.config.settings import load_settings
    from outbox_pipeline.orchestration.run_failure_sensor import build_run_failure_sensor

    return build_run_failure_sensor(load_settings())


def pending_sensor_from_env():
    """The code location's pending-work sensor, built from the environment as it is now."""
    from outbox_pipeline.config.settings import load_settings
    from outbox_pipeline.definitions import build_defs

    return build_defs(load_settings(), with_defs_folder=False).resolve_sensor_def("outbox_pending_sensor")
