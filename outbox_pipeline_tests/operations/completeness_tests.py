"""The ``complete`` check: a delivered event missing from ClickHouse names its day, and the day's replay repairs it.

Between two full passes (one a day) a pass looks only at the days that can have changed: those of
the events delivered since, and those the last pass found incomplete.
"""

import datetime as dt

import dagster as dg

from outbox_pipeline.orchestration import completeness
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.operations.assets_tests import evaluations, run_checks
from outbox_pipeline_tests.operations.support import lose_rows, publish_on, publish_poison, run_replay, utc_today
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


def check(instance: dg.DagsterInstance) -> dg.AssetCheckEvaluation:
    result = run_checks(instance)
    assert result.success
    return evaluations(result)["complete"]


def test_rows_lost_in_clickhouse_fail_the_check_for_their_day_and_the_replay_repairs_it(relay_env, monkeypatch):
    url = relay_env["OUTBOX_DATABASE_URL"]
    yesterday = utc_today() - dt.timedelta(days=1)
    events = publish_on(url, yesterday, 120)
    publish_raw(url, 30)  # today
    publish_poison(url, yesterday)  # rejected: never delivered, so never expected in ClickHouse
    assert run_relay(run_config={"batch_size": 50}).success
    publish_raw(url, 5, start=30)  # pending: not delivered yet, not expected either

    with dg.instance_for_test() as instance:
        first = check(instance)
        assert first.passed, first.description
        assert (first.metadata["pass"].value, first.metadata["events_delivered"].value) == ("full", 150)

        with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
            lose_rows(event_log, [str(event.event_id) for event in events[:7]])
        monkeypatch.setattr(completeness, "FULL_PASS_SECONDS", 0.0)  # the day's full pass is due
        failed = check(instance)
        assert not failed.passed and failed.metadata["pass"].value == "full"
        assert f"7 delivered events missing from ClickHouse on {yesterday.isoformat()} (7)" in failed.description
        assert failed.metadata["days_missing_events"].value == yesterday.isoformat()
        monkeypatch.setattr(completeness, "FULL_PASS_SECONDS", 24 * 3600.0)

        # Later passes keep looking at the incomplete day until it is repaired, and at the days of new deliveries.
        publish_raw(url, 10, start=100)
        assert run_relay().success
        still = check(instance)
        assert not still.passed and still.metadata["pass"].value == "changed days"
        assert still.metadata["days_checked"].value == 2  # yesterday (incomplete) and today (delivered since)

        assert run_replay(yesterday).success
        repaired = check(instance)
        assert repaired.passed, repaired.description

        # With nothing delivered since and no day incomplete, a pass between two full ones reads no day at all.
        monkeypatch.setattr(completeness, "OVERLAP_SECONDS", 0.0)
        idle = check(instance)
        assert idle.passed and (idle.metadata["pass"].value, idle.metadata["days_checked"].value) == ("changed days", 0)
