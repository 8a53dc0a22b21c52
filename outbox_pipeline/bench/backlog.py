"""Backlog benchmark: the relay against the practical limit and a naive relay, on the same stores in one run.

    python -m outbox_pipeline.bench --events 100000 --events 1000000 [--latency-seconds 20] [--clickhouse-url URL]

Stores are fresh: an embedded PostgreSQL and chDB in a temporary directory (or the
server in OUTBOX_BENCH_DATABASE_URL, whose database is left with bench tables).
Every figure of the table is measured in this run:

* relay: ``process_outbox_events`` draining the whole backlog (claim, load, mark),
  in a child process so that its peak memory is its own; then the same job with
  nothing pending, which is the floor of every run (Dagster's steps and records);
* practical limit: the same rows streamed out of PostgreSQL with COPY (the relay's
  own reader) and inserted into ClickHouse with no bookkeeping, the read of the
  next chunk overlapping the insert of the previous one;
* naive relay: one ClickHouse insert and one processed-flag UPDATE per event, on a
  10,000-event sample;
* latency from commit to visible in ClickHouse under a steady producer, for the
  sensor path and for the low-latency mode.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time

import psycopg

from outbox_pipeline.stores import migrations
from outbox_pipeline.stores.batch_reads import stream_csv
from outbox_pipeline.stores.clickhouse_connection import clickhouse_client
from outbox_pipeline.stores.event_columns import EVENT_COLUMNS
from outbox_pipeline.stores.event_log_store import create_table_sql
from outbox_pipeline.stores.outbox_store import OutboxStore

NAIVE_SAMPLE = 10_000
LIMIT_CHUNK_BYTES = 12 << 20  # about 50,000 of the bench's events per insert

# Realistic payloads of about 150 bytes, generated in PostgreSQL so loading the backlog is quick.
_EVENT_CONTEXT = """json_build_object('order_id', n, 'user_id', n %% 9973, 'amount', round((n %% 100000) / 100.0, 2),
                         'currency', 'EUR', 'email', 'user' || (n %% 9973) || '@example.com',
                         'note', md5(n::text))::text"""
_GENERATE_EVENTS = f"""
INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context)
SELECT gen_random_uuid(),
       (ARRAY['user_created', 'order_paid', 'order_shipped', 'payment_refunded'])[1 + n %% 4],
       now() - make_interval(secs => n %% %(spread)s),
       'bench',
       {_EVENT_CONTEXT}
FROM generate_series(1, %(events)s) AS n
"""
# The same events as published inside sampled Sentry transactions, 100 per request (bench/sentry_overhead.py).
_GENERATE_TRACED_EVENTS = f"""
INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context, sentry_trace, sentry_baggage)
SELECT gen_random_uuid(),
       (ARRAY['user_created', 'order_paid', 'order_shipped', 'payment_refunded'])[1 + n %% 4],
       now() - make_interval(secs => n %% %(spread)s),
       'bench',
       {_EVENT_CONTEXT},
       md5((n / 100)::text) || '-' || left(md5(n::text), 16) || '-1',
       'sentry-trace_id=' || md5((n / 100)::text) || ',sentry-environment=bench,sentry-release=shop%%401.0,'
       || 'sentry-public_key=benchkey,sentry-transaction=POST%%20%%2Fcheckout,sentry-sample_rate=1.0,sentry-sampled=true'
