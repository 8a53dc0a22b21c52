"""Upgrading a database created by the first release (schema version 1) in place.

The old database is built and used by the frozen store of that release
(release_v1_outbox_store.py) with the real relay loop and real chDB, so it holds
exactly what a deployment leaves behind: processed batches, a batch a dead run
inserted but never marked, pending events, a retrying and a failed event.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from importlib import resources

import psycopg
import pytest
import sentry_sdk

from outbox_pipeline.config.errors import SchemaMissingError, SchemaOutdatedError, StoreUnavailableError
from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer import publishing as producer
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores import migrations
from outbox_pipeline.stores.event_columns import EVENT_COLUMNS
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.stores import release_v1_outbox_store as release_v1

FAST_RETRIES = BackoffPolicy(attempts=3, base_seconds=0.01)


def publish(url: str, event_type: str, count: int) -> list[RawEvent]:
    events = [RawEvent(event_type=event_type, context=f'{{"n": {n}}}') for n in range(count)]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)
    return events


def versions(url: str) -> list[tuple[int, dt.datetime]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version, applied_at FROM outbox_schema_version ORDER BY version").fetchall()


def release_v1_database(url: str) -> None:
    store = release_v1.OutboxStore.connect(url)
    store.migrate()
    store.close()


def normalized(sql: str) -> str:
    return " ".join(re.sub(r"--[^\n]*", "", sql).split())


def test_migration_0001_is_exactly_the_schema_of_the_first_release():
    # A database created by that release is "at version 1": 0001 must never change.
    shipped = (resources.files("outbox_pipeline") / "sql" / "0001_initial_schema.sql").read_text()
    assert normalized(shipped) == normalized(release_v1.MIGRATION)


class ReleaseV1Store(release_v1.OutboxStore):
    """The frozen release-1 store under this release's relay loop, which asks for a batch as a stream of pieces."""

    def stream_block_csv(self, handle, start: int, stop: int, without=()):
        # The same bytes as release 1's single read (its relay inserted them in one piece).
        if not without:
            yield bytes(self.read_block_csv(handle, start, stop))
            return
        # A second send leaves out the rows ClickHouse holds, as this release's store does.
        inner, params = self._batch_rows_query(handle, f"{release_v1._SELECT_EVENT_COLUMNS}, o.id AS block_row_id", start, stop)
        columns = ", ".join(EVENT_COLUMNS)
        query = f"SELECT {columns} FROM ({inner}) block WHERE block_row_id <> ALL(%s)"
        with self.conn.cursor() as cur, cur.copy(f"COPY ({query}) {release_v1._COPY_CSV}", (*params, list(without))) as copy:
            yield b"".join(bytes(piece) for piece in copy)

    def read_block_keys(self, handle, start: int, stop: int):
        query, params = self._batch_rows_query(handle, "o.id, o.event_id::text, o.event_date_time", start, stop)
        return [tuple(row) for row in self.conn.execute(query, params).fetchall()]


