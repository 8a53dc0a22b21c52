"""The default relay's definitions as the code location builds them, by name."""

from outbox_pipeline.definitions import defs
from outbox_pipeline_tests.support.default_relay import RELAY_TAG

_repository = defs.get_repository_def()

process_outbox_events = defs.get_job_def("process_outbox_events")
relay_low_latency = defs.get_job_def("relay_low_latency")
requeue_failed_events = defs.get_job_def("requeue_failed_events")
replay_outbox_events = defs.get_job_def("replay_outbox_events")
cleanup_outbox = defs.get_job_def("cleanup_outbox")
check_event_log = defs.get_job_def("check_event_log")
outbox_pending_sensor = defs.get_sensor_def("outbox_pending_sensor")
outbox_lag_sensor = defs.get_sensor_def("outbox_lag_sensor")
sentry_run_failure_sensor = defs.get_sensor_def("sentry_run_failure_sensor")
process_outbox_events_schedule = defs.get_schedule_def("process_outbox_events_schedule")

__all__ = [
    "RELAY_TAG",
    "check_event_log",
    "cleanup_outbox",
    "outbox_lag_sensor",
    "outbox_pending_sensor",
    "process_outbox_events",
    "process_outbox_events_schedule",
    "relay_low_latency",
    "replay_outbox_events",
    "requeue_failed_events",
    "sentry_run_failure_sensor",
]
