"""The monitoring sensors, for the code location's ``defs``: ``sensors=[..., *MONITORING_SENSORS]``.

Both run in the code server, where definitions.py starts Sentry at import.
"""

from outbox_pipeline.monitoring.lag_sensor import outbox_lag_sensor
from outbox_pipeline.monitoring.run_failure_sensor import sentry_run_failure_sensor

MONITORING_SENSORS = [outbox_lag_sensor, sentry_run_failure_sensor]