def test_a_release_v1_database_is_upgraded_in_place_and_every_event_is_delivered_exactly_once(
    outbox_database_url, clickhouse_url
):
    url = outbox_database_url
    release_v1_database(url)
    with event_log_store(clickhouse_url) as event_log:
        event_log.migrate()
        event_log.client.command("ALTER TABLE event_log ADD CONSTRAINT no_failed CHECK event_type != 'poison_failed'")
        event_log.client.command("ALTER TABLE event_log ADD CONSTRAINT no_retry CHECK event_type != 'poison_retry'")

    v1 = ReleaseV1Store.connect(url)
    with event_log_store(clickhouse_url) as event_log:
        # Processed by real runs of the old release; one event failed for good, one awaits its retry.
        published = publish(url, "order_paid", 10) + publish(url, "poison_failed", 1)
        one_attempt = RelayPolicy(batch_size=100, max_event_attempts=1, retry=FAST_RETRIES)
        assert Relay(v1, event_log, one_attempt, claimed_by="v1-run-1").drain().events_loaded == 10
        published += publish(url, "user_created", 10) + publish(url, "poison_retry", 1)
        retry_later = RelayPolicy(batch_size=100, max_event_attempts=5, event_retry_base_seconds=3600, retry=FAST_RETRIES)
        assert Relay(v1, event_log, retry_later, claimed_by="v1-run-2").drain().events_loaded == 10
        # A run that claimed and inserted a batch, then died before marking it.
        published += publish(url, "order_shipped", 10)
        dead_run = Relay(v1, event_log, RelayPolicy(batch_size=100, lease_seconds=1, retry=FAST_RETRIES), claimed_by="v1-dead-run")
        in_flight = dead_run.claim()
        assert dead_run.load(in_flight).loaded_rows == 10
        # Still pending at the upgrade.
        published += publish(url, "user_deleted", 10)
        rows_before_upgrade = event_log.counts()
        event_log.client.command("ALTER TABLE event_log DROP CONSTRAINT no_retry")  # the retrying event's cause is fixed
    before = v1.counts()
    installation_id = v1.installation_id
    cursor_before = v1.conn.execute("SELECT claimed_txid::text, claimed_id FROM outbox_relay_cursor").fetchone()
    v1.close()
    assert rows_before_upgrade == (30, 30)
    assert (before.pending, before.in_flight, before.retrying, before.failed, before.processed) == (21, 10, 1, 1, 20)

    upgraded_at = dt.datetime.now(dt.UTC)
    store = OutboxStore.connect(url)
    assert store.migrate() == list(range(2, migrations.LATEST_VERSION + 1))
    assert [version for version, _ in versions(url)] == list(range(1, migrations.LATEST_VERSION + 1))

    # In place: the same counts, cursor and installation for the default relay.
    after = store.counts()
    assert (after.pending, after.in_flight, after.retrying, after.failed, after.processed) == (21, 10, 1, 1, 20)
    assert store.installation_id == installation_id
    assert store.conn.execute(
        "SELECT claimed_txid::text, claimed_id FROM outbox_relay_cursor WHERE relay = 'default'"
    ).fetchone() == cursor_before

    # The dead run's batch is taken over under the token it was inserted with before the upgrade.
    deadline = time.monotonic() + 30
    while store.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at >= now()").fetchone()[0]:
        assert time.monotonic() < deadline, "the dead run's lease never expired"
        time.sleep(0.2)
    taken_over = store.claim_next_batch(claimed_by="after-upgrade", batch_size=100, lease_seconds=60)
    assert (taken_over.batch_id, taken_over.claim_count, taken_over.row_count) == (in_flight.batch_id, 2, 10)
    assert taken_over.deduplication_token(0, 10) == in_flight.deduplication_token(0, 10)
    store.release_batches([taken_over])
    # The retrying event's backoff has passed.
    store.conn.execute("UPDATE outbox_failure SET next_attempt_at = now() WHERE state = 'retrying'")

    with event_log_store(clickhouse_url) as event_log:
        totals = Relay(store, event_log, RelayPolicy(batch_size=100, retry=FAST_RETRIES), claimed_by="after-upgrade").drain()
        rows, distinct = event_log.counts()
        reinserted_after_upgrade = event_log.client.command(
            "SELECT count() FROM event_log WHERE event_type = 'order_shipped' AND loaded_at >= {t:DateTime64(6, 'UTC')}",
            parameters={"t": upgraded_at},
        )
        poison_failed = [e for e in published if e.event_type == "poison_failed"]
        assert event_log.rows_for([str(poison_failed[0].event_id)]) == []
    delivered = len(published) - 1  # the failed event stays failed
    assert (rows, distinct) == (delivered, delivered) == (41, 41)
    assert totals.events_loaded == 10 + 10 + 1  # the retaken batch, the pending events, the retried event
    assert reinserted_after_upgrade == 0  # ClickHouse dropped the re-insert: same token as before the upgrade
    final = store.counts()
    assert (final.pending, final.in_flight, final.retrying, final.failed, final.processed) == (0, 0, 0, 1, 41)
    store.close()


