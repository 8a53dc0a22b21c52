"""The store's bookkeeping for several relays on one outbox: filters, counts, views, failures, retention."""

from __future__ import annotations

import datetime as dt
import time

import psycopg
import pytest

from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.stores import reporting
from outbox_pipeline.stores.outbox_store import OutboxStore, RejectedEvent
from outbox_pipeline.stores.relay_identity import RelayIdentity

ORDERS = RelayIdentity("orders", ("order_*",))
LEASE = 60


def publish(url: str, *event_types: str) -> list[RawEvent]:
    events = [RawEvent(event_type=event_type, context="{}") for event_type in event_types]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def deliver(store: OutboxStore, batch_size: int = 1_000, rejected: int = 0) -> None:
    """Claim and mark everything pending, rejecting the first ``rejected`` events of the first batch."""
    while (handle := store.claim_next_batch(claimed_by="t", batch_size=batch_size, lease_seconds=LEASE)) is not None:
        ids = store.read_block_identities(handle, 0, rejected)
        assert store.complete_batch(
            handle, [RejectedEvent(i, outbox_id, event_id, "rejected") for i, (outbox_id, event_id) in enumerate(ids)],
            max_attempts=1, retry_base_seconds=0,
        )
        rejected = 0


@pytest.fixture
def orders(relay_env):
    store = OutboxStore.connect(relay_env["OUTBOX_DATABASE_URL"], relay=ORDERS)
    yield store
    store.close()


def test_a_filtered_relay_claims_reads_and_counts_only_its_event_types(relay_env, outbox, orders):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish(url, "order_paid", "user_created", "order%paid", "orderXpaid", "order_shipped", "user_created")
    assert (orders.counts().pending, outbox.counts().pending) == (2, 6)
    assert orders.has_pending_work()

    handle = orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)

    assert (handle.relay, handle.row_count) == ("orders", 2)
    rows = orders.read_block_csv(handle, 0, handle.row_count).decode().splitlines()
    assert [row.split(",")[1] for row in rows] == ['"order_paid"', '"order_shipped"']
    assert orders.counts().in_flight == 2 and outbox.counts().in_flight == 0
    assert orders.complete_batch(handle, [], max_attempts=3, retry_base_seconds=1)
    assert orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE) is None
    assert not orders.has_pending_work()
    counts = orders.counts()
    assert (counts.pending, counts.processed) == (0, 2)
    assert outbox.counts().pending == 6  # the default relay has not moved


def test_deduplication_tokens_keep_the_default_format_and_name_other_relays(relay_env, outbox, orders):
    publish(relay_env["OUTBOX_DATABASE_URL"], "order_paid")
    default_handle = outbox.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    orders_handle = orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    installation = outbox.installation_id
    assert orders.installation_id == installation  # one per outbox database, whatever the relay
    assert default_handle.deduplication_token(0, 1) == f"outbox-{installation}-range-{default_handle.batch_id}-0-1"
    assert orders_handle.deduplication_token(0, 1) == f"outbox-{installation}-orders-range-{orders_handle.batch_id}-0-1"


def test_failures_and_requeues_belong_to_one_relay(relay_env, outbox, orders):
    url = relay_env["OUTBOX_DATABASE_URL"]
    [event] = publish(url, "order_paid")
    deliver(outbox, rejected=1)  # failed for the default relay only
    deliver(orders)
    assert (outbox.counts().failed, orders.counts().failed, orders.counts().processed) == (1, 0, 1)
    assert orders.requeue_failed(event_ids=[str(event.event_id)]) == 0
    assert outbox.requeue_failed(event_ids=[str(event.event_id)]) == 1
    retry = outbox.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    assert (retry.kind, retry.relay, retry.row_count) == ("retry", "default", 1)
    assert orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE) is None


def test_the_status_view_has_one_row_per_event_and_matching_relay(relay_env, outbox, orders):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish(url, "order_paid", "user_created")
    deliver(outbox)
    orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    publish(url, "order_shipped")
    rows = outbox.conn.execute(
        "SELECT relay, event_type, state FROM outbox_event_status ORDER BY relay, id"
    ).fetchall()
    assert rows == [
        ("default", "order_paid", "processed"),
        ("default", "user_created", "processed"),
        ("default", "order_shipped", "pending"),
        ("orders", "order_paid", "in_flight"),
        ("orders", "order_shipped", "pending"),
    ]


