"""The `outbox-pipeline` command: init, demo, status, relay, requeue, end-runs, start, stop.

Every expected failure ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable

import psycopg

from outbox_pipeline.config.errors import ConfigurationError, OutboxPipelineError, one_line
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.producer.event_registry import load_event_classes
from outbox_pipeline.stores.clickhouse_connection import translate_clickhouse_error
from outbox_pipeline.stores.embedded_postgres import (
    embedded_postgres_url,
    running_embedded_postgres_pid,
    stop_embedded_postgres,
)
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline.stores.postgres_connection import (
    connect_postgres,
    postgres_errors_translated,
    resolve_outbox_database_url,
)

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Stores:
    """Opens each store on first use and closes what it opened.

    ``start_embedded``: whether a stopped embedded PostgreSQL server may be started.
    """

    def __init__(self, settings: RelaySettings, *, start_embedded: bool = True):
        self.settings = settings
        self.start_embedded = start_embedded
        self._outbox_url: str | None = None
        self._outbox: OutboxStore | None = None
        self._event_log: EventLogStore | None = None

    @property
    def outbox_url(self) -> str:
        if self._outbox_url is None:
            self._outbox_url = resolve_outbox_database_url(self.settings, start_embedded=self.start_embedded)
        return self._outbox_url

    def outbox(self) -> OutboxStore:
        if self._outbox is None:
            self._outbox = OutboxStore.connect(self.outbox_url)
        return self._outbox

    def event_log(self) -> EventLogStore:
        if self._event_log is None:
            try:
                self._event_log = EventLogStore.connect(
                    self.settings.clickhouse_url,
                    busy_wait_seconds=self.settings.clickhouse_busy_wait_seconds,
                    event_classes=load_event_classes(self.settings.event_classes),
                )
            except OutboxPipelineError:
                raise
            except Exception as exc:
                raise translate_clickhouse_error(exc, self.settings.clickhouse_url) from None
        return self._event_log

    def close(self) -> None:
        for store in (self._outbox, self._event_log):
            if store is not None:
                store.close()


def cmd_init(stores: _Stores, args: argparse.Namespace) -> int:
    stores.outbox().migrate()
    if args.roles:
        from outbox_pipeline.stores.roles import create_roles

        create_roles(stores.outbox().conn, args.producer_role, args.relay_role)
        print(f"roles {args.producer_role} (publish only) and {args.relay_role} (the relay's jobs) ready")
    _clickhouse(stores, lambda: stores.event_log().migrate())
    typed = ", ".join(table.name for table in stores.event_log().typed.tables)
    print(
        f"outbox tables ready in PostgreSQL; event_log{' and typed tables ' + typed if typed else ''} ready in ClickHouse "
        f"({_clickhouse_where(stores.settings)})"
    )
    return 0


def cmd_grants(stores: _Stores, args: argparse.Namespace) -> int:
    from outbox_pipeline.stores.roles import grant_statements

    stores.outbox().check_schema()
    for role in (args.producer_role, args.relay_role):
        print(f'CREATE ROLE "{role}" NOLOGIN;')
    for statement in grant_statements(stores.outbox().conn, args.producer_role, args.relay_role):
        print(f"{statement};")
    return 0


def cmd_demo(stores: _Stores, args: argparse.Namespace) -> int:
    from outbox_pipeline.producer import publish_many
    from outbox_pipeline.producer.demo_events import sample_events

    stores.outbox().check_schema()
    events = sample_events(args.count)
    chunk = 10_000 if not args.rate else max(1, min(1_000, int(args.rate // 10) or 1))
    published = 0
    started = time.monotonic()
    with connect_postgres(stores.outbox_url, autocommit=False, application_name="outbox_pipeline demo") as conn:
        while published < args.count:
            batch = list(itertools.islice(events, chunk))
            with conn.transaction():
                published += publish_many(conn, batch)
            if args.rate:
                # Pace to the requested rate, whatever each transaction took.
                ahead = published / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    elapsed = time.monotonic() - started
    print(f"published {published} events in {elapsed:.2f}s ({published / max(elapsed, 1e-9):.0f} events/s)")
    return 0


def cmd_status(stores: _Stores, args: argparse.Namespace) -> int:
    outbox = stores.outbox()
    outbox.check_schema()
    # ClickHouse first: opening it may wait for a relay run to release the embedded directory,
    # and the PostgreSQL counts must be read after that wait, not before, to match its rows.
    event_log = _clickhouse(stores, stores.event_log)
    counts = outbox.counts()
    rows, distinct = _clickhouse(stores, event_log.counts)
    report = {
        "pending": counts.pending,
        "processed": counts.processed,
        "failed": counts.failed,
        "oldest_pending_age_seconds": round(counts.oldest_pending_age_seconds, 3) if counts.oldest_pending_age_seconds is not None else None,
        "clickhouse_rows": rows,
        "clickhouse_distinct_event_ids": distinct,
        "in_flight": counts.in_flight,
        "retrying": counts.retrying,
        "outbox_bytes": outbox.table_statistics()["total_bytes"],
        "outbox_partitions": len(outbox.list_partitions()),
    }
    warning = outbox.check_xid_horizon()
    if not warning and outbox.default_partition_holds_events():
        warning = ("events went to outbox_default (no partition covered their day): they are deleted row by row; "
                   "run cleanup_outbox daily, it makes the partitions of the coming days")
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(key) for key in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_end_runs(stores: _Stores, args: argparse.Namespace) -> int:
    """Ask the fleet's runs in progress in $DAGSTER_HOME to end as a success, and wait for them."""
    import dagster as dg

    from outbox_pipeline.orchestration.stopping import ask_fleet_runs_to_end, wait_for_runs_to_end

    try:
        instance = dg.DagsterInstance.get()
    except dg.DagsterError as exc:
        first_line = str(exc).strip().splitlines()[0].strip()
        raise ConfigurationError(
            f"cannot open the deployment's Dagster instance: {first_line} Set DAGSTER_HOME to its folder (scripts/dev: .dagster_home)"
        ) from None
    with instance:
        asked = ask_fleet_runs_to_end(instance, "the deployment is stopping")
        left = wait_for_runs_to_end(instance, asked, args.wait)
    print(f"asked {len(asked)} relay runs to end; {len(asked) - len(left)} ended" + (f", still running: {', '.join(left)}" if left else ""))
    return 0


