"""Benchmarks, each printing its figures beside a baseline measured in the same run.

    python -m outbox_pipeline.bench --events 100000 --events 1000000 [--latency-seconds 20] [--clickhouse-url URL]
    python -m outbox_pipeline.bench --sentry --events 100000 --events 1000000 [--repeat 3]
    python -m outbox_pipeline.bench --steady --rate 50 --rate 1000 [--warmup 60 --measure 240 --idle 60] [--baseline]
    python -m outbox_pipeline.bench --steady --relays 12 --rate 10 [--clickhouse-http] [--warmup 60 --measure 600 --idle 60]
    python -m outbox_pipeline.bench --exactly-once --events 1000000 --events 10000000
    python -m outbox_pipeline.bench --volume --rate 10000 --measure 60 --retire 100000 --retire 10000000
    python -m outbox_pipeline.bench --typed-tables --events 10000000 [--csv-events 1000000]

The first form is the backlog (backlog.py), the second Sentry's overhead (sentry_overhead.py),
the third the steady state of the real `dagster dev` stack (steady.py), the fourth a fleet of relays beside
one relay at the same total rate (fleet.py), --volume what the outbox costs PostgreSQL at volume, partitioned
beside unpartitioned (volume.py), --typed-tables an aggregate over typed columns beside JSONExtract, and what
typed tables add to inserts (typed_tables.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from outbox_pipeline.bench.backlog import print_table, relay_child, reset_stores, run_table
from outbox_pipeline.stores.clickhouse_connection import describe_clickhouse_url
from outbox_pipeline.stores.postgres_connection import describe_postgres_url, embedded_postgres_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outbox_pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, action="append", help="backlog size; repeat for several (default 100000)")
    parser.add_argument("--batch-size", type=int, default=None, help="relay batch size (default OUTBOX_BATCH_SIZE)")
    parser.add_argument("--latency-seconds", type=float, default=0, help="also measure commit-to-ClickHouse latency for this long per mode")
    parser.add_argument("--latency-rate", type=float, default=1000, help="producer events per second for the latency measurement")
    parser.add_argument(
        "--clickhouse-url", default=os.environ.get("OUTBOX_BENCH_CLICKHOUSE_URL"),
        help="a ClickHouse server to use instead of chDB in a temporary directory (its event_log tables are recreated)",
    )
    parser.add_argument(
        "--sentry", action="store_true",
        help="instead: relay throughput and publish cost with Sentry tracing off and on, side by side (bench/sentry_overhead.py)",
    )
    parser.add_argument(
        "--exactly-once", action="store_true",
        help="instead: a batch sent again beside its first send, and the completeness check's reads (bench/exactly_once.py)",
    )
    parser.add_argument(
        "--volume", action="store_true",
        help="instead: the outbox's cost to PostgreSQL under --rate events/s for --measure s, and retiring a day, "
        "partitioned beside unpartitioned (bench/volume.py)",
    )
    parser.add_argument("--retire", type=int, action="append", help="with --volume: events in the retired day; repeat for several")
    parser.add_argument("--producers", type=int, default=2, help="with --volume: producer processes")
    parser.add_argument(
        "--typed-tables", action="store_true",
        help="instead: an aggregate over a typed table beside JSONExtract, and the insert cost of typed tables (bench/typed_tables.py)",
    )
    parser.add_argument("--csv-events", type=int, default=1_000_000, help="with --typed-tables: demo events inserted as CSV")
    parser.add_argument("--repeat", type=int, default=3, help="with --sentry: relay runs per mode (the median is printed)")
    steady = parser.add_argument_group("steady state (the real dagster dev stack under a continuous stream)")
    steady.add_argument("--steady", action="store_true", help="measure the steady state instead of a backlog")
    steady.add_argument("--rate", type=float, action="append", help="events per second; repeat for several (default 50)")
    steady.add_argument("--warmup", type=float, default=60, help="seconds of stream before measuring (default 60)")
    steady.add_argument("--measure", type=float, default=240, help="seconds measured (default 240)")
    steady.add_argument("--idle", type=float, default=60, help="seconds measured with no stream (default 60)")
    steady.add_argument("--baseline", action="store_true",
                        help="also measure relay runs that end with their backlog (OUTBOX_FOLLOW_SECONDS=0), side by side")
    steady.add_argument("--relays", type=int, default=0,
                        help="a fleet of this many relays, --rate events/s each, beside one relay at the same total (bench/fleet.py)")
    steady.add_argument("--clickhouse-http", action="store_true",
                        help="with --relays: ClickHouse is the test suite's chDB-backed HTTP server, in a process of its own")
    parser.add_argument("--run-relay-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_relay_child:
        relay_child()
        return 0
    if args.sentry:
        from outbox_pipeline.bench.sentry_overhead import run_sentry_bench

        return run_sentry_bench(args.events or [100_000], batch_size=args.batch_size, repeat=args.repeat,
                                clickhouse_url=args.clickhouse_url)
    if args.exactly_once:
        from outbox_pipeline.bench.exactly_once import run_exactly_once_bench

        return run_exactly_once_bench(args.events or [1_000_000], args.clickhouse_url)
    if args.volume:
        return _volume(args)
    if args.typed_tables:
        from outbox_pipeline.bench.typed_tables import run_typed_tables_bench

        [events] = args.events or [10_000_000]
        return run_typed_tables_bench(events, args.batch_size or 100_000, args.csv_events)
    if args.steady and args.relays:
        from outbox_pipeline.bench.fleet import run_fleet_bench

        [rate] = args.rate or [10.0]
        run_fleet_bench(args.relays, rate, warmup=args.warmup, measure=args.measure, idle=args.idle, http=args.clickhouse_http)
        return 0
    if args.steady:
        from outbox_pipeline.bench.steady import run_steady

        run_steady(args.rate or [50.0], warmup=args.warmup, measure=args.measure, idle=args.idle, baseline=args.baseline)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    try:
        database_url = os.environ.get("OUTBOX_BENCH_DATABASE_URL") or embedded_postgres_url(workdir / "postgres", delete_on_exit=True)
        clickhouse_url = args.clickhouse_url or f"chdb://{workdir / 'clickhouse'}"
        print(f"stores: PostgreSQL {describe_postgres_url(database_url)}, ClickHouse {describe_clickhouse_url(clickhouse_url)}", file=sys.stderr)
        results = []
        for events in args.events or [100_000]:
            print(f"measuring N = {events:,} ...", file=sys.stderr, flush=True)
            results.append(run_table(database_url, clickhouse_url, events, args.batch_size))
        print_table(results)
        if args.latency_seconds:
            from outbox_pipeline.bench.latency import measure_latency_modes

            os.environ.update({"OUTBOX_DATABASE_URL": database_url, "CLICKHOUSE_URL": clickhouse_url})
            reset_stores(database_url, clickhouse_url)

            measure_latency_modes(database_url, clickhouse_url, seconds=args.latency_seconds, rate=args.latency_rate)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _volume(args) -> int:
    from outbox_pipeline.bench.volume import run_volume_bench

    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    try:
        server_url = os.environ.get("OUTBOX_BENCH_DATABASE_URL") or embedded_postgres_url(workdir / "postgres", delete_on_exit=True)
        clickhouse_url = args.clickhouse_url or f"chdb://{workdir / 'clickhouse'}"
        print(f"stores: PostgreSQL {describe_postgres_url(server_url)}, ClickHouse {describe_clickhouse_url(clickhouse_url)}", file=sys.stderr)
        [rate] = args.rate or [10_000.0]
        run_volume_bench(server_url, clickhouse_url, rate=rate, seconds=args.measure, producers=args.producers,
                         retire=args.retire or [100_000, 10_000_000])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
