"""Upgrading an unpartitioned outbox (schema version 3, the release before partitions) while producers write."""

from __future__ import annotations

import threading
import time

import psycopg

from outbox_pipeline.producer import publish
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores import migrations
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store

EXISTING_EVENTS = 200_000
PRODUCERS = 3


class Producers:
    """Threads that publish one event per transaction, as fast as they can, timing every call."""

    def __init__(self, url: str):
        self.url = url
        self.stop = threading.Event()
        self.published: list[list[str]] = [[] for _ in range(PRODUCERS)]
        self.slowest: list[float] = [0.0] * PRODUCERS
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(PRODUCERS)]

    def _run(self, n: int) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                while not self.stop.is_set():
                    event = RawEvent(event_type="order_paid", context=f'{{"producer": {n}}}')
                    started = time.monotonic()
                    publish(conn, event)
                    self.slowest[n] = max(self.slowest[n], time.monotonic() - started)
                    self.published[n].append(str(event.event_id))
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.errors.append(exc)

    def __enter__(self) -> Producers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def event_ids(self) -> list[str]:
        return [event_id for ids in self.published for event_id in ids]


def test_an_unpartitioned_outbox_is_partitioned_while_producers_write_and_every_event_is_delivered_once(
    outbox_database_url, clickhouse_url
):
    url = outbox_database_url
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrations.apply_migrations(conn, up_to=3) == [1, 2, 3]
        conn.execute(
            """
            INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context)
            SELECT gen_random_uuid(), 'order_paid', now(), 'test', '{"existing": ' || n || '}' FROM generate_series(1, %s) n
            """,
            (EXISTING_EVENTS,),
        )
        (last_id_before,) = conn.execute("SELECT max(id) FROM outbox").fetchone()

    with Producers(url) as producers:
        time.sleep(0.3)
        store = OutboxStore.connect(url)
        assert store.migrate() == list(range(4, migrations.LATEST_VERSION + 1))
        written_during_upgrade = len(producers.event_ids())
        time.sleep(0.3)  # and they go on writing into the partitioned table

    assert producers.errors == []
    assert written_during_upgrade > 0 and len(producers.event_ids()) > written_during_upgrade
    # The upgrade's locks are taken with a 100 ms timeout and held for a few milliseconds.
    assert max(producers.slowest) < 1.0, producers.slowest
    with psycopg.connect(url) as conn:
        (partitioned,) = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = 'outbox'::regclass").fetchone()
        assert partitioned
        per_partition = dict(conn.execute("SELECT tableoid::regclass::text, count(*) FROM outbox GROUP BY 1").fetchall())
        # Every existing event stays where it was, in the old table attached whole.
        assert per_partition.get("outbox_legacy", 0) >= EXISTING_EVENTS
        # Ids go on from where the old table's identity stopped, never reused.
        ids = [r[0] for r in conn.execute("SELECT id FROM outbox WHERE id > %s ORDER BY id", (last_id_before,)).fetchall()]
        assert len(ids) == len(set(ids)) == len(producers.event_ids())

    total = EXISTING_EVENTS + len(producers.event_ids())
    with event_log_store(clickhouse_url) as event_log:
        event_log.migrate()
        relay = Relay(store, event_log, RelayPolicy(batch_size=50_000, retry=BackoffPolicy(attempts=3, base_seconds=0.01)), claimed_by="t")
        assert relay.drain().events_loaded == total
        assert event_log.counts() == (total, total)  # (rows, distinct event_ids): each event once
        sample = producers.event_ids()[:: max(1, len(producers.event_ids()) // 500)]
        assert {row["event_id"] for row in event_log.rows_for(sample)} == set(sample)
    store.close()
