"""Several relays read one outbox into different ClickHouse tables: each delivers its matching events exactly once.

``default`` (every event type) loads ``event_log``, ``orders`` (``order_*``) loads
``orders_event_log`` and ``users`` (``user_created``, ``user_?eleted``) loads
``users_event_log``, each with its own cursor, batches, leases and failures.
"""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.relay_identity import RelayIdentity
from outbox_pipeline_tests.support.relay_worker import run_worker

ORDERS = RelayIdentity("orders", ("order_*",))
USERS = RelayIdentity("users", ("user_created", "user_?eleted"))
TABLES = {"default": "event_log", "orders": "orders_event_log", "users": "users_event_log"}
# orderXpaid and user_deleted_v2 must not match: "_" is a literal in a pattern, and a pattern matches whole types.
TYPES = ["order_paid", "user_created", "order_shipped", "orderXpaid", "user_deleted", "user_deleted_v2", "page_viewed"]
FAST_RETRIES = BackoffPolicy(attempts=3, base_seconds=0.01)


def publish_mix(url: str, count: int) -> list[RawEvent]:
    events = [RawEvent(event_type=TYPES[n % len(TYPES)], context=f'{{"n": {n}}}') for n in range(count)]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def matching(events: list[RawEvent], relay: str) -> set[str]:
    wanted = {
        "default": lambda t: True,
        "orders": lambda t: t.startswith("order_"),
        "users": lambda t: t in ("user_created", "user_deleted"),
    }[relay]
    return {str(e.event_id) for e in events if wanted(e.event_type)}


def store_for(url: str, relay: str) -> OutboxStore:
    identity = {"default": RelayIdentity(), "orders": ORDERS, "users": USERS}[relay]
    return OutboxStore.connect(url, relay=identity)


def drain(url: str, clickhouse_url: str, relay: str, *, batch_size: int = 100) -> int:
    outbox = store_for(url, relay)
    event_log = EventLogStore.connect(clickhouse_url, table=TABLES[relay], busy_wait_seconds=30)
    try:
        policy = RelayPolicy(batch_size=batch_size, retry=FAST_RETRIES)
        return Relay(outbox, event_log, policy, claimed_by=f"test-{relay}").drain().events_loaded
    finally:
        outbox.close()
        event_log.close()


def table_contents(clickhouse_url: str, relay: str) -> tuple[int, int, set[str]]:
    event_log = EventLogStore.connect(clickhouse_url, table=TABLES[relay], busy_wait_seconds=30)
    try:
        rows, distinct = event_log.counts()
        ids = {row[0] for row in event_log.client.query(f"SELECT toString(event_id) FROM {TABLES[relay]}").result_rows}
        return rows, distinct, ids
    finally:
        event_log.close()


@pytest.fixture
def three_tables(relay_env) -> dict[str, str]:
    for table in TABLES.values():
        event_log = EventLogStore.connect(relay_env["CLICKHOUSE_URL"], table=table, busy_wait_seconds=30)
        event_log.migrate()
        event_log.close()
    return relay_env


def test_three_relays_on_one_outbox_each_load_exactly_their_matching_events_once(three_tables):
    url, ch_url = three_tables["OUTBOX_DATABASE_URL"], three_tables["CLICKHOUSE_URL"]
    published = publish_mix(url, 700)
    assert drain(url, ch_url, "orders") == len(matching(published, "orders")) == 200
    published += publish_mix(url, 350)
    for relay in ("default", "users", "orders"):
        drain(url, ch_url, relay)
    published += publish_mix(url, 70)
    for relay in ("users", "default", "orders"):
        drain(url, ch_url, relay)

    for relay in TABLES:
        rows, distinct, ids = table_contents(ch_url, relay)
        expected = matching(published, relay)
        assert (rows, distinct) == (len(expected), len(expected)), relay
        assert ids == expected, relay
        counts = store_for(url, relay).counts()
        assert (counts.pending, counts.in_flight, counts.processed, counts.failed) == (0, 0, len(expected), 0), relay
    # Each relay's batches hold only its own events.
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT relay, sum(row_count) FROM outbox_batch GROUP BY relay ORDER BY relay").fetchall() == [
            ("default", 1120), ("orders", 320), ("users", 320)
        ]


def test_a_relay_killed_mid_batch_leaves_every_table_exactly_once_after_its_lease_expires(three_tables, monkeypatch):
    env = {**three_tables, "OUTBOX_LEASE_SECONDS": "1"}
    url, ch_url = env["OUTBOX_DATABASE_URL"], env["CLICKHOUSE_URL"]
    published = publish_mix(url, 3_500)  # 1,000 order_* events
    orders_worker = ("--relay", "orders", "--event-types", "order_*", "--table", "orders_event_log", "--batch-size", "400")

    died = run_worker("drain", *orders_worker, "--kill-after", "insert", "--kill-at", "2", env=env)

    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    rows, distinct, _ = table_contents(ch_url, "orders")
    assert (rows, distinct) == (800, 800)  # two batches inserted, the second never marked
    orders = store_for(url, "orders")
    assert (orders.counts().processed, orders.counts().in_flight) == (400, 400)
    deadline = time.monotonic() + 30
    while orders.conn.execute(
        "SELECT count(*) FROM outbox_batch WHERE relay = 'orders' AND state = 'claimed' AND lease_expires_at >= now()"
    ).fetchone()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    # The other relay is not held up, and leaves the dead relay's expired batch alone.
    assert drain(url, ch_url, "default", batch_size=1_000) == 3_500
    assert (orders.counts().processed, orders.counts().in_flight) == (400, 400)
    assert drain(url, ch_url, "orders", batch_size=400) == 600

    for relay in ("default", "orders"):
        rows, distinct, ids = table_contents(ch_url, relay)
        expected = matching(published, relay)
        assert (rows, distinct) == (len(expected), len(expected)) and ids == expected, relay
    assert orders.conn.execute(
        "SELECT claim_count, count(*) FROM outbox_batch WHERE relay = 'orders' GROUP BY claim_count ORDER BY claim_count"
    ).fetchall() == [(1, 2), (2, 1)]
    orders.close()
