"""Benchmark: what Sentry's Queues module tracing costs the relay and the producers, side by side.

    python -m outbox_pipeline.bench --sentry --events 100000 --events 1000000 [--repeat 3] [--batch-size N]

For each backlog size, on fresh stores (an embedded PostgreSQL and chDB in a temporary
directory, as bench/backlog.py):

* relay: ``process_outbox_events`` draining a backlog of events that all carry trace
  headers (as if every one had been published in a sampled request, 100 per request),
  with Sentry off and with Sentry on (traces sample rate 1.0, the DSN pointing at a
  local HTTP server this benchmark starts, which accepts envelopes the way Sentry does).
  The same backlog is relayed again for every run (the relay's bookkeeping and the
  ClickHouse table are reset in between); the modes alternate and the median is printed;
* publish: the producer API's cost per event, for one call of 1,000 events and for
  1,000 calls of one event, on the path before tracing existed (validation and insert
  only), with Sentry off (not imported; imported without a client), with Sentry on
  outside a transaction, and inside a sampled transaction (one queue.publish span per call).
  Paths compared with each other take turns within every round; the best round counts.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg

from outbox_pipeline.bench.backlog import load_backlog, measure_relay, reset_stores
from outbox_pipeline.stores.clickhouse_connection import clickhouse_client
from outbox_pipeline.stores.event_log_store import create_table_sql
from outbox_pipeline.stores.postgres_connection import describe_postgres_url, embedded_postgres_url

PUBLISH_EVENTS = 1_000
PUBLISH_ROUNDS = 9


class EnvelopeSink:
    """A local stand-in for Sentry's ingest endpoint: answers every envelope at once and counts its items by type."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.envelopes = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # One packet per answer: no Nagle delay against the client's delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink.record(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def record(self, envelope: bytes) -> None:
        # Item headers are the JSON lines that carry a "type" (payload lines do not, or are not JSON).
        types = []
        for line in envelope.split(b"\n")[1:]:
            try:
                header = json.loads(line)
            except ValueError:
                continue
            item_header_keys = {"type", "length", "content_type", "item_count"}
            if isinstance(header, dict) and isinstance(header.get("type"), str) and set(header) <= item_header_keys:
                types.append(header["type"])
        with self._lock:
            self.envelopes += 1
            for item_type in types:
                self.items[item_type] = self.items.get(item_type, 0) + 1

    def counts(self) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self.envelopes, dict(self.items)

    @property
    def dsn(self) -> str:
        return f"http://benchkey@127.0.0.1:{self._server.server_address[1]}/1"

    def __enter__(self) -> EnvelopeSink:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def reset_relay(database_url: str, clickhouse_url: str) -> None:
    """Make the whole backlog pending again (the events themselves are untouched) and empty event_log."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox_failure")
        conn.execute("DELETE FROM outbox_batch")
        conn.execute("UPDATE outbox_relay_cursor SET claimed_txid = '0', claimed_id = 0")
        conn.execute("VACUUM ANALYZE outbox_batch, outbox_relay_cursor")
    with clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        client.command("DROP TABLE IF EXISTS event_log")
        client.command(create_table_sql("event_log"))


def relay_side_by_side(
    database_url: str, clickhouse_url: str, events: int, *, batch_size: int | None, repeat: int, sink: EnvelopeSink
) -> dict:
    reset_stores(database_url, clickhouse_url)
    load_backlog(database_url, events, traced=True)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    sent_before = sink.counts()[1].get("transaction", 0)
    for round_ in range(repeat):
        # Alternate which mode goes first, so a machine that speeds up or slows down favours neither.
        for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            reset_relay(database_url, clickhouse_url)
            result = measure_relay(database_url, clickhouse_url, batch_size, sentry_dsn=sink.dsn if mode == "on" else None)
            if result["rows"] != events:
                raise RuntimeError(f"the relay loaded {result['rows']} of {events} events")
            rates[mode].append(result["rows"] / result["seconds"])
            print(f"  relay, Sentry {mode}: {rates[mode][-1]:,.0f} events/s", file=sys.stderr, flush=True)
    time.sleep(0.5)
    transactions = sink.counts()[1].get("transaction", 0) - sent_before
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"events": events, "off": off, "on": on, "ratio": on / off, "runs": repeat, "transactions_per_run": transactions / repeat,
            "off_all": rates["off"], "on_all": rates["on"]}


def publish_costs(database_url: str, sink_dsn: str) -> dict[str, tuple[float, ...]]:
    """Microseconds per event (one call of PUBLISH_EVENTS events, PUBLISH_EVENTS calls of one event; best of
    PUBLISH_ROUNDS), and per call of the tracing check alone."""
    from outbox_pipeline.producer.events import RawEvent, outbox_rows
    from outbox_pipeline.producer.publishing import _max_event_bytes, _write_rows, publish_many
    from outbox_pipeline.producer.tracing import current_span

    def events() -> list[RawEvent]:
        return [RawEvent(event_type="order_paid", context=f'{{"order_id": {n}, "amount": "9.90", "currency": "EUR", '
                                                          f'"email": "user{n}@example.com", "note": "{n:032x}"}}')
                for n in range(PUBLISH_EVENTS)]

    def before(conn, batch) -> None:  # publish_many as it was before tracing: validation and insert
        rows = outbox_rows(batch, max_event_bytes=_max_event_bytes())
        if rows:
            _write_rows(conn, rows)

    def after(conn, batch) -> None:
        publish_many(conn, batch)

    def best(writers: dict[str, tuple]) -> dict[str, tuple[float, float]]:
        """Each writer's best round per call shape; the writers take turns within every round, so drift favours none."""
        timings: dict[tuple[str, str], list[float]] = {}
        for _ in range(PUBLISH_ROUNDS):
            for shape in ("one_call", "many_calls"):
                for label, (write, around) in writers.items():
                    batch = events()
                    with psycopg.connect(database_url) as conn:
                        conn.execute("SELECT 1")  # the connection is warm before timing
                        with around() if around else contextlib.nullcontext():
                            started = time.perf_counter()
                            if shape == "one_call":
                                write(conn, batch)
                            else:
                                for event in batch:
                                    write(conn, [event])
                            timings.setdefault((label, shape), []).append(time.perf_counter() - started)
                        conn.rollback()
        return {
            label: tuple(min(timings[(label, shape)]) / PUBLISH_EVENTS * 1e6 for shape in ("one_call", "many_calls"))
            for label in writers
        }

    def check() -> float:
        """Microseconds per call of the test every publish makes first (is a sampled span current?)."""
        calls = 200_000
        started = time.perf_counter()
        for _ in range(calls):
            current_span()
        return (time.perf_counter() - started) / calls * 1e6

    costs: dict[str, tuple[float, ...]] = {}
    if "sentry_sdk" in sys.modules:
        raise RuntimeError("sentry_sdk is imported already: the 'not imported' figure would be wrong")
    costs.update(best({
        "before: validation + insert only (no tracing check)": (before, None),
        "Sentry off: sentry_sdk not imported": (after, None),
    }))
    costs["Sentry off: sentry_sdk not imported"] += (check(),)
    import sentry_sdk

    costs.update(best({"Sentry off: sentry_sdk imported, no client": (after, None)}))
    costs["Sentry off: sentry_sdk imported, no client"] += (check(),)
    sentry_sdk.init(dsn=sink_dsn, traces_sample_rate=1.0, default_integrations=False)
    in_transaction = "Sentry on, in a sampled transaction (a queue.publish span per call)"
    costs.update(best({
        "Sentry on, outside a transaction": (after, None),
        in_transaction: (after, lambda: sentry_sdk.start_transaction(op="http.server", name="POST /checkout")),
    }))
    costs["Sentry on, outside a transaction"] += (check(),)
    with sentry_sdk.start_transaction(op="http.server", name="POST /checkout"):
        costs[in_transaction] += (check(),)
    sentry_sdk.flush(5)
    sentry_sdk.get_client().close(timeout=2)
    return costs


def print_tables(relay_results: list[dict], costs: dict[str, tuple[float, ...]], batch_size: int | None) -> None:
    batch = f"batch size {batch_size:,}" if batch_size else "default batch size"
    header = f"relay, events/s ({batch}; median of {relay_results[0]['runs']} runs per mode)"
    rows = [
        ("Sentry off", lambda r: f"{r['off']:,.0f}"),
        ("Sentry on (traces sample rate 1.0, every event traced)", lambda r: f"{r['on']:,.0f}"),
        ("on / off", lambda r: f"{r['ratio']:.3f}"),
        ("queue.process transactions sent per run (+1 run transaction)", lambda r: f"{max(r['transactions_per_run'] - 1, 0):,.0f}"),
        ("all runs, off", lambda r: " ".join(f"{x / 1000:,.0f}k" for x in r["off_all"])),
        ("all runs, on", lambda r: " ".join(f"{x / 1000:,.0f}k" for x in r["on_all"])),
    ]
    width = max(len(header), *(len(label) for label, _ in rows))
    cell = max(16, *(len(fn(r)) for _, fn in rows for r in relay_results))
    print(f"{header:<{width}}  " + "  ".join(f"{'N = ' + format(r['events'], ','):>{cell}}" for r in relay_results))
    for label, fn in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{fn(r):>{cell}}" for r in relay_results))
    print()
    header = f"publish, microseconds per event (best of {PUBLISH_ROUNDS})"
    columns = (f"1 call of {PUBLISH_EVENTS:,} events", f"{PUBLISH_EVENTS:,} calls of 1 event", "the check alone, per call")
    width = max(len(header), *(len(label) for label in costs))
    print(f"{header:<{width}}  " + "  ".join(f"{column:>25}" for column in columns))
    for label, figures in costs.items():
        cells = [f"{figure:.1f}" for figure in figures[:2]] + [f"{figures[2]:.2f}" if len(figures) > 2 else "-"]
        print(f"{label:<{width}}  " + "  ".join(f"{cell:>25}" for cell in cells))


def run_sentry_bench(event_counts: list[int], *, batch_size: int | None, repeat: int, clickhouse_url: str | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-sentry-"))
    try:
        database_url = os.environ.get("OUTBOX_BENCH_DATABASE_URL") or embedded_postgres_url(workdir / "postgres", delete_on_exit=True)
        clickhouse_url = clickhouse_url or f"chdb://{workdir / 'clickhouse'}"
        print(f"stores: PostgreSQL {describe_postgres_url(database_url)}", file=sys.stderr)
        with EnvelopeSink() as sink:
            results = []
            for events in event_counts:
                print(f"measuring the relay, N = {events:,} ...", file=sys.stderr, flush=True)
                results.append(relay_side_by_side(database_url, clickhouse_url, events, batch_size=batch_size, repeat=repeat, sink=sink))
            print("measuring publish ...", file=sys.stderr, flush=True)
            reset_stores(database_url, clickhouse_url)
            costs = publish_costs(database_url, sink.dsn)
        print_tables(results, costs, batch_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
