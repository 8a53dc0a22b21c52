"""Configuration of the relay's Sentry Crons monitor."""

import pytest

from outbox_pipeline.monitoring.crons import cron_interval_seconds, cron_monitor_config, cron_monitor_slug


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
        ({"SENTRY_CRON_INTERVAL_MINUTES": "ten"}, "SENTRY_CRON_INTERVAL_MINUTES='ten' is not a whole number"),
        ({"SENTRY_CRON_CHECKIN_MARGIN_MINUTES": "0"}, "must be at least 1"),
        ({"SENTRY_CRON_SCHEDULE": "every minute"}, "is not a 5-field crontab expression"),
    ],
)
def test_bad_values_get_one_line(environ, message):
    with pytest.raises(ValueError, match=message):
        cron_monitor_config(environ)
