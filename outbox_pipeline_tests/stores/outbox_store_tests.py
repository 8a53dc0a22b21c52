import gc

import psycopg
import pytest

from outbox_pipeline.stores import batch_reads, migrations
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import publish_raw

PROCESSED_ROWS = 1_000_000


def test_migrations_run_twice_without_error(relay_env, outbox):
    outbox.migrate()
    outbox.migrate()
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.migrate()
        event_log.migrate()
        assert event_log.counts() == (0, 0)
    assert outbox.counts().pending == 0


def test_finding_pending_work_reads_only_the_index_tail_beside_a_million_processed_rows(relay_env, outbox):
    conn = outbox.conn
    conn.execute(
        """
        INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context)
        SELECT gen_random_uuid(), 'processed', now(), 'test', '{"n": ' || n || '}' FROM generate_series(1, %s) n
        """,
        (PROCESSED_ROWS,),
    )
    # The relay has claimed and finished all of them.
    handle = outbox.claim_next_batch(claimed_by="test", batch_size=PROCESSED_ROWS, lease_seconds=60)
    assert handle.row_count == PROCESSED_ROWS
    assert outbox.complete_batch(handle, [], max_attempts=3, retry_base_seconds=1)
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 5)
    conn.execute("VACUUM ANALYZE outbox")

    plan = conn.execute(
        """
        EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
        SELECT txid, id FROM outbox
        WHERE (txid, id) > (SELECT claimed_txid, claimed_id FROM outbox_relay_cursor WHERE relay = 'default')
          AND txid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY txid, id LIMIT 1000
        """
    ).fetchone()[0][0]
    scans = {(node["Node Type"], node.get("Relation Name"), node.get("Index Name")) for node in plan_nodes(plan["Plan"])}
    # One index range scan per daily partition (and the default one), merged in key order.
    outbox_scans = {scan for scan in scans if scan[1] and scan[1].startswith("outbox_") and scan[1] != "outbox_relay_cursor"}
    assert len(outbox_scans) >= 2 and all(
        kind in ("Index Only Scan", "Index Scan") and index == f"{table}_txid_id_idx" for kind, table, index in outbox_scans
    ), scans
    blocks = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"].get("Shared Read Blocks", 0)
    assert blocks < 50, f"read {blocks} blocks to find 5 pending rows"
    assert plan["Plan"]["Actual Rows"] == 5
    assert outbox.has_pending_work()
    counts = outbox.counts()
    assert (counts.pending, counts.processed) == (5, PROCESSED_ROWS)


def plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def test_a_claim_skips_nothing_committed_out_of_id_order(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    slow = psycopg.connect(url)
    publish_raw_on(slow, "late")  # takes a lower id, commits last
    publish_raw(url, 3, event_type="early")
    # The open transaction holds the horizon: nothing after it is final yet.
    assert outbox.claim_next_batch(claimed_by="t", batch_size=100, lease_seconds=60) is None
    slow.commit()
    slow.close()
    handle = outbox.claim_next_batch(claimed_by="t", batch_size=100, lease_seconds=60)
    assert handle.row_count == 4


def publish_raw_on(conn, event_type: str) -> None:
    from outbox_pipeline.producer import publish
    from outbox_pipeline.producer.events import RawEvent

    publish(conn, RawEvent(event_type=event_type, context="{}"))


def test_an_expired_lease_is_claimed_again_with_the_same_membership(relay_env, outbox):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 7)
    first = outbox.claim_next_batch(claimed_by="dead-run", batch_size=100, lease_seconds=0.05)
    assert outbox.claim_next_batch(claimed_by="other", batch_size=100, lease_seconds=60) is None or False
    import time

    time.sleep(0.1)
    again = outbox.claim_next_batch(claimed_by="other", batch_size=100, lease_seconds=60)
    assert (again.batch_id, again.row_count, again.claim_count) == (first.batch_id, 7, 2)
    assert again.deduplication_token(0, 7) == first.deduplication_token(0, 7)
    # The dead run can no longer mark it.
    assert not outbox.complete_batch(first, [], max_attempts=3, retry_base_seconds=1)
    assert outbox.complete_batch(again, [], max_attempts=3, retry_base_seconds=1)


