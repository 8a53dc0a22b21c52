"""The ``complete`` check: a delivered event missing from ClickHouse names its day, and the day's replay repairs it."""

import datetime as dt

from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.operations.assets_tests import evaluations, run_checks
from outbox_pipeline_tests.operations.support import lose_rows, publish_on, publish_poison, run_replay, utc_today
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


def test_rows_lost_in_clickhouse_fail_the_check_for_their_day_and_the_replay_repairs_it(relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    yesterday = utc_today() - dt.timedelta(days=1)
    events = publish_on(url, yesterday, 120)
    publish_raw(url, 30)  # today
    publish_poison(url, yesterday)  # rejected: never delivered, so never expected in ClickHouse
    assert run_relay(run_config={"batch_size": 50}).success
    publish_raw(url, 5, start=30)  # pending: not delivered yet, not expected either

    complete = evaluations(run_checks())["complete"]
    assert complete.passed, complete.description
    assert complete.metadata["events_delivered"].value == 150

    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        lose_rows(event_log, [str(event.event_id) for event in events[:7]])
    failed = evaluations(run_checks())["complete"]
    assert not failed.passed
    assert f"7 delivered events missing from ClickHouse on {yesterday.isoformat()} (7)" in failed.description
    assert failed.metadata["days_missing_events"].value == yesterday.isoformat()

    assert run_replay(yesterday).success
    repaired = evaluations(run_checks())["complete"]
    assert repaired.passed, repaired.description