def test_migrating_twice_changes_nothing(outbox_database_url):
    store = OutboxStore.connect(outbox_database_url)
    assert store.migrate() == list(range(1, migrations.LATEST_VERSION + 1))
    applied = versions(outbox_database_url)
    assert store.migrate() == []
    assert versions(outbox_database_url) == applied
    store.close()


def test_two_concurrent_migrations_apply_each_version_once(outbox_database_url):
    # A third session holds the migration lock, so both migrations start before either can proceed.
    holder = psycopg.connect(outbox_database_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (migrations.ADVISORY_LOCK_KEY,))
    outcomes: dict[int, list[int] | BaseException] = {}

    def migrate(n: int) -> None:
        store = OutboxStore.connect(outbox_database_url)
        try:
            outcomes[n] = store.migrate()
        except BaseException as exc:
            outcomes[n] = exc
        finally:
            store.close()

    threads = [threading.Thread(target=migrate, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0] < 2:
        assert time.monotonic() < deadline, "the migrations never waited for the lock"
        time.sleep(0.05)
    holder.execute("SELECT pg_advisory_unlock(%s)", (migrations.ADVISORY_LOCK_KEY,))
    holder.close()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes.values(), key=len) == [[], list(range(1, migrations.LATEST_VERSION + 1))], outcomes
    assert [version for version, _ in versions(outbox_database_url)] == list(range(1, migrations.LATEST_VERSION + 1))


def test_a_relay_on_a_database_not_yet_upgraded_says_to_run_init(outbox_database_url):
    release_v1_database(outbox_database_url)
    store = OutboxStore.connect(outbox_database_url)
    with pytest.raises(SchemaOutdatedError) as raised:
        store.claim_next_batch(claimed_by="new-code", batch_size=10, lease_seconds=60)
    message = str(raised.value)
    assert message == (
        f"the outbox database is at schema version 1 but this release of outbox_pipeline needs version "
        f"{migrations.LATEST_VERSION}: run `outbox-pipeline init` to upgrade it"
    )
    with pytest.raises(SchemaOutdatedError):
        store.check_schema()
    store.close()


def test_a_relay_on_an_empty_database_says_to_run_init(outbox_database_url):
    store = OutboxStore.connect(outbox_database_url)
    with pytest.raises(SchemaMissingError, match=r"run `outbox-pipeline init` first$"):
        store.counts()
    store.close()


# -- version 3: the trace headers ----------------------------------------------------------------


def version_2_database(url: str) -> None:
    """A database of the release before version 3 (the shipped files 0001 and 0002, which never change)."""
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrations.apply_migrations(conn, up_to=2) == [1, 2]


def migrate(url: str) -> list[int]:
    store = OutboxStore.connect(url)
    try:
        return store.migrate()
    finally:
        store.close()


def trace_headers(url: str, events: list[RawEvent]) -> list[tuple]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT sentry_trace, sentry_baggage FROM outbox WHERE event_id = ANY(%s) ORDER BY id", ([e.event_id for e in events],)
        ).fetchall()
    assert len(rows) == len(events)
    return rows


def test_a_producer_deployed_before_the_upgrade_publishes_without_trace_headers_and_stores_them_after_it(
    outbox_database_url, sentry_recorder, monkeypatch
):
    url = outbox_database_url
    version_2_database(url)
    sentry_sdk.init(dsn=sentry_recorder.dsn, traces_sample_rate=1.0, default_integrations=False)
    # Missing columns are looked for again at each publish (normally after a minute).
    monkeypatch.setattr(producer, "_RECHECK_MISSING_COLUMNS_SECONDS", 0.0)
    before, after = [RawEvent(event_type="order_paid", context="{}")], [RawEvent(event_type="order_paid", context="{}")]

    with psycopg.connect(url) as conn:
        with sentry_sdk.start_transaction(op="http.server", name="POST /checkout"):
            publish_many(conn, before)  # the columns are not there yet: published without them
        conn.commit()
        assert migrate(url) == list(range(3, migrations.LATEST_VERSION + 1))
        with sentry_sdk.start_transaction(op="http.server", name="POST /checkout") as transaction:
            publish_many(conn, after)  # the same connection finds them now
        conn.commit()

    assert trace_headers(url, before) == [(None, None)]
    [(sentry_trace, baggage)] = trace_headers(url, after)
    assert sentry_trace.startswith(f"{transaction.trace_id}-") and f"sentry-trace_id={transaction.trace_id}" in baggage
    sentry_sdk.flush()
    publish_spans = [s for t in sentry_recorder.wait_for(lambda r: len(r.payloads("transaction")) == 2 and r.payloads("transaction"))
                     for s in t["spans"] if s["op"] == "queue.publish"]
    assert len(publish_spans) == 2  # a span either way


