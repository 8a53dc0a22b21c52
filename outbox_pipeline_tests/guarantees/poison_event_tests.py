"""An event ClickHouse rejects is isolated from its batch, retried, failed with its error, and requeued once fixed.

ClickHouse (chDB) rejects the event for a reason an operator can fix: a CHECK
constraint on event_log. Nothing in the relay knows about it.
"""

import psycopg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.default_relay import requeue_failed_events
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

BATCH = 10_000
POISON_AT = 6_137


def clickhouse(url: str, statement: str) -> None:
    with event_log_store(url) as event_log:
        event_log.client.command(statement)


def publish_batch_with_one_poison_event(url: str) -> RawEvent:
    events = [RawEvent(event_type="test_event", context=f'{{"n": {n}}}') for n in range(BATCH)]
    events[POISON_AT] = poison = RawEvent(event_type="poison", context='{"n": "poison"}')
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return poison


def loaded(result) -> int:
    assert result.success, [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    return result.output_for_node("report_relay_run")["events_loaded"]


def failure_row(outbox, event_id) -> tuple:
    return outbox.conn.execute(
        "SELECT state, attempts, last_error FROM outbox_failure WHERE event_id = %s", (event_id,)
    ).fetchone()


def test_one_poison_event_in_10000_is_isolated_failed_with_its_error_and_requeued_after_the_fix(relay_env, outbox, monkeypatch):
    url, ch_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    monkeypatch.setenv("OUTBOX_MAX_EVENT_ATTEMPTS", "2")
    monkeypatch.setenv("OUTBOX_EVENT_RETRY_BASE_SECONDS", "0")  # a rejected event is due again at once
    clickhouse(ch_url, "ALTER TABLE event_log ADD CONSTRAINT no_poison CHECK event_type != 'poison'")
    poison = publish_batch_with_one_poison_event(url)

    # First run: one batch of 10,000, bisected down to the one event; 9,999 land.
    assert loaded(run_relay(run_config={"batch_size": BATCH})) == BATCH - 1
    state, attempts, error = failure_row(outbox, str(poison.event_id))
    assert (state, attempts) == ("retrying", 1)
    assert "no_poison" in error and "VIOLATED_CONSTRAINT" in error and "\n" not in error, error
    with event_log_store(ch_url) as event_log:
        assert event_log.counts() == (BATCH - 1, BATCH - 1)
        assert event_log.rows_for([str(poison.event_id)]) == []
    [(splits,)] = outbox.conn.execute("SELECT cardinality(split_points) FROM outbox_batch").fetchall()
    assert splits <= 14  # bisected: one split per halving of 10,000 down to one event, not one insert per event

    # Events published after it are not held back, while it is retried and then failed.
    publish_raw(url, 100, start=BATCH)
    assert loaded(run_relay()) == 100
    state, attempts, error = failure_row(outbox, str(poison.event_id))
    assert (state, attempts) == ("failed", 2)
    assert "no_poison" in error
    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (0, BATCH + 99, 1)
    publish_raw(url, 50, start=BATCH + 100)
    assert loaded(run_relay()) == 50

    # The cause is fixed; requeue the event by id, and the next run delivers it.
    clickhouse(ch_url, "ALTER TABLE event_log DROP CONSTRAINT no_poison")
    requeued = requeue_failed_events.execute_in_process(
        run_config={"ops": {"requeue_failed": {"config": {"event_ids": [str(poison.event_id)]}}}},
        resources=build_resources(),
    )
    assert requeued.success and requeued.output_for_node("requeue_failed") == 1
    assert loaded(run_relay()) == 1
    published = BATCH + 150
    with event_log_store(ch_url) as event_log:
        assert event_log.counts() == (published, published)
        assert [row["event_type"] for row in event_log.rows_for([str(poison.event_id)])] == ["poison"]
    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (0, published, 0)
    assert failure_row(outbox, str(poison.event_id)) is None


def test_a_batch_clickhouse_rejects_entirely_fails_the_run_and_leaves_every_event_pending(relay_env, outbox):
    url, ch_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    clickhouse(ch_url, "ALTER TABLE event_log ADD CONSTRAINT nothing_fits CHECK event_type = 'no such type'")
    publish_raw(url, 300)

    failed = run_relay(run_config={"batch_size": 300})

    assert not failed.success
    [failure] = failed.get_step_failure_events()
    error = failure.step_failure_data.error.cause
    assert error.cls_name == "TooManyRejectedEventsError"
    message = error.message.strip()
    assert "nothing_fits" in message and "every event is still pending" in message and "\n" not in message, message
    # No mass 'failed': nothing was recorded against the events, and they wait for the fix.
    assert outbox.conn.execute("SELECT count(*) FROM outbox_failure").fetchone()[0] == 0
    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (300, 0, 0)

    clickhouse(ch_url, "ALTER TABLE event_log DROP CONSTRAINT nothing_fits")
    assert loaded(run_relay()) == 300
    with event_log_store(ch_url) as event_log:
        assert event_log.counts() == (300, 300)
