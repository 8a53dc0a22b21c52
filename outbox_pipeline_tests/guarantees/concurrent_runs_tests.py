"""Relay runs at once, while producers keep publishing, and a zombie run: exactly once.

Every process is real: two keep running the Dagster job process_outbox_events,
two keep running the Relay.drain loop, and two run `outbox-pipeline demo`,
all against one PostgreSQL database and one ClickHouse (the chDB HTTP test
server, which several processes can share as they would share a server).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import relay_environment
from outbox_pipeline_tests.support.clickhouse_http_server import clear_faults, get_faults, running_clickhouse_http_server, set_faults
from outbox_pipeline_tests.support.relay_runs import publish_raw
from outbox_pipeline_tests.support.relay_worker import start_worker, summary_of

PRODUCERS = 2
EVENTS_PER_PRODUCER = 50_000
BATCH = "2500"


def outbox_pipeline_command(*args: str) -> list[str]:
    executable = shutil.which("outbox-pipeline", path=os.path.dirname(sys.executable))
    return [*([executable] if executable else [sys.executable, "-m", "outbox_pipeline.cli"]), *args]


def outbox_pipeline(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(outbox_pipeline_command(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def shared_clickhouse_env(outbox_database_url, tmp_path):
    with running_clickhouse_http_server(tmp_path / "clickhouse") as url:
        env = {**relay_environment(outbox_database_url, url, tmp_path / "state"), "OUTBOX_RETRY_BASE_SECONDS": "0.05"}
        outbox_pipeline("init", env=env)
        yield env


def overlapping_range_batches(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            """
            SELECT count(*) FROM outbox_batch a JOIN outbox_batch b ON a.id < b.id
            WHERE a.kind = 'range' AND b.kind = 'range' AND a.relay = b.relay
              AND (a.first_txid, a.first_id) <= (b.last_txid, b.last_id)
              AND (b.first_txid, b.first_id) <= (a.last_txid, a.last_id)
            """
        ).fetchone()[0]


def test_four_relays_and_two_producers_at_once_deliver_every_event_exactly_once(shared_clickhouse_env, tmp_path):
    env = shared_clickhouse_env
    stop = tmp_path / "producers-done"
    until = ("--until-file", str(stop), "--batch-size", BATCH)
    workers = [
        start_worker("job", *until, "--max-batches", "3", env=env, log=tmp_path / "job-1.log"),
        start_worker("job", *until, "--max-batches", "3", env=env, log=tmp_path / "job-2.log"),
        start_worker("drain", *until, env=env, log=tmp_path / "drain-1.log"),
        start_worker("drain", *until, env=env, log=tmp_path / "drain-2.log"),
    ]
    for worker in workers:
        assert worker.stdout.readline().strip() == "READY"

    producers = [
        subprocess.Popen(
            outbox_pipeline_command("demo", "--count", str(EVENTS_PER_PRODUCER), "--rate", "10000"),
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(PRODUCERS)
    ]
    for producer in producers:
        out, err = producer.communicate(timeout=300)
        assert producer.returncode == 0, err
    stop.touch()
    summaries = []
    for worker, log in zip(workers, ("job-1", "job-2", "drain-1", "drain-2")):
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, (tmp_path / f"{log}.log").read_text()[-3000:]
        summaries.append(summary_of(out))

    final = outbox_pipeline("relay", env=env)
    status = json.loads(outbox_pipeline("status", "--json", env=env).stdout)

    published = PRODUCERS * EVENTS_PER_PRODUCER
    assert status["clickhouse_rows"] == status["clickhouse_distinct_event_ids"] == status["processed"] == published, status
    assert (status["pending"], status["failed"], status["in_flight"]) == (0, 0, 0)
    loaded_by_workers = sum(s["events_loaded"] for s in summaries)
    loaded_at_the_end = int(final.stdout.split()[1])
    assert loaded_by_workers + loaded_at_the_end == published, (summaries, final.stdout)
    # The runs really ran side by side, and no two batches ever held the same event.
    assert sum(1 for s in summaries if s["events_loaded"]) >= 2, summaries
    assert overlapping_range_batches(env["OUTBOX_DATABASE_URL"]) == 0


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_zombie_run_still_inserting_after_its_lease_expired_and_the_run_that_took_over_leave_one_copy(shared_clickhouse_env):
    env = shared_clickhouse_env
    publish_raw(env["OUTBOX_DATABASE_URL"], 1_000)
    policy = RelayPolicy(batch_size=1_000, lease_seconds=0.5, retry=BackoffPolicy(attempts=3, base_seconds=0.01))
    stores = [(OutboxStore.connect(env["OUTBOX_DATABASE_URL"]), EventLogStore.connect(env["CLICKHOUSE_URL"])) for _ in range(2)]
    zombie, successor = (Relay(outbox, event_log, policy, claimed_by=name) for (outbox, event_log), name in zip(stores, ("zombie", "successor")))
    watcher = OutboxStore.connect(env["OUTBOX_DATABASE_URL"])
    try:
        # The zombie's insert hangs (a GC pause, a slow network) past its lease.
        set_faults(env["CLICKHOUSE_URL"], delay_seconds=2.0, match="INSERT INTO")
        zombie_totals = []
        thread = threading.Thread(target=lambda: zombie_totals.append(zombie.drain(max_batches=1)))
        thread.start()
        # The zombie's insert is on its way, and its lease has run out meanwhile.
        wait_until(lambda: get_faults(env["CLICKHOUSE_URL"])["injected"]["delay"] == 1)
        wait_until(lambda: watcher.conn.execute("SELECT count(*) FROM outbox_batch WHERE lease_expires_at < now()").fetchone()[0])
        clear_faults(env["CLICKHOUSE_URL"])

        successor_totals = successor.drain()
        thread.join(timeout=60)

        # Both inserted the same block under the same token; the zombie's late mark was refused.
        assert successor_totals.events_loaded == 1_000
        assert zombie_totals[0].events_loaded == 0
        assert watcher.conn.execute("SELECT state, claimed_by, claim_count FROM outbox_batch").fetchall() == [("done", "successor", 2)]
        assert stores[0][1].counts() == (1_000, 1_000)
        counts = watcher.counts()
        assert (counts.pending, counts.processed) == (0, 1_000)
    finally:
        for outbox, event_log in stores:
            outbox.close()
            event_log.close()
        watcher.close()