FROM generate_series(1, %(events)s) AS n
"""


def reset_stores(database_url: str, clickhouse_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrations.drop_outbox_schema(conn)
        conn.execute("DROP TABLE IF EXISTS outbox_naive")
    store = OutboxStore.connect(database_url)
    store.migrate()
    store.close()
    with clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        for table in ("event_log", "event_log_limit", "event_log_naive"):
            client.command(f"DROP TABLE IF EXISTS {table}")
            client.command(create_table_sql(table))


def load_backlog(database_url: str, events: int, *, traced: bool = False, days: int = 1) -> float:
    """``events`` bench events, their event_date_time spread over the last ``days`` days."""
    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_GENERATE_TRACED_EVENTS if traced else _GENERATE_EVENTS, {"events": events, "spread": days * 86400})
        conn.execute("VACUUM ANALYZE outbox")
    return time.perf_counter() - started


def measure_limit(database_url: str, clickhouse_url: str) -> dict:
    """COPY out in chunks on a reader thread, CSV inserts on this one: no bookkeeping at all."""
    chunks: queue.Queue = queue.Queue(maxsize=2)
    columns = ", ".join(EVENT_COLUMNS)

    failure: list[BaseException] = []

    def read() -> None:
        try:
            stream()
        except BaseException as exc:  # surfaced on the main thread
            failure.append(exc)
        finally:
            chunks.put(None)

    def stream() -> None:
        # The relay's own COPY reader (stores/batches.py), in pieces of whole rows.
        with psycopg.connect(database_url, options="-c TimeZone=UTC") as conn:
            for piece in stream_csv(conn, f"SELECT {columns} FROM outbox ORDER BY txid, id", (), chunk_bytes=LIMIT_CHUNK_BYTES):
                chunks.put(piece)

    with clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        started = time.perf_counter()
        reader = threading.Thread(target=read)
        reader.start()
        while (chunk := chunks.get()) is not None:
            client.raw_insert("event_log_limit", list(EVENT_COLUMNS), chunk, fmt="CSV",
                              settings={"date_time_input_format": "best_effort", "format_csv_allow_single_quotes": 0})
        reader.join()
        if failure:
            raise failure[0]
        seconds = time.perf_counter() - started
        rows = client.command("SELECT count() FROM event_log_limit")
    return {"rows": int(rows), "seconds": seconds}


def measure_relay(database_url: str, clickhouse_url: str, batch_size: int | None, *, sentry_dsn: str | None = None) -> dict:
    """The Dagster job, in a child process: events/s and the child's own peak memory (Sentry off unless a DSN is given)."""
    env = {**os.environ, "OUTBOX_DATABASE_URL": database_url, "CLICKHOUSE_URL": clickhouse_url,
           "OUTBOX_MAX_BATCHES_PER_RUN": "100000", "OUTBOX_MAX_SECONDS_PER_RUN": "3600"}
    env.pop("SENTRY_CONFIG_DSN", None)
    if sentry_dsn:
        env.update({"SENTRY_CONFIG_DSN": sentry_dsn, "SENTRY_TRACES_SAMPLE_RATE": "1.0", "DEBUG": "false"})
    if batch_size:
        env["OUTBOX_BATCH_SIZE"] = str(batch_size)
    result = subprocess.run([sys.executable, "-m", "outbox_pipeline.bench", "--run-relay-child"],
                            env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"relay child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def relay_child() -> None:
    import logging

    import dagster as dg

    logging.disable(logging.CRITICAL)
    from outbox_pipeline.definitions import build_resources, defs

    job = defs.resolve_job_def("process_outbox_events")
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        run = job.execute_in_process(
            instance=instance, resources=build_resources(), raise_on_error=True,
            # One run over the backlog: it ends with it instead of following the (absent) stream.
            run_config={"ops": {"follow_outbox": {"config": {"follow_seconds": 0}}}},
        )
        seconds = time.perf_counter() - started
        stats = instance.get_run_stats(run.run_id)
    summary = run.output_for_node("report_relay_run")
    print(json.dumps({"rows": summary["events_loaded"], "batches": summary["batches"], "seconds": seconds,
                      "run_seconds": stats.end_time - stats.start_time,
                      "peak_rss_mb": _own_peak_rss_mb()}))


def _own_peak_rss_mb() -> float:
    """This process's peak RSS since it started.

    Not ``ru_maxrss``: Linux keeps it across fork and exec, so a child started by a large
    parent reports the parent's size. ``VmHWM`` belongs to the process's own memory map.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def measure_naive(database_url: str, clickhouse_url: str) -> dict:
    """One insert per event and a processed flag per row: what a hand-written task often does."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE outbox_naive AS SELECT id, {', '.join(EVENT_COLUMNS)}, NULL::timestamptz AS processed_at "
            f"FROM outbox ORDER BY id LIMIT {NAIVE_SAMPLE}"
        )
        conn.execute("ALTER TABLE outbox_naive ADD PRIMARY KEY (id)")
    with psycopg.connect(database_url, autocommit=True) as conn, clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        started = time.perf_counter()
        rows = conn.execute(f"SELECT id, {', '.join(EVENT_COLUMNS)} FROM outbox_naive WHERE processed_at IS NULL ORDER BY id").fetchall()
        for row in rows:
            client.insert("event_log_naive", [list(row[1:])], column_names=list(EVENT_COLUMNS))
            conn.execute("UPDATE outbox_naive SET processed_at = now() WHERE id = %s", (row[0],))
        seconds = time.perf_counter() - started
    return {"rows": len(rows), "seconds": seconds}