def test_a_version_2_database_is_upgraded_while_producers_write_and_every_event_is_delivered_once(
    outbox_database_url, clickhouse_url, monkeypatch
):
    url = outbox_database_url
    version_2_database(url)
    monkeypatch.setattr(migrations, "LOCK_RETRY_PAUSE_SECONDS", 0.2)
    pending = publish(url, "order_paid", 20)
    # A producer transaction that has written to the outbox stays open across the upgrade's start.
    holder = psycopg.connect(url)
    held = [RawEvent(event_type="order_paid", context='{"held": true}')]
    publish_many(holder, held)
    outcome: list = []
    upgrade = threading.Thread(target=lambda: outcome.append(migrate(url)))
    upgrade.start()
    time.sleep(0.5)  # the upgrade is waiting for the holder, trying again and again

    # Meanwhile other producers are held up at most one lock wait (100 ms), never until the holder ends
    # (this one would give up after 3 s queued behind the upgrade's lock).
    started = time.monotonic()
    written_meanwhile = [RawEvent(event_type="order_paid", context="{}") for _ in range(5)]
    with psycopg.connect(url, options="-c lock_timeout=3000") as producer_conn:
        publish_many(producer_conn, written_meanwhile)
    assert time.monotonic() - started < 1.0
    assert upgrade.is_alive() and outcome == []
    holder.commit()
    holder.close()
    upgrade.join(timeout=30)

    assert outcome == [list(range(3, migrations.LATEST_VERSION + 1))]
    assert [version for version, _ in versions(url)] == list(range(1, migrations.LATEST_VERSION + 1))
    store = OutboxStore.connect(url)
    assert store.counts().pending == 26
    with event_log_store(clickhouse_url) as event_log:
        event_log.migrate()
        totals = Relay(store, event_log, RelayPolicy(batch_size=10, retry=FAST_RETRIES), claimed_by="after-upgrade").drain()
        assert totals.events_loaded == 26
        assert event_log.counts() == (26, 26)
        assert {row["event_id"] for row in event_log.rows_for([str(e.event_id) for e in pending + held + written_meanwhile])} == {
            str(e.event_id) for e in pending + held + written_meanwhile
        }
    assert set(trace_headers(url, pending + held + written_meanwhile)) == {(None, None)}
    store.close()


def test_an_upgrade_that_cannot_get_its_lock_gives_up_in_one_line_and_changes_nothing(outbox_database_url, monkeypatch):
    url = outbox_database_url
    version_2_database(url)
    monkeypatch.setattr(migrations, "LOCK_ATTEMPTS", 3)
    monkeypatch.setattr(migrations, "LOCK_RETRY_PAUSE_SECONDS", 0.05)
    holder = psycopg.connect(url)
    publish_many(holder, [RawEvent(event_type="order_paid", context="{}")])

    store = OutboxStore.connect(url)
    with pytest.raises(StoreUnavailableError) as raised:
        store.migrate()
    message = str(raised.value)
    assert "schema version 3 (0003_trace_headers.sql)" in message and "run `outbox-pipeline init` again" in message
    assert "\n" not in message
    assert [version for version, _ in versions(url)] == [1, 2]

    holder.commit()
    holder.close()
    assert store.migrate() == list(range(3, migrations.LATEST_VERSION + 1))
    store.close()