def cmd_relay(stores: _Stores, args: argparse.Namespace) -> int:
    """Drain the outbox once, outside Dagster (for scripts and debugging)."""
    import os
    import socket

    from outbox_pipeline.monitoring.relay_report import command_run_report
    from outbox_pipeline.relay.delivery import Relay, RelayPolicy

    policy = RelayPolicy.from_settings(stores.settings, **({"batch_size": args.batch_size} if args.batch_size else {}))
    claimed_by = f"cli:{socket.gethostname()}:{os.getpid()}"
    # Reported to Sentry like a Dagster relay run: one transaction, one check-in pair.
    with command_run_report(
        lambda: stores.outbox().counts(include_processed=False), settings=stores.settings, tags={"outbox.claimed_by": claimed_by}
    ) as report:
        event_log = _clickhouse(stores, stores.event_log)
        relay = Relay(stores.outbox(), event_log, policy, claimed_by=claimed_by, on_retry=report.record_retry)
        # Each loaded batch continues its producers' traces (Sentry's Queues module).
        on_loaded = report.batch_tracer(stores.outbox(), event_log.table)
        totals = relay.drain(max_batches=args.max_batches, on_batch=report.record_batch, on_loaded=on_loaded)
    rate = totals.events_loaded / totals.seconds if totals.seconds else 0.0
    print(
        f"loaded {totals.events_loaded} events in {totals.batches} batches in {totals.seconds:.2f}s "
        f"({rate:.0f} events/s); {totals.events_rejected} rejected, {totals.retries} retries"
    )
    return 0


def cmd_start(stores: _Stores, args: argparse.Namespace) -> int:
    """Start the embedded PostgreSQL server; it runs until `outbox-pipeline stop`."""
    settings = stores.settings
    if not settings.uses_embedded_postgres:
        print("OUTBOX_DATABASE_URL is set: the outbox is on that server, there is no embedded server to start")
        return 0
    data_dir = settings.embedded_postgres_dir
    pid = running_embedded_postgres_pid(data_dir)
    if pid is not None:
        print(f"the embedded PostgreSQL server in {data_dir} is already running (pid {pid})")
        return 0
    embedded_postgres_url(data_dir)
    print(f"started the embedded PostgreSQL server in {data_dir} (pid {running_embedded_postgres_pid(data_dir)})")
    return 0


