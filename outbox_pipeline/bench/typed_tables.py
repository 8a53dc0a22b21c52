"""Typed tables: an aggregate over typed columns beside the same over JSON text, and what they add to an insert.

    python -m outbox_pipeline.bench --typed-tables [--events 10000000] [--batch-size 100000] [--csv-events 1000000]

In one chDB directory, side by side:

* the insert cost: the relay's own CSV inserts (blocks of demo events from
  ``sample_events``) into ``event_log`` with the demo's four typed tables attached,
  beside the same blocks into a table without them; then ``--events`` order_paid
  events generated in ClickHouse (INSERT … SELECT), into both tables again;
* a typical aggregate (revenue per currency) over those order_paid events, three
  ways: the typed table ``order_paid``; ``JSONExtract`` on ``event_log`` as an
  analyst writes it; and a plain view with the typed table's strict parsing (the
  alternative to a materialized table). Median of 5 runs each, results compared.
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from outbox_pipeline.producer.demo_events import sample_events
from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.producer.events import outbox_row
from outbox_pipeline.stores.event_columns import EVENT_COLUMNS
from outbox_pipeline.stores.event_log_store import EventLogStore

PLAIN = "plain_event_log"
REPEATS = 5

GENERATED = """
SELECT generateUUIDv4(number) AS event_id, 'order_paid' AS event_type,
       toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond(number * 250000) AS event_date_time,
       'bench' AS environment,
       concat('{"order_id":', toString(number), ',"user_id":', toString(cityHash64(number) % 1000000),
              ',"amount":"', toString(intDiv(cityHash64(number, 1) % 99900 + 100, 100)), '.',
              leftPad(toString((cityHash64(number, 1) % 99900 + 100) % 100), 2, '0'),
              '","currency":"', ['EUR', 'USD', 'GBP'][number % 3 + 1], '"}') AS event_context,
       1 AS metadata_version
FROM numbers({events})
"""

AGGREGATES = {
    "typed table (order_paid)": "SELECT currency, sum(amount), count() FROM order_paid GROUP BY currency ORDER BY currency",
    "JSONExtract on event_log": (
        "SELECT JSONExtractString(event_context, 'currency') AS currency, "
        "sum(toDecimal128(JSONExtractString(event_context, 'amount'), 9)), count() "
        "FROM event_log WHERE event_type = 'order_paid' GROUP BY currency ORDER BY currency"
    ),
    "view with strict parsing": "SELECT currency, sum(amount), count() FROM order_paid_view GROUP BY currency ORDER BY currency",
}


def _csv_blocks(events: int, batch_size: int) -> list[bytes]:
    blocks = []
    rows = (outbox_row(event) for event in sample_events(events, seed=1))
    while True:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        count = 0
        for event_id, event_type, when, environment, context, version in rows:
            writer.writerow([event_id, event_type, when.strftime("%Y-%m-%d %H:%M:%S.%f+00"), environment, context, version])
            count += 1
            if count == batch_size:
                break
        if not count:
            return blocks
        blocks.append(buffer.getvalue().encode())


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_typed_tables_bench(events: int, batch_size: int, csv_events: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-typed-"))
    try:
        url = f"chdb://{workdir / 'clickhouse'}"
        typed = EventLogStore.connect(url, event_classes=load_event_classes(["outbox_pipeline.producer.demo_events"]))
        plain = EventLogStore(typed.client, table=PLAIN)
        typed.migrate()
        plain.migrate()
        client = typed.client
        order_paid = next(table for table in typed.typed.tables if table.name == "order_paid")
        client.command(f"CREATE VIEW order_paid_view AS {order_paid.select_sql('event_log')}")

        print(f"building {csv_events:,} demo events in blocks of {batch_size:,} ...", file=sys.stderr, flush=True)
        blocks = _csv_blocks(csv_events, batch_size)
        seconds = {PLAIN: 0.0, "event_log": 0.0}
        for number, block in enumerate(blocks):
            # Alternating, so both tables see the same machine load.
            for store in (plain, typed) if number % 2 else (typed, plain):
                seconds[store.table] += _timed(lambda s=store, b=block, n=number: s.insert_csv(b, deduplication_token=f"csv-{n}"))
        print(f"\ninsert cost, the relay's CSV inserts: {csv_events:,} demo events (4 types), {len(blocks)} blocks of {batch_size:,}")
        _print_pair(seconds[PLAIN], seconds["event_log"], csv_events)

        print(f"generating {events:,} order_paid events in ClickHouse, into each table ...", file=sys.stderr, flush=True)
        query = GENERATED.replace("{events}", str(int(events)))
        generated = {}
        for table in (PLAIN, "event_log"):
            generated[table] = _timed(lambda t=table: client.command(f"INSERT INTO {t} ({', '.join(EVENT_COLUMNS)}) {query}", settings={"insert_deduplicate": 0}))
        print(f"\ninsert cost, INSERT … SELECT of {events:,} order_paid events (the JSON generated in the same statement)")
        _print_pair(generated[PLAIN], generated["event_log"], events)
        client.command(f"DROP TABLE {PLAIN}")
        for table in ("event_log", "order_paid"):
            client.command(f"OPTIMIZE TABLE {table} FINAL")

        rows = client.query("SELECT count() FROM order_paid").result_rows[0][0]
        print(f"\naggregate over {rows:,} order_paid events: revenue and count per currency (median of {REPEATS} runs)")
        answers = {}
        print(f"  {'query':<28} {'seconds':>9} {'vs typed':>9}")
        baseline = None
        for name, sql in AGGREGATES.items():
            runs = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                answers[name] = client.query(sql).result_rows
                runs.append(time.perf_counter() - started)
            median = statistics.median(runs)
            baseline = baseline or median
            print(f"  {name:<28} {median:>9.3f} {median / baseline:>8.1f}x")
        same = len({repr(answer) for answer in answers.values()}) == 1
        print(f"  the three results are {'identical' if same else 'DIFFERENT: ' + repr(answers)}")
        sizes = client.query(
            "SELECT table, formatReadableSize(sum(data_compressed_bytes)) FROM system.parts "
            "WHERE active AND table IN ('event_log', 'order_paid') GROUP BY table ORDER BY table"
        ).result_rows
        print("  on disk (compressed): " + ", ".join(f"{table} {size}" for table, size in sizes))
        typed.close()
        return 0 if same else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _print_pair(without: float, with_typed: float, events: int) -> None:
    print(f"  {'event_log':<36} {'seconds':>9} {'events/s':>12}")
    print(f"  {'without typed tables':<36} {without:>9.2f} {events / without:>12,.0f}")
    print(f"  {'with the 4 demo typed tables':<36} {with_typed:>9.2f} {events / with_typed:>12,.0f}")
    print(f"  {'cost of the typed tables':<36} {100 * (with_typed - without) / without:>+8.0f}%")
