"""Latency from commit to visible in ClickHouse under a steady producer, for both relay modes.

Each event's ``event_date_time`` is set just before its transaction commits, and
ClickHouse stamps ``loaded_at`` when the relay's insert lands: the difference is
the delivery latency. The producer commits 10 events at a time at a steady rate.

* sensor path: every OUTBOX_SENSOR_INTERVAL_SECONDS, if work is pending, one
  ``process_outbox_events`` run (in process: a real deployment adds the daemon's
  run launch, about 1 s here, on top);
* low-latency mode: one ``relay_low_latency`` run woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid

import dagster as dg
import psycopg

from outbox_pipeline.stores.clickhouse_connection import clickhouse_client
from outbox_pipeline.stores.outbox_store import OutboxStore

EVENTS_PER_TRANSACTION = 10


def produce(
    database_url: str, environment: str, rate: float, stop: threading.Event, counter: list[int], info: dict | None = None,
    event_type: str = "latency_probe",
) -> None:
    """Commit ``rate`` events a second until ``stop``; ``counter[0]`` counts them, ``info`` gets the backend's pid."""
    with psycopg.connect(database_url) as conn:
        if info is not None:
            info["backend_pid"] = conn.info.backend_pid
        started = time.monotonic()
        sent = 0
        while not stop.is_set():
            rows = []
            for _ in range(EVENTS_PER_TRANSACTION):
                rows.append((uuid.uuid4(), event_type, dt.datetime.now(dt.UTC), environment, "{}"))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO outbox (event_id, event_type, event_date_time, environment, event_context) VALUES (%s, %s, %s, %s, %s)",
                    rows,
                )
            conn.commit()
            sent += len(rows)
            counter[0] = sent
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _quantiles(clickhouse_url: str, environment: str) -> tuple[int, float, float, float]:
    with clickhouse_client(clickhouse_url, busy_wait_seconds=30) as client:
        rows, p50, p95, p99 = client.query(
            "SELECT count(), quantileExact(0.5)(d), quantileExact(0.95)(d), quantileExact(0.99)(d) FROM "
            "(SELECT dateDiff('microsecond', event_date_time, loaded_at) / 1e6 AS d FROM event_log WHERE environment = {env:String})",
            parameters={"env": environment},
        ).result_rows[0]
    return int(rows), float(p50), float(p95), float(p99)


# Sensor-path runs here end with their backlog, as runs of the first release did (no following).
BACKLOG_ONLY = {"ops": {"follow_outbox": {"config": {"follow_seconds": 0}}}}


def _job(name: str):
    from outbox_pipeline.definitions import defs

    return defs.resolve_job_def(name)


def _drain_remaining(instance: dg.DagsterInstance, resources: dict) -> None:
    _job("process_outbox_events").execute_in_process(instance=instance, resources=resources, run_config=BACKLOG_ONLY)


def measure_sensor_path(database_url: str, clickhouse_url: str, seconds: float, rate: float, interval: float) -> tuple:
    from outbox_pipeline.definitions import build_resources

    process_outbox_events = _job("process_outbox_events")
    environment = "latency-sensor-path"
    stop, counter = threading.Event(), [0]
    producer = threading.Thread(target=produce, args=(database_url, environment, rate, stop, counter))
    resources = build_resources()
    with dg.instance_for_test() as instance:
        producer.start()
        deadline = time.monotonic() + seconds
        store = OutboxStore.connect(database_url)
        try:
            while time.monotonic() < deadline:
                tick = time.monotonic()
                if store.has_pending_work():
                    process_outbox_events.execute_in_process(instance=instance, resources=resources, run_config=BACKLOG_ONLY)
                time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        finally:
            stop.set()
            producer.join()
            store.close()
        _drain_remaining(instance, resources)
    return _quantiles(clickhouse_url, environment)


def measure_low_latency(database_url: str, clickhouse_url: str, seconds: float, rate: float) -> tuple:
    from outbox_pipeline.definitions import build_resources

    relay_low_latency = _job("relay_low_latency")
    environment = "latency-low-latency"
    stop, counter = threading.Event(), [0]
    producer = threading.Thread(target=produce, args=(database_url, environment, rate, stop, counter))
    resources = build_resources()
    # The producer stops a moment before the run ends, so every event is relayed by it.
    timer = threading.Timer(seconds, stop.set)
    with dg.instance_for_test() as instance:
        producer.start()
        timer.start()
        relay_low_latency.execute_in_process(
            instance=instance, resources=resources,
            run_config={"ops": {"relay_continuously": {"config": {"max_seconds": seconds + 2}}}},
        )
        producer.join()
        _drain_remaining(instance, resources)
    return _quantiles(clickhouse_url, environment)


def measure_latency_modes(database_url: str, clickhouse_url: str, *, seconds: float, rate: float, interval: float = 5.0) -> None:
    logging.disable(logging.CRITICAL)
    results = {
        f"sensor path (tick every {interval:.0f} s, run in process)": measure_sensor_path(database_url, clickhouse_url, seconds, rate, interval),
        "low-latency mode (LISTEN/NOTIFY)": measure_low_latency(database_url, clickhouse_url, seconds, rate),
    }
    print(f"\ncommit-to-ClickHouse latency at {rate:,.0f} events/s for {seconds:.0f} s")
    width = max(len(label) for label in results)
    print(f"{'':<{width}}  {'events':>8}  {'p50 s':>7}  {'p95 s':>7}  {'p99 s':>7}")
    for label, (rows, p50, p95, p99) in results.items():
        print(f"{label:<{width}}  {rows:>8,}  {p50:>7.3f}  {p95:>7.3f}  {p99:>7.3f}")