def cmd_stop(stores: _Stores, args: argparse.Namespace) -> int:
    """Stop the embedded PostgreSQL server under OUTBOX_STATE_DIR, if it runs."""
    data_dir = stores.settings.embedded_postgres_dir
    pid = stop_embedded_postgres(data_dir)
    if pid is None:
        print(f"the embedded PostgreSQL server in {data_dir} is not running")
    else:
        print(f"stopped the embedded PostgreSQL server in {data_dir} (pid {pid})")
    return 0


def cmd_requeue(stores: _Stores, args: argparse.Namespace) -> int:
    if not (args.event_ids or args.event_type or args.all):
        print("outbox-pipeline: error: name event ids, --event-type or --all", file=sys.stderr)
        return EXIT_USAGE
    count = stores.outbox().requeue_failed(event_ids=args.event_ids, event_type=args.event_type, all_failed=args.all)
    print(f"requeued {count} failed events")
    return 0


def _clickhouse(stores: _Stores, fn: Callable):
    try:
        return fn()
    except OutboxPipelineError:
        raise
    except Exception as exc:
        raise translate_clickhouse_error(exc, stores.settings.clickhouse_url) from None


def _clickhouse_where(settings: RelaySettings) -> str:
    from outbox_pipeline.stores.clickhouse_connection import describe_clickhouse_url

    return describe_clickhouse_url(settings.clickhouse_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outbox-pipeline", description="PostgreSQL outbox to ClickHouse relay.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create the outbox and event_log tables (idempotent)")
    init.add_argument("--roles", action="store_true", help="also create the producer and relay roles with least privileges")
    grants = commands.add_parser("grants", help="print the statements that create the producer and relay roles")
    for command in (init, grants):
        command.add_argument("--producer-role", default="outbox_producer", help="may only INSERT into the outbox")
        command.add_argument("--relay-role", default="outbox_relay", help="what the relay, replays and retention need")
    init.set_defaults(handler=cmd_init)
    grants.set_defaults(handler=cmd_grants)

    demo = commands.add_parser("demo", help="publish sample events through the producer API")
    demo.add_argument("--count", type=_positive_int, default=1_000, help="how many events (default 1000)")
    demo.add_argument("--rate", type=_positive_float, default=None, help="events per second (default: as fast as possible)")
    demo.set_defaults(handler=cmd_demo)

    status = commands.add_parser("status", help="counts of pending, processed and failed events, and ClickHouse rows")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    # Looking must not change anything: a stopped embedded server stays stopped.
    status.set_defaults(handler=cmd_status, start_embedded_postgres=False)

    relay = commands.add_parser("relay", help="drain the outbox once without Dagster")
    relay.add_argument("--batch-size", type=_positive_int, default=None)
    relay.add_argument("--max-batches", type=_positive_int, default=None)
    relay.set_defaults(handler=cmd_relay)

    requeue = commands.add_parser("requeue", help="put failed events back in line for delivery")
    requeue.add_argument("event_ids", nargs="*", help="event ids (UUIDs)")
    requeue.add_argument("--event-type", default=None)
    requeue.add_argument("--all", action="store_true")
    requeue.set_defaults(handler=cmd_requeue)

    end_runs = commands.add_parser(
        "end-runs", help="ask the fleet's relay runs in progress ($DAGSTER_HOME) to end as a success, before stopping Dagster"
    )
    end_runs.add_argument(
        "--wait", type=_positive_float, default=10.0, help="seconds to wait for them to end (default 10)"
    )
    end_runs.set_defaults(handler=cmd_end_runs, start_embedded_postgres=False)

    start = commands.add_parser("start", help="start the embedded PostgreSQL server (it runs until `stop`)")
    start.set_defaults(handler=cmd_start)
    stop = commands.add_parser("stop", help="stop the embedded PostgreSQL server")
    stop.set_defaults(handler=cmd_stop)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def main(argv: list[str] | None = None) -> int:
    # clickhouse-connect logs its own copy of errors we report in one line.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    stores = None
    try:
        settings = RelaySettings.from_env()
        stores = _Stores(settings, start_embedded=getattr(args, "start_embedded_postgres", True))
        with postgres_errors_translated(lambda: stores.outbox_url):
            return args.handler(stores, args)
    except OutboxPipelineError as exc:
        print(f"outbox-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as exc:
        print(f"outbox-pipeline: error: PostgreSQL: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("outbox-pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"outbox-pipeline: error: unexpected {type(exc).__name__}: {one_line(exc)} (rerun with --traceback for details)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if stores is not None:
            try:
                stores.close()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main())
