"""The lag sensor: once per incident and level, then a recovery, all through the real transport.

Ticks are evaluated directly (``dg.build_sensor_context``), carrying the
cursor from one tick to the next as the daemon does.
"""

import json

import dagster as dg
import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import load_settings
from outbox_pipeline.orchestration.lag_sensor import LagState, LagThresholds, evaluate_lag
from outbox_pipeline.orchestration.resources import OutboxDatabaseResource
from outbox_pipeline.stores.outbox_store import OutboxCounts
from outbox_pipeline_tests.monitoring.envelopes import ENVIRONMENT, check_ins, errors, metrics_named
from outbox_pipeline_tests.support.default_relay import lag_sensor_from_env
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


class Ticks:
    """Evaluates the sensor tick after tick with the cursor of the previous tick."""

    def __init__(self, url: str):
        self.instance = dg.DagsterInstance.ephemeral()
        self.outbox = OutboxDatabaseResource(url=url)
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"outbox": self.outbox}
        ) as context:
            result = lag_sensor_from_env()(context)
        if isinstance(result, dg.SensorResult):  # a plain SkipReason leaves the cursor as it was
            self.cursor = result.cursor
        return result


def test_lag_alert_fires_once_per_level_then_reports_recovery(relay_env, outbox, recorder, monkeypatch):
    monkeypatch.setenv("OUTBOX_QUEUE_WARNING_SIZE", "5")
    monkeypatch.setenv("OUTBOX_QUEUE_ERROR_SIZE", "20")
    url = relay_env["OUTBOX_DATABASE_URL"]
    ticks = Ticks(url)

    publish_raw(url, 3)
    assert "lag ok" in ticks.tick().skip_reason.skip_message
    assert errors(recorder) == []

    publish_raw(url, 5, start=3)  # 8 pending: warning
    ticks.tick()
    ticks.tick()
    [warning] = errors(recorder)
    assert warning["level"] == "warning"
    assert warning["fingerprint"] == ["outbox-lag"]
    assert warning["tags"]["outbox.lag_level"] == "warning"
    assert warning["tags"]["outbox.lag_cause"] == "queue_size"
    assert warning["contexts"]["outbox"]["pending"] == 8
    assert warning["environment"] == ENVIRONMENT
    incident = warning["tags"]["outbox.incident"]

    publish_raw(url, 20, start=8)  # 28 pending: error, same incident
    ticks.tick()
    ticks.tick()
    [_, error] = errors(recorder)
    assert error["level"] == "error"
    assert error["fingerprint"] == ["outbox-lag"]
    assert error["tags"]["outbox.incident"] == incident

    assert run_relay().success  # the relay catches up
    result = ticks.tick()
    ticks.tick()
    [_, _, recovered] = errors(recorder)
    assert recovered["level"] == "info"
    assert recovered["fingerprint"] == ["outbox-lag-recovered"]
    assert recovered["tags"]["outbox.incident"] == incident
    assert recovered["tags"]["outbox.lag_peak"] == "error"
    assert json.loads(result.cursor)["default"]["incident"] is None

    # Empty outbox: one heartbeat for the relay's cron monitor, not one per tick.
    [heartbeat] = [c for c in check_ins(recorder) if c["status"] == "ok" and "monitor_config" in c]
    assert heartbeat["monitor_slug"] == "outbox-relay"
    assert len(check_ins(recorder)) == 3  # the relay run's own in_progress/ok, and the heartbeat

    gauges = metrics_named(recorder, "outbox.queue_size")
    from_sensor = [g["value"] for g in gauges if g["attributes"].get("source") == "outbox_lag_sensor"]
    assert from_sensor == [3, 8, 8, 28, 28, 0, 0]
    assert all(g["attributes"]["job"] == "process_outbox_events" for g in gauges)
    assert all(g["attributes"]["environment"] == ENVIRONMENT for g in gauges)


def test_age_of_the_oldest_pending_event_raises_the_alert(relay_env, outbox, recorder, monkeypatch):
    monkeypatch.setenv("OUTBOX_LAG_WARNING_SECONDS", "0.001")  # any pending event is late
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 1)

    Ticks(relay_env["OUTBOX_DATABASE_URL"]).tick()

    [warning] = errors(recorder)
    assert warning["tags"]["outbox.lag_cause"] == "age"


def test_unreachable_outbox_skips_and_keeps_the_incident(relay_env, recorder):
    ticks = Ticks("postgresql://nobody@127.0.0.1:1/none")
    ticks.cursor = LagState(level="warning", peak="warning", incident="abc", started_at=1.0).to_cursor()
    cursor = ticks.cursor
    result = ticks.tick()
    assert "outbox unavailable" in result.skip_message
    assert ticks.cursor == cursor
    assert errors(recorder) == []


def counts(pending: int, age: float | None = None) -> OutboxCounts:
    return OutboxCounts(pending=pending, in_flight=0, processed=0, retrying=0, failed=0, oldest_pending_age_seconds=age)


def test_levels_and_transitions_without_io():
    thresholds = LagThresholds(warning_seconds=60, error_seconds=600, queue_warning_size=10, queue_error_size=100)
    assert thresholds.level(counts(0)) == ("ok", [])
    assert thresholds.level(counts(10, 1)) == ("warning", ["queue_size"])
    assert thresholds.level(counts(1, 600)) == ("error", ["age"])
    assert thresholds.level(counts(100, 600)) == ("error", ["age", "queue_size"])

    state, reports = evaluate_lag(LagState(), "warning", ["age"], now=100)
    assert [r.kind for r in reports] == ["warning"]
    state, reports = evaluate_lag(state, "error", ["age"], now=110)
    assert [r.kind for r in reports] == ["error"]
    state, reports = evaluate_lag(state, "warning", ["age"], now=120)
    assert reports == []  # back down within the incident: nothing new
    state, reports = evaluate_lag(state, "error", ["age"], now=130)
    assert reports == []  # the error of this incident was reported already
    state, reports = evaluate_lag(state, "ok", [], now=160)
    assert [(r.kind, r.peak, r.incident_seconds) for r in reports] == [("recovered", "error", 60)]
    assert state.incident is None


def test_unreadable_cursor_starts_over():
    assert LagState.from_cursor("not json") == LagState()
    assert LagState.from_cursor('{"level": "purple"}') == LagState()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OUTBOX_LAG_WARNING_SECONDS": "soon"}, "OUTBOX_LAG_WARNING_SECONDS='soon': Input should be a valid number"),
        ({"OUTBOX_QUEUE_ERROR_SIZE": "0"}, "OUTBOX_QUEUE_ERROR_SIZE=.0.: Input should be greater than 0"),
        ({"OUTBOX_LAG_WARNING_SECONDS": "600", "OUTBOX_LAG_ERROR_SECONDS": "60"}, "must not be below"),
    ],
)
def test_bad_thresholds_get_one_line(environ, message):
    with pytest.raises(ConfigurationError, match=message):
        load_settings(environ)
