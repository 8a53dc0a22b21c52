"""Each event of a registered class is in its typed table once, under the faults event_log survives.

``count()`` is read without FINAL, and merges of the typed tables are stopped where a copy
could hide in an unmerged part. The killed run is a real process killed with SIGKILL.
"""

import signal
import time

import pytest

from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.operations.support import lose_rows, run_replay, utc_today
from outbox_pipeline_tests.support.relay_runs import run_relay
from outbox_pipeline_tests.support.relay_worker import run_worker
from outbox_pipeline_tests.support.typed_events import TYPED_TABLES, expected_counts, publish_demo, typed_counts, typed_store

EVENTS = 3_000
BATCH = 1_000


@pytest.fixture
def short_lease_env(relay_env, monkeypatch):
    monkeypatch.setenv("OUTBOX_LEASE_SECONDS", "1")
    return {**relay_env, "OUTBOX_LEASE_SECONDS": "1"}


def wait_for_expired_leases(outbox: OutboxStore, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while outbox.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at >= now()").fetchone()[0]:
        assert time.monotonic() < deadline, "the dead run's leases never expired"
        time.sleep(0.2)


def stop_merges(url: str) -> None:
    store = typed_store(url)
    try:
        store.migrate()
        for table in TYPED_TABLES:
            store.client.command(f"SYSTEM STOP MERGES {table}")
    finally:
        store.close()


def test_a_run_killed_after_its_insert_then_a_new_run(short_lease_env, outbox):
    published = publish_demo(short_lease_env["OUTBOX_DATABASE_URL"], EVENTS)
    died = run_worker("job", "--kill-after", "insert", "--kill-at", "2", "--batch-size", str(BATCH), env=short_lease_env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    left = typed_counts(short_lease_env["CLICKHOUSE_URL"])
    assert sum(rows for rows, _ in left.values()) == 2 * BATCH  # two blocks landed in the typed tables, unmarked

    wait_for_expired_leases(outbox)
    assert run_relay(run_config={"batch_size": BATCH}).success

    assert typed_counts(short_lease_env["CLICKHOUSE_URL"]) == expected_counts(published)
    assert outbox.counts().processed == EVENTS


def test_a_block_stored_in_event_log_whose_typed_insert_failed_is_completed_by_the_retaken_batch(short_lease_env, outbox):
    url = short_lease_env["CLICKHOUSE_URL"]
    published = publish_demo(short_lease_env["OUTBOX_DATABASE_URL"], 600)
    stop_merges(url)
    store = typed_store(url)
    # order_paid refuses every row: ClickHouse stores the block in event_log, then fails pushing it to the view.
    store.client.command("ALTER TABLE order_paid ADD CONSTRAINT refuse CHECK order_id < 0")
    relay = Relay(OutboxStore.connect(short_lease_env["OUTBOX_DATABASE_URL"]), store, RelayPolicy(batch_size=1_000, lease_seconds=1), claimed_by="dead-run")
    handle = relay.claim()
    with pytest.raises(Exception, match="refuse"):
        store.insert_csv(relay.outbox.stream_block_csv(handle, 0, handle.row_count), deduplication_token=handle.deduplication_token(0, handle.row_count))
    assert store.counts() == (600, 600)
    assert store.client.command("SELECT count() FROM order_paid") == 0
    store.client.command("ALTER TABLE order_paid DROP CONSTRAINT refuse")
    relay.outbox.close()
    store.close()

    wait_for_expired_leases(outbox)
    # The retaken batch finds every event in event_log and sends none of them again; it refreshes the typed rows.
    assert run_relay(run_config={"batch_size": 1_000}).success

    assert typed_counts(url) == expected_counts(published)
    assert outbox.conn.execute("SELECT claim_count FROM outbox_batch").fetchall() == [(2,)]


def test_a_block_sent_again_under_its_token_adds_nothing(relay_env, outbox):
    url = relay_env["CLICKHOUSE_URL"]
    published = publish_demo(relay_env["OUTBOX_DATABASE_URL"], 500)
    stop_merges(url)
    store = typed_store(url)
    relay = Relay(OutboxStore.connect(relay_env["OUTBOX_DATABASE_URL"]), store, RelayPolicy(batch_size=1_000), claimed_by="test")
    handle = relay.claim()
    token = handle.deduplication_token(0, handle.row_count)
    for _ in range(3):
        store.insert_csv(relay.outbox.stream_block_csv(handle, 0, handle.row_count), deduplication_token=token)
    relay.outbox.close()
    store.close()

    assert typed_counts(url) == expected_counts(published)


def test_a_replay_of_a_day_refreshes_its_typed_tables(relay_env, outbox):
    url = relay_env["CLICKHOUSE_URL"]
    day = utc_today()
    published = publish_demo(relay_env["OUTBOX_DATABASE_URL"], 800, day=day)
    assert run_relay().success
    stop_merges(url)
    store = typed_store(url)
    # event_log loses a third of the day (its typed rows stay: the replay's inserts push copies of them),
    # and order_paid loses rows of its own that event_log keeps.
    lose_rows(store, published.event_ids[::3])
    store.client.command("DELETE FROM order_paid WHERE order_id % 2 = 0")
    store.close()

    result = run_replay(day)

    assert result.success
    assert typed_counts(url) == expected_counts(published)
    report = result.output_for_node("replay_outbox_day")
    assert report["inserted"] == len(published.event_ids[::3])
    assert report["typed_inserted"] > 0 and report["typed_duplicates_removed"] > 0
