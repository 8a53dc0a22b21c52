"""Configuration of the relay's Sentry Crons monitor."""

import pytest

from outbox_pipeline.config.settings import load_settings
from outbox_pipeline.monitoring.crons import CronMonitor


def cron_monitor_config(environ):
    return CronMonitor.from_settings(load_settings(environ)).monitor_config()


def cron_monitor_slug(environ, relay="default"):
    return CronMonitor.from_settings(load_settings(environ), relay).slug


def cron_interval_seconds(environ):
    return CronMonitor.from_settings(load_settings(environ)).interval_seconds


def test_defaults_are_a_ten_minute_interval():
    config = cron_monitor_config({})
    assert config["schedule"] == {"type": "interval", "value": 10, "unit": "minute"}
    assert (config["checkin_margin"], config["max_runtime"]) == (5, 30)
    assert (config["failure_issue_threshold"], config["recovery_threshold"]) == (2, 1)
    assert config["timezone"] == "UTC"
    assert cron_monitor_slug({}) == "outbox-relay"
    assert cron_interval_seconds({}) == 600


def test_crontab_schedule_and_slug_from_the_environment():
    environ = {"SENTRY_CRON_SCHEDULE": "*/5 * * * *", "SENTRY_CRON_MONITOR_SLUG": "relay-eu", "SENTRY_CRON_MAX_RUNTIME_MINUTES": "15"}
    config = cron_monitor_config(environ)
    assert config["schedule"] == {"type": "crontab", "value": "*/5 * * * *"}
    assert config["max_runtime"] == 15
    assert cron_monitor_slug(environ) == "relay-eu"
    assert cron_interval_seconds(environ) is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SENTRY_CRON_INTERVAL_MINUTES": "ten"}, "SENTRY_CRON_INTERVAL_MINUTES='ten': Input should be a valid integer"),
        ({"SENTRY_CRON_CHECKIN_MARGIN_MINUTES": "0"}, "SENTRY_CRON_CHECKIN_MARGIN_MINUTES='0': Input should be greater than or equal to 1"),
        ({"SENTRY_CRON_SCHEDULE": "every minute"}, "SENTRY_CRON_SCHEDULE='every minute' is not a cron expression of five fields"),
    ],
)
def test_bad_values_get_one_line(environ, message):
    with pytest.raises(ValueError, match=message):
        cron_monitor_config(environ)


def test_each_relay_has_a_monitor_of_its_own():
    assert cron_monitor_slug({}, "orders") == "outbox-relay-orders"
    assert cron_monitor_slug({"SENTRY_CRON_MONITOR_SLUG": "relay-eu"}, "orders") == "relay-eu-orders"