def test_deduplication_tokens_differ_between_outbox_installations(relay_env, outbox, postgres_server_url):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 1)
    handle = outbox.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=60)
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"], autocommit=True) as conn:
        migrations.drop_outbox_schema(conn)
    fresh = OutboxStore.connect(relay_env["OUTBOX_DATABASE_URL"])
    fresh.migrate()
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 1)
    recreated = fresh.claim_next_batch(claimed_by="t", batch_size=10, lease_seconds=60)
    fresh.close()
    assert recreated.batch_id == handle.batch_id
    assert recreated.deduplication_token(0, 1) != handle.deduplication_token(0, 1)


ROWS_QUERY = "SELECT n, repeat('x', n %% 50) FROM generate_series(1, %s) AS n"
FAILING_QUERY = "SELECT n, 1 / (n - %s) FROM generate_series(1, %s) AS n"


@pytest.mark.parametrize("rows", [3, 200_000])
def test_both_copy_readers_give_the_bytes_psycopg_reads(relay_env, outbox, rows):
    # psycopg's own COPY iteration is the reference both readers must match.
    with outbox.conn.cursor() as cur, cur.copy(f"COPY ({ROWS_QUERY}) {batch_reads.COPY_CSV}", (rows,)) as copy:
        reference = b"".join(bytes(row) for row in copy)
    whole = batch_reads.copy_csv(outbox.conn, ROWS_QUERY, (rows,))
    pieces = list(batch_reads.stream_csv(outbox.conn, ROWS_QUERY, (rows,), chunk_bytes=64 * 1024))
    assert bytes(whole) == reference
    assert b"".join(pieces) == reference
    assert whole.count(b"\n") == rows
    assert outbox.conn.execute("SELECT 1").fetchone() == (1,)  # the COPY was finished: the connection goes on


def test_a_stream_holds_its_rows_where_the_garbage_collector_does_not_look(relay_env, outbox):
    # Rows held as memoryviews (what libpq's copy gives) are tracked objects: about 130 collections of
    # the young generation for these 50,000 rows, each promoting survivors toward a collection of the
    # whole heap, which in a run worker cost more CPU than the read itself. Held as bytes: none.
    gc.collect()
    before = gc.get_stats()[0]["collections"]
    pieces = sum(1 for _ in batch_reads.stream_csv(outbox.conn, ROWS_QUERY, (50_000,), chunk_bytes=1 << 20))
    collections = gc.get_stats()[0]["collections"] - before
    assert pieces >= 1
    assert collections < 10


@pytest.mark.parametrize(("failing_row", "rows"), [(2, 3), (150_000, 200_000)])
def test_a_copy_that_fails_midway_raises_the_servers_error_and_the_connection_goes_on(relay_env, outbox, failing_row, rows):
    with pytest.raises(psycopg.errors.DivisionByZero):
        for _ in batch_reads.stream_csv(outbox.conn, FAILING_QUERY, (failing_row, rows), chunk_bytes=64 * 1024):
            pass
    outbox.conn.rollback()
    assert outbox.conn.execute("SELECT 1").fetchone() == (1,)


def test_closing_a_stream_early_cancels_the_copy_and_the_connection_goes_on(relay_env, outbox):
    stream = batch_reads.stream_csv(outbox.conn, ROWS_QUERY, (2_000_000,), chunk_bytes=64 * 1024)
    assert next(stream).count(b"\n") > 0
    stream.close()
    outbox.conn.rollback()
    assert outbox.conn.execute("SELECT count(*) FROM generate_series(1, 10)").fetchone() == (10,)
