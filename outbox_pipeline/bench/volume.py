"""The outbox at volume: what the application's PostgreSQL pays, partitioned (schema 6) beside unpartitioned (schema 3).

For each layout, on a fresh database of the same server:

* footprint: µs per event of a producer's ``publish_many`` of 1,000 and of a call of
  one event (each its own commit), and bytes per event on disk (heap and indexes);
* sustained load: producer processes commit ``rate`` events/s (100 per transaction)
  while a relay follows them into chDB (it looks for work every second); PostgreSQL's
  CPU (every server process) and WAL bytes per event, and the commit-to-ClickHouse lag;
* retiring a day: a past day of N delivered events is removed by retention, for each N
  (a DROP of its partition, against deletes in chunks of 10,000 on schema 3), with its WAL.

Schema 3 is the release before partitions; its relay statements are the same, so this
release's relay runs on it unchanged.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import statistics
import time
import uuid

import psutil
import psycopg

from outbox_pipeline.producer import publish, publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.stores import migrations, partitions, replay_retention
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore

PARTITIONED_SINCE = 6
LAYOUTS = {"unpartitioned (schema 3)": 3, "partitioned (this release)": migrations.LATEST_VERSION}
EVENTS_PER_TRANSACTION = 100
CONTEXT = '{"order_id": "9f0c1e52-3b0a-4c55-9d6e-2f7f1d6a8b10", "amount": "129.90", "currency": "EUR", "items": 3}'
RETIRED_DAY_OFFSET = 30  # days ago


class _SchemaThreeStore(OutboxStore):
    """This release's relay statements on the unpartitioned outbox of schema 3 (they are the same there)."""

    def _relay_conn(self) -> psycopg.Connection:
        if not self._ready:
            self._register()
            self._ready = True
        return self.conn


