"""Retention by day on the partitioned outbox: a day goes whole, and only once every relay is done with it."""

from __future__ import annotations

import datetime as dt

import psycopg

from outbox_pipeline.stores import partitions
from outbox_pipeline_tests.stores.multiple_relays_store_tests import LEASE, deliver, orders, publish  # noqa: F401 (fixture)

TODAY = dt.datetime.now(dt.UTC).date()


def move_to_day(url: str, events, day: dt.date) -> None:
    """Give these events a created_at on ``day`` (noon UTC), in that day's partition, made for the test."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT outbox_create_partitions(%s, %s)", (day, day))
        moved = conn.execute(
            "UPDATE outbox SET created_at = %s WHERE event_id = ANY(%s)",
            (dt.datetime.combine(day, dt.time(12), dt.UTC), [e.event_id for e in events]),
        ).rowcount
        assert moved == len(events)


def partition_of(url: str, events) -> set[str]:
    with psycopg.connect(url) as conn:
        return {
            r[0] for r in conn.execute("SELECT tableoid::regclass::text FROM outbox WHERE event_id = ANY(%s)", ([e.event_id for e in events],))
        }


def remaining(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


def test_a_day_is_dropped_only_once_every_relay_that_wants_its_events_has_delivered_them(relay_env, outbox, orders):  # noqa: F811
    url = relay_env["OUTBOX_DATABASE_URL"]
    orders.check_schema()  # registers the filtered relay, as its first sensor tick does
    users_day, orders_day, failed_day, in_flight_day = (TODAY - dt.timedelta(days=d) for d in (12, 11, 10, 9))
    users = publish(url, "user_created", "user_deleted")
    paid = publish(url, "order_paid", "order_paid")
    poisoned = publish(url, "user_created")
    deliver(outbox)
    for events, day in ((users, users_day), (paid, orders_day), (poisoned, failed_day)):
        move_to_day(url, events, day)
    assert partition_of(url, users) == {f"outbox_p{users_day:%Y%m%d}"}
    # One event fails for good for the default relay, in the failed day.
    with psycopg.connect(url) as conn:
        outbox_id = conn.execute("SELECT id FROM outbox WHERE event_id = %s", (poisoned[0].event_id,)).fetchone()[0]
        conn.execute(
            "INSERT INTO outbox_failure (outbox_id, event_id, relay, state, attempts, last_error, next_attempt_at) "
            "VALUES (%s, %s, 'default', 'failed', 1, 'rejected', now())",
            (outbox_id, poisoned[0].event_id),
        )
    # A batch of the default relay is still claimed on the in-flight day.
    late = publish(url, "user_created", "user_created")
    move_to_day(url, late, in_flight_day)
    claimed = outbox.claim_next_batch(claimed_by="a-running-relay", batch_size=10, lease_seconds=LEASE)
    assert claimed.row_count == 2
    cutoff = dt.datetime.combine(TODAY - dt.timedelta(days=7), dt.time(), dt.UTC)

    first = {o.name: o.outcome for o in outbox.drop_delivered_partitions(cutoff)}

    assert first == {
        f"outbox_p{users_day:%Y%m%d}": "dropped",  # delivered by default; the orders relay wants none of it
        f"outbox_p{orders_day:%Y%m%d}": "kept: events not yet delivered",  # the orders relay is behind
        f"outbox_p{failed_day:%Y%m%d}": "kept: events wait in outbox_failure",
        f"outbox_p{in_flight_day:%Y%m%d}": "kept: events in a batch still claimed",
    }
    assert remaining(url) == 2 + 1 + 2
    assert partition_of(url, paid) == {f"outbox_p{orders_day:%Y%m%d}"}

    # The orders relay catches up; the claimed batch is finished; the failed event is retired.
    deliver(orders)
    assert outbox.complete_batch(claimed, [], max_attempts=3, retry_base_seconds=1)
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM outbox_failure")
    second = {o.name: o.outcome for o in outbox.drop_delivered_partitions(cutoff)}
    assert set(second.values()) == {"dropped"} and len(second) == 3
    assert remaining(url) == 0
    # Today's partition and the days ahead are not past the retention: never looked at.
    assert all(o.ends <= cutoff for o in outbox.drop_delivered_partitions(cutoff))
    assert f"outbox_p{TODAY:%Y%m%d}" in {p.name for p in outbox.list_partitions()}


def test_a_partition_a_writer_holds_is_left_for_later_without_holding_up_producers(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    day = TODAY - dt.timedelta(days=20)
    old = publish(url, "user_created")
    deliver(outbox)
    move_to_day(url, old, day)
    # An open transaction that has written to that day's partition (as a long producer transaction would).
    holder = psycopg.connect(url)
    holder.execute("UPDATE outbox SET environment = environment WHERE event_id = %s", (old[0].event_id,))
    cutoff = dt.datetime.combine(TODAY - dt.timedelta(days=7), dt.time(), dt.UTC)

    [busy] = outbox.drop_delivered_partitions(cutoff)

    assert (busy.name, busy.outcome) == (f"outbox_p{day:%Y%m%d}", "kept: busy, a transaction holds it")
    holder.rollback()
    holder.close()
    assert [o.outcome for o in outbox.drop_delivered_partitions(cutoff)] == ["dropped"]


def test_events_of_a_day_without_a_partition_land_in_the_default_partition_and_are_deleted_row_by_row(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    events = publish(url, "user_created", "user_created", "user_created")
    deliver(outbox)
    with psycopg.connect(url) as conn:  # a day no one made a partition for
        conn.execute("UPDATE outbox SET created_at = now() - interval '30 days'")
    assert partition_of(url, events) == {"outbox_default"}
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
    # That day now keeps its events in the default partition: no partition is made over them.
    with psycopg.connect(url) as conn:
        thirty_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).date()
        assert conn.execute("SELECT outbox_create_partitions(%s, %s)", (thirty_days_ago, thirty_days_ago)).fetchone()[0] == 0

    assert outbox.delete_processed_before(cutoff, chunk_size=2) == 2
    assert outbox.delete_processed_before(cutoff, chunk_size=2) == 1
    assert remaining(url) == 0


def test_the_days_ahead_are_made_once(relay_env, outbox):
    names = {p.name for p in outbox.list_partitions()}
    assert {f"outbox_p{TODAY + dt.timedelta(days=d):%Y%m%d}" for d in range(partitions.DAYS_AHEAD + 1)} <= names
    assert "outbox_default" in names
    assert outbox.create_partitions() == 0
    assert outbox.create_partitions(days_ahead=partitions.DAYS_AHEAD + 2) == 2