def outbox_statistics(database_url: str) -> dict:
    store = OutboxStore.connect(database_url)
    try:
        return store.table_statistics()
    finally:
        store.close()


def run_table(database_url: str, clickhouse_url: str, events: int, batch_size: int | None) -> dict:
    reset_stores(database_url, clickhouse_url)
    load_seconds = load_backlog(database_url, events)
    limit = measure_limit(database_url, clickhouse_url)
    relay = measure_relay(database_url, clickhouse_url, batch_size)
    # The same job once more with nothing pending: what any run costs before and after its rows.
    empty = measure_relay(database_url, clickhouse_url, batch_size)
    naive = measure_naive(database_url, clickhouse_url)
    stats = outbox_statistics(database_url)
    with clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        rows, distinct = client.query("SELECT count(), uniqExact(event_id) FROM event_log").result_rows[0]
    def rate(m):
        return m["rows"] / m["seconds"]
    # The run's time as Dagster records it (RUN_START to RUN_SUCCESS); the call also starts the instance.
    relay_eps = relay["rows"] / relay["run_seconds"]
    return {
        "events": events, "load_seconds": load_seconds,
        "relay_eps": relay_eps, "relay_call_eps": rate(relay), "limit_eps": rate(limit), "naive_eps": rate(naive),
        "relay_over_limit": relay_eps / rate(limit), "relay_over_naive": relay_eps / rate(naive),
        "relay_peak_rss_mb": relay["peak_rss_mb"], "relay_batches": relay["batches"], "empty_run_seconds": empty["run_seconds"],
        "outbox_total_mb": stats["total_bytes"] / 2**20, "outbox_index_mb": stats["index_bytes"] / 2**20,
        "dead_tuples": stats["dead_tuples"], "clickhouse_rows": int(rows), "clickhouse_distinct": int(distinct),
    }


def print_table(results: list[dict]) -> None:
    header = ["", *[f"N = {r['events']:,}" for r in results]]
    lines = [
        ("relay (process_outbox_events, run time as Dagster records it), events/s", "relay_eps", "{:,.0f}"),
        ("relay, whole execute_in_process call, events/s", "relay_call_eps", "{:,.0f}"),
        ("practical limit (COPY -> insert, overlapped), events/s", "limit_eps", "{:,.0f}"),
        (f"naive relay (1 insert + 1 UPDATE per event, {NAIVE_SAMPLE:,} sample), events/s", "naive_eps", "{:,.0f}"),
        ("relay / limit", "relay_over_limit", "{:.2f}"),
        ("relay / naive", "relay_over_naive", "{:,.0f}x"),
        ("relay batches", "relay_batches", "{:,}"),
        ("a relay run with nothing pending (the same job's floor), s", "empty_run_seconds", "{:.2f}"),
        ("relay peak RSS, MB", "relay_peak_rss_mb", "{:,.0f}"),
        ("outbox table + indexes after run, MB", "outbox_total_mb", "{:,.1f}"),
        ("outbox indexes, MB", "outbox_index_mb", "{:,.1f}"),
        ("outbox dead tuples after run", "dead_tuples", "{:,}"),
        ("ClickHouse count() / uniqExact(event_id)", None, None),
    ]
    width = max(len(label) for label, _, _ in lines)
    print(f"{'':<{width}}  " + "  ".join(f"{h:>14}" for h in header[1:]))
    for label, key, fmt in lines:
        if key is None:
            cells = [f"{r['clickhouse_rows']:,}/{r['clickhouse_distinct']:,}" for r in results]
        else:
            cells = [fmt.format(r[key]) for r in results]
        print(f"{label:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
