"""cleanup_outbox on a real PostgreSQL outbox: what it deletes, what it keeps, in how many chunks."""

import datetime as dt

import psycopg

from outbox_pipeline_tests.operations.support import publish_on, publish_poison, run_cleanup, utc_today
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


def backdate(url: str, *, outbox_ids: tuple[int, int], days: int) -> None:
    """Age events (and the batches that finished them), as if written ``days`` ago."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE outbox SET created_at = created_at - make_interval(days => %s) WHERE id BETWEEN %s AND %s",
            (days, *outbox_ids),
        )
        conn.execute(
            "UPDATE outbox_batch SET done_at = done_at - make_interval(days => %s), claimed_at = claimed_at - make_interval(days => %s) "
            "WHERE state = 'done' AND kind = 'range' AND first_id >= %s AND last_id <= %s",
            (days, days, *outbox_ids),
        )


def outbox_ids(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM outbox ORDER BY id").fetchall()]


def test_cleanup_deletes_old_processed_events_in_chunks_and_keeps_the_rest(relay_env, outbox, monkeypatch):
    monkeypatch.setenv("OUTBOX_MAX_EVENT_ATTEMPTS", "1")
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_on(url, utc_today(), 25)  # ids 1-25: old and processed
    publish_poison(url, utc_today())  # id 26: old and failed
    publish_on(url, utc_today(), 10)  # ids 27-36: processed, recent
    assert run_relay(run_config={"batch_size": 25}).success
    publish_raw(url, 5)  # ids 37-41: old but still pending
    backdate(url, outbox_ids=(1, 26), days=40)
    backdate(url, outbox_ids=(37, 41), days=40)

    result = run_cleanup(retention_days=30, chunk_size=10)

    assert result.success
    summary = result.output_for_node("delete_old_outbox_events")
    assert (summary["events_deleted"], summary["chunks"], summary["batches_deleted"], summary["failed_kept"]) == (25, 3, 1, 1)
    assert outbox_ids(url) == list(range(26, 42))
    counts = outbox.counts()
    assert (counts.processed, counts.failed, counts.pending) == (10, 1, 5)
    again = run_cleanup(retention_days=30, chunk_size=10)
    assert again.output_for_node("delete_old_outbox_events")["events_deleted"] == 0


def test_cleanup_keeps_recent_events_and_events_a_run_has_claimed(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 30)
    assert run_relay(run_config={"batch_size": 10, "max_batches": 2}).success  # ids 1-20 processed
    handle = outbox.claim_next_batch(claimed_by="a-running-relay", batch_size=10, lease_seconds=300)  # ids 21-30 in flight
    assert handle is not None
    backdate(url, outbox_ids=(11, 30), days=40)

    result = run_cleanup(retention_days=30, chunk_size=1_000)

    assert result.output_for_node("delete_old_outbox_events")["events_deleted"] == 10  # ids 11-20
    assert outbox_ids(url) == list(range(1, 11)) + list(range(21, 31))
    assert outbox.counts().in_flight == 10


def test_cleanup_reports_its_counts_as_metadata(relay_env, outbox):
    result = run_cleanup()
    assert result.success
    [output] = [event for event in result.all_events if event.event_type_value == "STEP_OUTPUT"]
    metadata = output.step_output_data.metadata
    assert metadata["events_deleted"].value == 0
    assert metadata["retention_days"].value == 3
    assert (metadata["partitions_dropped"].value, metadata["partitions_kept"].value) == (0, {})
    assert {"batches_deleted", "chunks", "failed_kept", "cutoff", "duration_seconds"} <= set(metadata)


def test_cleanup_drops_a_delivered_day_and_keeps_the_day_a_relay_is_behind_on(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    delivered_day, behind_day = utc_today() - dt.timedelta(days=6), utc_today() - dt.timedelta(days=5)
    publish_raw(url, 30)
    assert run_relay(run_config={"batch_size": 30}).success  # ids 1-30 delivered
    publish_raw(url, 10)  # ids 31-40: the relay is behind on them
    with psycopg.connect(url) as conn:
        conn.execute("SELECT outbox_create_partitions(%s, %s)", (delivered_day, behind_day))
        for (first, last), day in (((1, 30), delivered_day), ((31, 40), behind_day)):
            conn.execute("UPDATE outbox SET created_at = %s WHERE id BETWEEN %s AND %s",
                         (dt.datetime.combine(day, dt.time(12), dt.UTC), first, last))

    result = run_cleanup()

    assert result.success
    summary = result.output_for_node("delete_old_outbox_events")
    assert summary["partitions_dropped"] == 1
    assert summary["partitions_kept"] == {f"outbox_p{behind_day:%Y%m%d}": "kept: events not yet delivered"}
    assert outbox_ids(url) == list(range(31, 41))
    assert outbox.counts().pending == 10
    # Caught up, the next run drops that day too.
    assert run_relay(run_config={"batch_size": 30}).success
    assert run_cleanup().output_for_node("delete_old_outbox_events")["partitions_dropped"] == 1
    assert outbox_ids(url) == []