def _server_cpu_seconds(conn: psycopg.Connection) -> float:
    (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
    postmaster = psutil.Process(pid).parent()
    total = 0.0
    for process in [postmaster, *postmaster.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _wal_lsn(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def _wal_bytes_since(conn: psycopg.Connection, lsn: str) -> int:
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()[0])


def _fresh_database(server_url: str, name: str, version: int) -> str:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.apply_migrations(conn, up_to=version)
    if version == migrations.LATEST_VERSION:
        store = OutboxStore.connect(url)
        store.migrate()  # and the days' partitions
        store.close()
    return url


def _store(url: str, version: int) -> OutboxStore:
    return OutboxStore.connect(url) if version == migrations.LATEST_VERSION else _SchemaThreeStore.connect(url)


def measure_footprint(url: str, *, calls_of_many: int = 30, single_calls: int = 3_000) -> dict:
    """Medians of the calls' own times (commits apart), after a warm-up: one call's cost, not the machine's noise."""
    many, single = [], []
    with psycopg.connect(url) as conn:
        for _ in range(calls_of_many):
            call = [RawEvent(event_type="order_paid", context=CONTEXT) for _ in range(1_000)]
            started = time.perf_counter()
            publish_many(conn, call)
            many.append(time.perf_counter() - started)
            conn.commit()
        # A commit per event costs a WAL flush, whatever the indexes: timed apart.
        for _ in range(single_calls):
            event = RawEvent(event_type="order_paid", context=CONTEXT)
            started = time.perf_counter()
            publish(conn, event)
            single.append(time.perf_counter() - started)
            conn.commit()
    warm = slice(len(many) // 3, None), slice(len(single) // 3, None)
    return {"publish_many_us": statistics.median(many[warm[0]]) / 1_000 * 1e6, "publish_one_us": statistics.median(single[warm[1]]) * 1e6}


def _produce(url: str, rate: float, seconds: float, environment: str, counter, slowest) -> None:
    with psycopg.connect(url) as conn:
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds:
            # event_date_time just before the commit: the lag is measured from it.
            now = dt.datetime.now(dt.UTC)
            call_started = time.monotonic()
            publish_many(conn, [
                RawEvent(event_id=uuid.uuid4(), event_type="order_paid", context=CONTEXT, environment=environment, event_date_time=now)
                for _ in range(EVENTS_PER_TRANSACTION)
            ])
            conn.commit()
            took = time.monotonic() - call_started
            sent += EVENTS_PER_TRANSACTION
            with counter.get_lock():
                counter.value += EVENTS_PER_TRANSACTION
                slowest.value = max(slowest.value, took)
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def measure_sustained(url: str, version: int, clickhouse_url: str, *, rate: float, seconds: float, producers: int) -> dict:
    environment = f"volume-{version}"
    store = _store(url, version)
    event_log = EventLogStore.connect(clickhouse_url)
    event_log.migrate()
    relay = Relay(store, event_log, RelayPolicy(batch_size=100_000), claimed_by="volume-bench")
    relay.drain()  # the footprint's events
    context = multiprocessing.get_context("spawn")
    counter, slowest = context.Value("q", 0), context.Value("d", 0.0)
    with psycopg.connect(url, autocommit=True) as conn:
        cpu, lsn = _server_cpu_seconds(conn), _wal_lsn(conn)
        workers = [context.Process(target=_produce, args=(url, rate / producers, seconds, environment, counter, slowest))
                   for _ in range(producers)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            if relay.drain().events_loaded == 0:
                time.sleep(1.0)
        relay.drain()
        elapsed = time.monotonic() - started
        cpu, wal = _server_cpu_seconds(conn) - cpu, _wal_bytes_since(conn, lsn)
    events = counter.value
    rows, p50, p95 = event_log.client.query(
        "SELECT count(), quantileExact(0.5)(d), quantileExact(0.95)(d) FROM (SELECT dateDiff('microsecond', event_date_time, "
        "loaded_at) / 1e6 AS d FROM event_log WHERE environment = {env:String})",
        parameters={"env": environment},
    ).result_rows[0]
    event_log.close()
    store.close()
    return {
        "rate_achieved": events / seconds, "relay_seconds": elapsed, "events": events, "delivered": int(rows), "lag_p50": float(p50), "lag_p95": float(p95),
        "pg_cpu_us_per_event": cpu / max(events, 1) * 1e6, "wal_bytes_per_event": wal / max(events, 1),
    }


def measure_bytes(url: str) -> dict:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")
        (rows,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    store = OutboxStore(psycopg.connect(url, autocommit=True))
    stats = store.table_statistics()
    store.close()
    return {"bytes_per_event": stats["total_bytes"] / rows, "heap_bytes_per_event": stats["heap_bytes"] / rows,
            "index_bytes_per_event": stats["index_bytes"] / rows, "indexes": _index_count(url)}


def _index_count(url: str) -> int:
    """Indexes a producer's insert updates: those of the table (or partition) holding the newest event."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = (SELECT tableoid FROM outbox ORDER BY id DESC LIMIT 1)"
        ).fetchone()[0]


def measure_retire_day(url: str, version: int, events: int) -> dict:
    """A day ``RETIRED_DAY_OFFSET`` days ago holding ``events`` delivered events, retired by this layout's retention."""
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=RETIRED_DAY_OFFSET)
    noon = dt.datetime.combine(day, dt.time(12), dt.UTC)
    with psycopg.connect(url, autocommit=True) as conn:
        if version == migrations.LATEST_VERSION:
            partitions.create_partitions(conn, day, day)
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context, created_at) "
            "SELECT gen_random_uuid(), 'order_paid', %(noon)s, 'retired', %(context)s, %(noon)s FROM generate_series(1, %(n)s)",
            {"noon": noon, "context": CONTEXT, "n": events},
        )
        conn.execute("VACUUM ANALYZE outbox")
        # Delivered: every relay's cursor past them.
        conn.execute("UPDATE outbox_relay_cursor SET (claimed_txid, claimed_id) = (SELECT txid, id FROM outbox ORDER BY txid DESC, id DESC LIMIT 1)")
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
        lsn = _wal_lsn(conn)
        cpu = _server_cpu_seconds(conn)
        started = time.perf_counter()
        if version == migrations.LATEST_VERSION:
            outcomes = partitions.drop_delivered_partitions(conn, cutoff)
            assert [o.outcome for o in outcomes if o.ends <= cutoff] == ["dropped"], outcomes
        else:
            while replay_retention.delete_processed_before(conn, cutoff, chunk_size=10_000, table="outbox") == 10_000:
                pass
        seconds = time.perf_counter() - started
        cpu, wal = _server_cpu_seconds(conn) - cpu, _wal_bytes_since(conn, lsn)
        (left,) = conn.execute("SELECT count(*) FROM outbox WHERE environment = 'retired'").fetchone()
    assert left == 0, f"{left} events of the retired day are still there"
    return {"seconds": seconds, "wal_bytes": wal, "pg_cpu_seconds": cpu}


def measure_upgrade(url: str, *, events: int, rate: float, producers: int) -> dict:
    """Schema 3 holding ``events`` events upgraded to this release while producers commit ``rate`` events/s."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context) "
            "SELECT gen_random_uuid(), 'order_paid', now(), 'upgrade', %s FROM generate_series(1, %s)",
            (CONTEXT, events),
        )
        conn.execute("VACUUM ANALYZE outbox")
    context = multiprocessing.get_context("spawn")
    counter, slowest = context.Value("q", 0), context.Value("d", 0.0)
    workers = [context.Process(target=_produce, args=(url, rate / producers, 3_600, "upgrade", counter, slowest))
               for _ in range(producers)]
    for worker in workers:
        worker.start()
    while counter.value < rate:  # producers warmed up: a second's worth written
        time.sleep(0.1)
    with counter.get_lock():
        slowest.value = 0.0
    store = OutboxStore.connect(url)
    started = time.perf_counter()
    applied = store.migrate()
    seconds = time.perf_counter() - started
    time.sleep(2)
    for worker in workers:
        worker.terminate()
        worker.join()
    with psycopg.connect(url) as conn:
        (partitioned,) = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = 'outbox'::regclass").fetchone()
    store.close()
    assert applied and partitioned
    return {"upgrade_seconds": seconds, "upgrade_slowest_commit": slowest.value, "upgrade_rows": events}


def run_volume_bench(server_url: str, clickhouse_url: str, *, rate: float, seconds: float, producers: int, retire: list[int]) -> dict:
    results: dict[str, dict] = {}
    for layout, version in LAYOUTS.items():
        url = _fresh_database(server_url, f"outbox_volume_{version}", version)
        print(f"{layout}: footprint ...", flush=True)
        result = measure_footprint(url)
        print(f"{layout}: {rate:,.0f} events/s for {seconds:.0f} s ...", flush=True)
        result.update(measure_sustained(url, version, clickhouse_url, rate=rate, seconds=seconds, producers=producers))
        result.update(measure_bytes(url))
        for events in retire:
            print(f"{layout}: retiring a day of {events:,} events ...", flush=True)
            result[f"retire_{events}"] = measure_retire_day(url, version, events)
        if version < PARTITIONED_SINCE:
            print(f"{layout}: upgrading with {max(retire):,} events in it while producers write ...", flush=True)
            upgrade = measure_upgrade(url, events=max(retire), rate=rate, producers=producers)
        # A day at the asked rate: the largest day measured, scaled by rows where retiring costs per row.
        largest = result[f"retire_{max(retire)}"]["seconds"]
        result["day_seconds"] = largest * (rate * 86_400 / max(retire) if version < PARTITIONED_SINCE else 1)
        results[layout] = result
    print_volume_table(results, rate, retire)
    print(f"\nupgrade of the unpartitioned outbox holding {upgrade['upgrade_rows']:,} events to this release, producers writing "
          f"{rate:,.0f} events/s: {upgrade['upgrade_seconds']:.1f} s in all; the slowest producer transaction "
          f"({EVENTS_PER_TRANSACTION} events) took {upgrade['upgrade_slowest_commit'] * 1000:.0f} ms")
    return results


def print_volume_table(results: dict[str, dict], rate: float, retire: list[int]) -> None:
    names = list(results)
    rows = [
        ("indexes on the outbox", lambda r: f"{r['indexes']}"),
        ("bytes per event (heap + indexes)", lambda r: f"{r['bytes_per_event']:.0f} ({r['heap_bytes_per_event']:.0f} + {r['index_bytes_per_event']:.0f})"),
        ("publish_many of 1,000: µs per event (median)", lambda r: f"{r['publish_many_us']:.1f}"),
        ("publish of one event, before its commit: µs (median)", lambda r: f"{r['publish_one_us']:.0f}"),
        (f"producer rate achieved (asked {rate:,.0f}/s)", lambda r: f"{r['rate_achieved']:,.0f}/s"),
        ("delivered / published", lambda r: f"{r['delivered']:,} / {r['events']:,}"),
        ("lag p50 / p95, s (relay looks every 1 s)", lambda r: f"{r['lag_p50']:.2f} / {r['lag_p95']:.2f}"),
        ("PostgreSQL CPU per event, µs", lambda r: f"{r['pg_cpu_us_per_event']:.1f}"),
        ("WAL per event, bytes", lambda r: f"{r['wal_bytes_per_event']:.0f}"),
    ]
    for events in retire:
        rows.append((f"retire a day of {events:,}: s / WAL MB", lambda r, n=events: f"{r[f'retire_{n}']['seconds']:.3f} / {r[f'retire_{n}']['wal_bytes'] / 1e6:.1f}"))
    rows.append((
        f"a day at {rate:,.0f}/s ({rate * 86_400 / 1e6:,.0f}M events): s (scaled from {max(retire):,} where per row)",
        lambda r: f"{r['day_seconds']:,.1f}",
    ))
    width = max(len(label) for label, _ in rows)
    print()
    print(f"| {'':{width}} | " + " | ".join(names) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * (len(n) + 1) + ":" for n in names) + "|")
    for label, cell in rows:
        print(f"| {label:{width}} | " + " | ".join(f"{cell(results[n]):>{len(n)}}" for n in names) + " |")
