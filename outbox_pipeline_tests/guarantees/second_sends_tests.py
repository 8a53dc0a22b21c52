"""Second sends never leave a second copy, even on a table that keeps no insert tokens.

Every test runs on ``event_log`` with ``non_replicated_deduplication_window = 0`` (ClickHouse
forgets every token at once, as a replicated table does after its window) and merges stopped
(no merge of ReplacingMergeTree may hide a copy): ``count()`` must equal the events. ClickHouse
is the test suite's chDB HTTP server, shared by the test and the relay processes as a server
would be; its faults really drop connections, and the relay runs that die really get SIGKILLed.
"""

import datetime as dt
import signal
import threading
import time

import dagster as dg
import pytest

from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store, prepare_relay
from outbox_pipeline_tests.operations.support import lose_rows, publish_on, publish_poison, run_replay, utc_today
from outbox_pipeline_tests.support.clickhouse_http_server import get_faults, running_clickhouse_http_server, set_faults
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay
from outbox_pipeline_tests.support.relay_worker import run_worker


@pytest.fixture
def forgetful(monkeypatch, tmp_path, outbox_database_url):
    """A relay environment on the HTTP server whose event_log remembers no token and never merges."""
    with running_clickhouse_http_server(tmp_path / "clickhouse") as url:
        env = prepare_relay(monkeypatch, outbox_database_url, url, tmp_path / "state")
        monkeypatch.setenv("OUTBOX_LEASE_SECONDS", "1")
        env["OUTBOX_LEASE_SECONDS"] = "1"
        with event_log_store(url) as event_log:
            event_log.client.command("ALTER TABLE event_log MODIFY SETTING non_replicated_deduplication_window = 0")
            event_log.client.command("SYSTEM STOP MERGES event_log")
        outbox = OutboxStore.connect(outbox_database_url)
        yield env, outbox
        outbox.close()


class SlowRetry(BackoffPolicy):
    """A wait before each retry long enough for another run to take the batch over."""

    def backoff(self, attempt: int) -> float:
        return 8.0


def counts(env: dict) -> tuple[int, int]:
    with event_log_store(env["CLICKHOUSE_URL"]) as event_log:
        return event_log.counts()


def wait_for_expired_leases(outbox: OutboxStore, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while outbox.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at >= now()").fetchone()[0]:
        assert time.monotonic() < deadline, "the leases never expired"
        time.sleep(0.2)


def claim_counts(outbox: OutboxStore) -> list[int]:
    return [row[0] for row in outbox.conn.execute("SELECT claim_count FROM outbox_batch ORDER BY id").fetchall()]


def test_a_batch_retaken_after_its_run_died_between_insert_and_mark(forgetful):
    env, outbox = forgetful
    # Batches of 8,000: a block's lookup is more event_ids than one query's text may carry (max_query_size).
    publish_raw(env["OUTBOX_DATABASE_URL"], 24_000)
    died = run_worker("job", "--kill-after", "insert", "--kill-at", "1", "--batch-size", "8000", env=env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert counts(env) == (8_000, 8_000)  # in ClickHouse, not marked

    wait_for_expired_leases(outbox)
    assert run_relay(run_config={"batch_size": 8_000}).success

    assert counts(env) == (24_000, 24_000)
    assert max(claim_counts(outbox)) == 2  # the dead run's batches were taken over and sent again
    assert outbox.counts().processed == 24_000


def test_an_insert_resent_after_the_connection_broke_after_it_ran(forgetful):
    env, outbox = forgetful
    publish_raw(env["OUTBOX_DATABASE_URL"], 500)
    # ClickHouse writes the first two inserts, then drops their connections: the outcome is unknown to the relay.
    set_faults(env["CLICKHOUSE_URL"], reset_next_n=2, reset_after_execute=True, match=r"INSERT INTO .*event_log")

    assert run_relay(run_config={"batch_size": 200}).success

    assert get_faults(env["CLICKHOUSE_URL"])["injected"]["reset"] == 2
    assert counts(env) == (500, 500)
    assert outbox.counts().processed == 500


def test_a_zombie_that_lost_its_lease_while_waiting_to_retry_sends_nothing(forgetful):
    env, outbox = forgetful
    url = env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 300)
    set_faults(env["CLICKHOUSE_URL"], reset_next_n=1, reset_after_execute=True, match=r"INSERT INTO .*event_log")
    # The zombie's insert lands, its connection breaks, and it waits 8 s to retry: far longer than its 1 s lease.
    zombie_store = OutboxStore.connect(url)
    zombie_log = EventLogStore.connect(env["CLICKHOUSE_URL"])
    zombie = Relay(zombie_store, zombie_log, RelayPolicy(batch_size=1_000, lease_seconds=1, retry=SlowRetry(3)), claimed_by="zombie")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(totals=zombie.drain()))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while get_faults(env["CLICKHOUSE_URL"])["injected"].get("reset", 0) < 1:
            assert time.monotonic() < deadline, "the zombie's insert never ran"
            time.sleep(0.05)
        wait_for_expired_leases(outbox)
        # Meanwhile another run takes the batch over: its second send finds the zombie's rows and adds none.
        assert run_relay(run_config={"batch_size": 1_000}).success
        assert counts(env) == (300, 300)
    finally:
        thread.join(timeout=60)
        zombie_store.close()
        zombie_log.close()
    # The zombie, back from its wait, saw the batch was another run's and sent nothing more.
    assert outcome["totals"].events_loaded == 0
    assert counts(env) == (300, 300)
    assert claim_counts(outbox) == [2]
    assert outbox.counts().processed == 300


def test_the_halves_of_a_split_batch_resent_by_the_run_that_took_it_over(forgetful):
    env, outbox = forgetful
    url = env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 200)
    publish_poison(url, utc_today())
    publish_raw(url, 200, start=200)
    # The whole batch is rejected and split; the run dies right after a half was written.
    died = run_worker("job", "--kill-after", "insert", "--kill-at", "1", "--batch-size", "1000", env=env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    landed = counts(env)[0]
    assert 0 < landed < 400

    wait_for_expired_leases(outbox)
    assert run_relay(run_config={"batch_size": 1_000}).success

    assert counts(env) == (400, 400)
    state = outbox.counts()
    assert (state.processed, state.failed + state.pending) == (400, 1)


def test_a_replay_resent_after_the_connection_broke_after_it_ran(forgetful):
    env, outbox = forgetful
    url = env["OUTBOX_DATABASE_URL"]
    day = utc_today() - dt.timedelta(days=1)
    events = publish_on(url, day, 250)
    assert run_relay(run_config={"batch_size": 100}).success
    lost = [str(event.event_id) for event in events[::5]]
    with event_log_store(env["CLICKHOUSE_URL"]) as event_log:
        # A lightweight delete is a mutation, which runs only while merges do; no copy exists yet to merge away.
        event_log.client.command("SYSTEM START MERGES event_log")
        lose_rows(event_log, lost)
        event_log.client.command("SYSTEM STOP MERGES event_log")
    assert counts(env) == (200, 200)
    set_faults(env["CLICKHOUSE_URL"], reset_next_n=1, reset_after_execute=True, match=r"INSERT INTO .*event_log")

    replayed = run_replay(day, dg.DagsterInstance.ephemeral(), chunk_size=1_000)

    assert replayed.success
    assert get_faults(env["CLICKHOUSE_URL"])["injected"]["reset"] == 1
    assert counts(env) == (250, 250)
    assert run_replay(day, chunk_size=1_000).output_for_node("replay_outbox_day")["inserted"] == 0
    assert counts(env) == (250, 250)
