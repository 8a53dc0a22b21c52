"""What exactly-once costs beyond a first send: a block sent again, and the completeness check.

    python -m outbox_pipeline.bench --exactly-once --events 1000000 --events 10000000 [--clickhouse-url URL]

For each size, on fresh stores (an embedded PostgreSQL and chDB in a temporary directory, or
the server of ``--clickhouse-url``), with the events spread over the last 30 days:

1. the relay delivers them all (``Relay.drain``, batches of 100,000);
2. a second relay of its own (its own cursor and table) takes one batch of 100,000 three
   times, side by side: its first send (blind, as every first send), then the same batch
   taken over after its lease expired with every row already in ClickHouse (the lookup
   alone), then a batch taken over whose first owner had inserted nothing (the lookup and
   the whole insert);
3. the completeness check's two reads: PostgreSQL's delivered events per day, ClickHouse's
   distinct event_ids per day.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from outbox_pipeline.bench.backlog import load_backlog, reset_stores
from outbox_pipeline.bench.steady import print_columns
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.stores.clickhouse_connection import describe_clickhouse_url
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import embedded_postgres_url
from outbox_pipeline.stores.relay_identity import RelayIdentity

BATCH = 100_000
PROBE = RelayIdentity("probe")


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _expire_leases(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_batch SET lease_expires_at = now() - interval '1 second' WHERE state = 'claimed'")


def measure(database_url: str, clickhouse_url: str, events: int, log) -> dict:
    reset_stores(database_url, clickhouse_url)
    log(f"N = {events:,}: loading the outbox")
    load_backlog(database_url, events, days=30)
    outbox = OutboxStore.connect(database_url)
    event_log = EventLogStore.connect(clickhouse_url, busy_wait_seconds=30)
    probe_outbox = OutboxStore.connect(database_url, relay=PROBE)
    probe_log = EventLogStore.connect(clickhouse_url, table="probe_event_log", busy_wait_seconds=30)
    probe_log.client.command("DROP TABLE IF EXISTS probe_event_log")
    probe_log.migrate()
    try:
        log(f"N = {events:,}: delivering")
        drain_seconds, totals = _timed(lambda: Relay(outbox, event_log, RelayPolicy(batch_size=BATCH), claimed_by="bench").drain())
        result = {"events": events, "drain_events_per_second": totals.events_loaded / drain_seconds}

        probe = Relay(probe_outbox, probe_log, RelayPolicy(batch_size=BATCH), claimed_by="bench-probe")
        first = probe.claim()
        result["first_send_s"], _ = _timed(lambda: probe.load(first))
        _expire_leases(database_url)
        again = probe.claim()  # the same batch, taken over: claim_count 2
        assert again is not None and again.batch_id == first.batch_id and again.claim_count == 2
        result["second_send_all_present_s"], loaded = _timed(lambda: probe.load(again))
        probe.mark(loaded, again)
        fresh = probe.claim()
        _expire_leases(database_url)
        retaken = probe.claim()
        assert retaken is not None and retaken.batch_id == fresh.batch_id
        result["second_send_none_present_s"], loaded = _timed(lambda: probe.load(retaken))
        probe.mark(loaded, retaken)
        rows, distinct = probe_log.counts()
        result["probe_exactly_once"] = rows == distinct == 2 * BATCH

        since = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=31)
        result["check_postgres_s"], delivered = _timed(lambda: outbox.delivered_per_day(since))
        result["check_clickhouse_s"], present = _timed(lambda: event_log.distinct_per_day(since))
        result["check_days"] = len(delivered)
        result["check_passes"] = all(present.get(day, 0) >= count for day, count in delivered.items())
        return result
    finally:
        for store in (outbox, event_log, probe_outbox, probe_log):
            store.close()


def print_results(results: list[dict]) -> None:
    lines = [
        ("relay, first sends, events/s", lambda r: f"{r['drain_events_per_second']:,.0f}"),
        (f"batch of {BATCH:,}: first send, s", lambda r: f"{r['first_send_s']:.3f}"),
        ("  taken over, all rows in ClickHouse, s", lambda r: f"{r['second_send_all_present_s']:.3f}"),
        ("  taken over, no row in ClickHouse, s", lambda r: f"{r['second_send_none_present_s']:.3f}"),
        ("  exactly once after both", lambda r: "yes" if r["probe_exactly_once"] else "NO"),
        ("completeness check: PostgreSQL per day, s", lambda r: f"{r['check_postgres_s']:.3f}"),
        ("completeness check: ClickHouse per day, s", lambda r: f"{r['check_clickhouse_s']:.3f}"),
        ("  days compared / passes", lambda r: f"{r['check_days']} / {'yes' if r['check_passes'] else 'NO'}"),
    ]
    print_columns([f"{r['events']:,} events" for r in results], lines, results, min_cell=14)


def run_exactly_once_bench(sizes: list[int], clickhouse_url: str | None) -> int:
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(tempfile.mkdtemp(prefix="outbox-exactly-once-"))
    try:
        database_url = os.environ.get("OUTBOX_BENCH_DATABASE_URL") or embedded_postgres_url(workdir / "postgres", delete_on_exit=True)
        clickhouse_url = clickhouse_url or f"chdb://{workdir / 'clickhouse'}"
        log(f"ClickHouse {describe_clickhouse_url(clickhouse_url)}")
        print_results([measure(database_url, clickhouse_url, events, log) for events in sizes])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