def backdate_everything(url: str, days: int = 40) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE outbox SET created_at = created_at - make_interval(days => %s)", (days,))


def remaining_types(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT event_type FROM outbox ORDER BY id").fetchall()]


def test_retention_deletes_an_event_only_once_every_relay_it_matches_has_delivered_it(relay_env, outbox, orders):
    url = relay_env["OUTBOX_DATABASE_URL"]
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    orders.check_schema()  # registers the relay, as its first sensor tick or run does
    publish(url, "order_paid", "user_created", "order_shipped", "user_deleted")
    deliver(outbox)
    backdate_everything(url)

    # The orders relay has delivered nothing yet: only the events it does not want may go.
    assert outbox.delete_processed_before(cutoff, chunk_size=100) == 2
    assert remaining_types(url) == ["order_paid", "order_shipped"]

    # The orders relay rejects order_paid (failed for good) and delivers order_shipped.
    deliver(orders, rejected=1)
    assert orders.delete_processed_before(cutoff, chunk_size=100) == 1
    assert remaining_types(url) == ["order_paid"]  # failed for the orders relay: kept

    # A batch still in flight for one relay keeps its events.
    publish(url, "order_refunded", "order_paid")
    deliver(outbox)
    in_flight = orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    backdate_everything(url)
    assert outbox.delete_processed_before(cutoff, chunk_size=100) == 0
    assert orders.complete_batch(in_flight, [], max_attempts=3, retry_base_seconds=1)
    assert outbox.delete_processed_before(cutoff, chunk_size=100) == 2
    assert remaining_types(url) == ["order_paid"]


def test_a_new_relay_starts_from_the_oldest_event_the_outbox_still_holds_and_holds_back_retention(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish(url, "order_paid", "user_created")
    deliver(outbox)
    late = OutboxStore.connect(url, relay=RelayIdentity("late_orders", ("order_*",)))
    assert late.counts().pending == 1  # registered on first use, with its cursor at the start
    backdate_everything(url)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert outbox.delete_processed_before(cutoff, chunk_size=100) == 1
    assert remaining_types(url) == ["order_paid"]
    # Retiring it lets retention go on.
    outbox.retire_relay("late_orders")
    assert outbox.delete_processed_before(cutoff, chunk_size=100) == 1
    late.close()


def test_a_relay_whose_filter_changed_keeps_the_filter_of_its_batches_in_flight(relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish(url, "order_paid", "user_created", "order_shipped")
    first = OutboxStore.connect(url, relay=ORDERS)
    handle = first.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=0.01)
    first_identities = first.read_block_identities(handle, 0, 10)
    assert len(first_identities) == 2
    first.close()
    widened = OutboxStore.connect(url, relay=RelayIdentity("orders", ("order_*", "user_*")))
    time.sleep(0.05)
    again = widened.claim_next_batch(claimed_by="t2", batch_size=10, lease_seconds=LEASE)
    assert (again.batch_id, again.row_count, again.claim_count) == (handle.batch_id, 2, 2)
    assert widened.read_block_identities(again, 0, 10) == first_identities
    assert again.deduplication_token(0, 2) == handle.deduplication_token(0, 2)
    # The wider filter applies to events after the relay's cursor only.
    assert widened.complete_batch(again, [], max_attempts=3, retry_base_seconds=1)
    publish(url, "user_deleted")
    assert widened.claim_next_batch(claimed_by="t2", batch_size=10, lease_seconds=LEASE).row_count == 1
    widened.close()


def test_a_filtered_relay_skips_a_long_run_of_other_types_once_and_then_has_no_work(relay_env, orders, monkeypatch):
    monkeypatch.setattr(reporting, "UNMATCHED_LOOKAHEAD_ROWS", 5)
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish(url, *["user_created"] * 4)
    assert not orders.has_pending_work()  # a short run of other types is not worth a run
    publish(url, *["user_created"] * 4)
    assert orders.has_pending_work()  # a long one is: the next claim moves the cursor past it
    assert orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE) is None
    assert not orders.has_pending_work()
    cursor_id = orders.conn.execute("SELECT claimed_id FROM outbox_relay_cursor WHERE relay = 'orders'").fetchone()[0]
    assert cursor_id == 8
    [event] = publish(url, "order_paid")
    assert orders.has_pending_work()
    handle = orders.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=LEASE)
    assert orders.read_block_identities(handle, 0, 10) == [(9, str(event.event_id))]
