"""Producer transactions that commit out of id order are never skipped.

The relay orders work by (writing transaction id, outbox id) and only claims
below the oldest transaction still running. A transaction that is still open
holds back what committed after it (it is delayed, never skipped); one that
took its transaction id later sorts after whatever was already loaded, even
when its outbox ids are lower.
"""

import psycopg

from outbox_pipeline.producer import publish
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import run_relay


def event(name: str) -> RawEvent:
    return RawEvent(event_type="late_commit", context=f'{{"name": "{name}"}}')


def loaded(result) -> int:
    assert result.success
    return result.output_for_node("report_relay_run")["events_loaded"]


def delivered(clickhouse_url: str, *events: RawEvent) -> list[str]:
    """The names of these events found in ClickHouse, with the table's totals checked for copies."""
    with event_log_store(clickhouse_url) as event_log:
        rows, distinct = event_log.counts()
        assert rows == distinct
        found = event_log.rows_for([str(e.event_id) for e in events])
    return sorted(row["event_context"].split('"')[3] for row in found)


def outbox_key(conn, e: RawEvent) -> tuple[int, int]:
    txid, outbox_id = conn.execute("SELECT txid::text::bigint, id FROM outbox WHERE event_id = %s", (e.event_id,)).fetchone()
    return txid, outbox_id


def test_an_open_transaction_holding_a_lower_id_delays_later_commits_and_then_both_are_delivered(relay_env, outbox):
    url, ch_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    long_txn = psycopg.connect(url)
    a = event("A")
    publish(long_txn, a)  # takes id 1 and its transaction id, stays open
    b = event("B")
    with psycopg.connect(url) as short_txn:
        publish(short_txn, b)  # id 2, commits at once

    # B is held back behind the open transaction, not claimed past it.
    assert loaded(run_relay()) == 0
    assert delivered(ch_url, a, b) == []
    assert outbox.counts().pending == 1

    long_txn.commit()
    long_txn.close()
    assert loaded(run_relay()) == 2
    assert delivered(ch_url, a, b) == ["A", "B"]
    assert outbox.counts().pending == 0


def test_a_transaction_committing_after_a_higher_id_was_loaded_is_still_delivered(relay_env, outbox):
    url, ch_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    outbox.conn.execute("CREATE TABLE orders (id integer)")
    # T2 starts first: its business write gives it a transaction id before T1 has one.
    t2 = psycopg.connect(url)
    t2.execute("INSERT INTO orders VALUES (1)")
    t1 = psycopg.connect(url)
    a = event("A")
    publish(t1, a)  # lower outbox id, later transaction id; T1 stays open
    b = event("B")
    publish(t2, b)
    t2.commit()
    t2.close()
    (a_txid, a_id), (b_txid, b_id) = outbox_key(t1, a), outbox_key(outbox.conn, b)  # A is visible to T1 only
    assert a_id < b_id and a_txid > b_txid

    # B, with the higher id, is loaded while A's transaction is still open...
    assert loaded(run_relay()) == 1
    assert delivered(ch_url, a, b) == ["B"]

    # ... and A, committed afterwards with the lower id, is not skipped: "id > last loaded id" would skip it.
    t1.commit()
    t1.close()
    assert loaded(run_relay()) == 1
    assert delivered(ch_url, a, b) == ["A", "B"]
    counts = outbox.counts()
    assert (counts.pending, counts.processed) == (0, 2)


def test_a_long_transaction_anywhere_on_the_server_delays_delivery_until_it_ends(relay_env, outbox, postgres_server_url):
    url, ch_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    # A transaction in another database of the same server, holding a transaction id (a forgotten
    # psql session, a long report): the horizon is server-wide.
    elsewhere = psycopg.connect(postgres_server_url)
    elsewhere.execute("SELECT pg_current_xact_id()")
    events = [event(f"E{n}") for n in range(10)]
    with psycopg.connect(url) as conn:
        publish(conn, *events)

    assert loaded(run_relay()) == 0
    counts = outbox.counts()
    assert counts.pending == 10 and counts.oldest_pending_age_seconds >= 0

    elsewhere.rollback()
    elsewhere.close()
    assert loaded(run_relay()) == 10
    assert len(delivered(ch_url, *events)) == 10
