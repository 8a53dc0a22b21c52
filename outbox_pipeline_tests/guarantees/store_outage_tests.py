"""ClickHouse or PostgreSQL failing during a run: retried, then success or a clean failure; nothing lost, nothing doubled.

ClickHouse is the chDB HTTP test server, which answers 503, drops connections
(before or after executing the insert) or is not there at all; PostgreSQL is
real and its backend is really terminated with pg_terminate_backend. Retries
are counted where an operator sees them: the run's Sentry transaction
(recorded by the real sentry-sdk transport) and the counters of the server.
"""

import logging
import re

import dagster as dg
import psycopg
import pytest

from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store, prepare_relay
from outbox_pipeline_tests.support.clickhouse_http_server import (
    clear_faults,
    closed_port_url,
    get_faults,
    running_clickhouse_http_server,
    set_faults,
)
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

EVENTS = 500
BATCH = 200  # three batches per run


@pytest.fixture
def http_relay_env(monkeypatch, tmp_path, outbox_database_url):
    """A relay environment whose ClickHouse is the HTTP test server; yields (env, OutboxStore)."""
    with running_clickhouse_http_server(tmp_path / "clickhouse") as url:
        env = prepare_relay(monkeypatch, outbox_database_url, url, tmp_path / "state")
        outbox = OutboxStore.connect(outbox_database_url)
        yield env, outbox
        outbox.close()


def clickhouse_counts(url: str) -> tuple[int, int]:
    with event_log_store(url) as event_log:
        return event_log.counts()


def outbox_state(outbox: OutboxStore) -> tuple[int, int, int]:
    counts = outbox.counts()
    return counts.pending, counts.processed, counts.failed


def run_transaction_data(recorder) -> dict:
    [transaction] = recorder.wait_for(lambda r: [p for p in r.payloads("transaction") if p.get("transaction") == "process_outbox_events"])
    return transaction["contexts"]["trace"]["data"]


def failure_messages(result) -> list[str]:
    """What the Dagster UI shows for each failed step: the op's own exception, below Dagster's wrapper."""
    messages = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
            error = error.cause
        messages.append(f"{error.cls_name}: {error.message.strip().split(': ', 1)[-1]}")
    return messages


def live_leases(outbox: OutboxStore) -> int:
    return outbox.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at > now()").fetchone()[0]


def test_503_on_the_first_requests_is_retried_and_the_run_succeeds_exactly_once(http_relay_env, sentry_recorder, monkeypatch):
    env, outbox = http_relay_env
    monkeypatch.setenv("SENTRY_CONFIG_DSN", sentry_recorder.dsn)
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    # Every request fails, the relay's first connection included, until three have failed.
    set_faults(env["CLICKHOUSE_URL"], fail_next_n=3, fail_status=503)

    result = run_relay(run_config={"batch_size": BATCH})

    assert result.success, failure_messages(result)
    assert get_faults(env["CLICKHOUSE_URL"])["injected"]["fail"] == 3
    assert run_transaction_data(sentry_recorder)["retry_attempts"] == 3
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)


def test_each_retry_is_a_warning_in_the_run_log(http_relay_env):
    env, outbox = http_relay_env
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    set_faults(env["CLICKHOUSE_URL"], fail_next_n=2, fail_status=503, match="INSERT INTO")
    instance = dg.DagsterInstance.ephemeral()

    result = run_relay(instance, run_config={"batch_size": BATCH})

    assert result.success, failure_messages(result)
    warnings = [entry for entry in instance.all_logs(result.run_id) if entry.level == logging.WARNING]
    assert [entry.user_message for entry in warnings] == [
        entry.user_message for entry in warnings if re.fullmatch(
            r"inserting into ClickHouse failed \(.*503.*\); attempt \d of 5 in \d+\.\d\d s", entry.user_message
        )
    ]
    # The first batch's insert failed twice: its second and third attempts follow, each announced in its step.
    assert [re.search(r"attempt \d of 5", entry.user_message).group() for entry in warnings] == ["attempt 2 of 5", "attempt 3 of 5"]
    assert all(entry.step_key and entry.step_key.startswith("load_batch[") for entry in warnings)


def test_clickhouse_failing_every_insert_fails_the_run_in_one_line_and_a_later_run_delivers(http_relay_env):
    env, outbox = http_relay_env
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    set_faults(env["CLICKHOUSE_URL"], fail_next_n=1_000_000, fail_status=503, match="INSERT INTO")

    failed = run_relay(run_config={"batch_size": BATCH})

    assert not failed.success
    messages = failure_messages(failed)
    assert messages, "the run failed without a failed step"
    for message in messages:
        assert message.startswith("RetriesExhaustedError: inserting into ClickHouse failed 5 times in a row"), message
        assert "nothing was lost" in message and "\n" not in message.strip(), message
    assert outbox_state(outbox) == (EVENTS, 0, 0)
    # The failed run gave its batches back at once: the next run needs no lease to expire.
    assert live_leases(outbox) == 0

    clear_faults(env["CLICKHOUSE_URL"])
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (0, 0)
    assert run_relay(run_config={"batch_size": BATCH}).success
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)


def test_clickhouse_not_listening_fails_the_run_in_one_line_and_a_later_run_delivers(http_relay_env, monkeypatch):
    env, outbox = http_relay_env
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    monkeypatch.setenv("CLICKHOUSE_URL", closed_port_url())

    failed = run_relay(run_config={"batch_size": BATCH})

    assert not failed.success
    messages = failure_messages(failed)
    assert messages, "the run failed without a failed step"
    for message in messages:
        assert message.startswith("RetriesExhaustedError: connecting to ClickHouse failed 5 times in a row"), message
        assert "connection refused" in message and "\n" not in message, message
    assert outbox_state(outbox) == (EVENTS, 0, 0)
    assert live_leases(outbox) == 0

    monkeypatch.setenv("CLICKHOUSE_URL", env["CLICKHOUSE_URL"])
    assert run_relay(run_config={"batch_size": BATCH}).success
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)


def test_connection_reset_after_the_insert_executed_is_retried_and_deduplicated(http_relay_env, sentry_recorder, monkeypatch):
    env, outbox = http_relay_env
    monkeypatch.setenv("SENTRY_CONFIG_DSN", sentry_recorder.dsn)
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    # The first insert is written, then its connection dropped, twice. The body is streamed from
    # PostgreSQL, so clickhouse-connect cannot replay it: the relay's retries send it a second and a third time.
    set_faults(env["CLICKHOUSE_URL"], reset_next_n=2, reset_after_execute=True, match=r"INSERT INTO .*event_log")
    with event_log_store(env["CLICKHOUSE_URL"]) as event_log:
        event_log.client.command("SYSTEM STOP MERGES event_log")  # no merge may hide a second copy

    result = run_relay(run_config={"batch_size": BATCH})

    assert result.success, failure_messages(result)
    assert get_faults(env["CLICKHOUSE_URL"])["injected"]["reset"] == 2
    assert run_transaction_data(sentry_recorder)["retry_attempts"] == 2
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)


@pytest.mark.parametrize("method", ["claim_next_batch", "stream_block_csv", "complete_batch"])
def test_postgres_backend_terminated_mid_run_reconnects_and_the_run_succeeds(relay_env, outbox, monkeypatch, method):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    original = getattr(OutboxStore, method)
    terminated = []

    def terminate_own_backend_once(self, *args, **kwargs):
        if not terminated:
            # From another connection, as an operator or a failover would.
            with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"], autocommit=True) as admin:
                terminated.append(admin.execute("SELECT pg_terminate_backend(%s)", (self.conn.info.backend_pid,)).fetchone()[0])
        return original(self, *args, **kwargs)

    # The first call of this step (in the run's second batch for claims) meets a dead connection.
    monkeypatch.setattr(OutboxStore, method, terminate_own_backend_once)
    result = run_relay(run_config={"batch_size": BATCH})

    assert terminated == [True]
    assert result.success, failure_messages(result)
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)


def test_postgres_backend_terminated_while_a_batch_streams_into_clickhouse_reconnects(relay_env, outbox, monkeypatch):
    """Without read-ahead (a following run, the command line) the batch streams on the run's own connection."""
    from outbox_pipeline.relay.delivery import Relay, RelayPolicy
    from outbox_pipeline.relay.retrying import BackoffPolicy

    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    original = OutboxStore.stream_block_csv
    terminated = []

    def lose_the_backend_as_the_insert_starts_reading(self, *args, **kwargs):
        # Runs when the insert asks for the first piece: the ClickHouse request is under way.
        if not terminated:
            with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"], autocommit=True) as admin:
                terminated.append(admin.execute("SELECT pg_terminate_backend(%s)", (self.conn.info.backend_pid,)).fetchone()[0])
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(OutboxStore, "stream_block_csv", lose_the_backend_as_the_insert_starts_reading)
    store = OutboxStore.connect(relay_env["OUTBOX_DATABASE_URL"])
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        relay = Relay(store, event_log, RelayPolicy(batch_size=BATCH, retry=BackoffPolicy(5, 0.01)), claimed_by="test")
        totals = relay.drain()
        assert event_log.counts() == (EVENTS, EVENTS)
    store.close()
    assert terminated == [True]
    assert totals.events_loaded == EVENTS and relay.retries >= 1
    assert outbox_state(outbox) == (0, EVENTS, 0)


def test_a_failed_step_gives_back_every_batch_it_holds_and_the_next_run_leaves_no_duplicate(http_relay_env, monkeypatch):
    """The step's first batch reaches ClickHouse, then every insert fails: its inserted batch goes back too."""
    from outbox_pipeline.stores.event_log_store import EventLogStore

    env, outbox = http_relay_env
    publish_raw(env["OUTBOX_DATABASE_URL"], EVENTS)
    original = EventLogStore.insert_csv

    def clickhouse_fails_after_the_first_insert(self, *args, **kwargs):
        original(self, *args, **kwargs)
        set_faults(env["CLICKHOUSE_URL"], fail_next_n=1_000_000, fail_status=503, match="INSERT INTO")

    monkeypatch.setattr(EventLogStore, "insert_csv", clickhouse_fails_after_the_first_insert)
    failed = run_relay(run_config={"batch_size": BATCH})  # its three batches in one step

    assert not failed.success
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (BATCH, BATCH)
    assert outbox_state(outbox) == (EVENTS, 0, 0)
    assert live_leases(outbox) == 0  # all three, the inserted one too, taken again at once

    monkeypatch.setattr(EventLogStore, "insert_csv", original)
    clear_faults(env["CLICKHOUSE_URL"])
    assert run_relay(run_config={"batch_size": BATCH}).success
    assert clickhouse_counts(env["CLICKHOUSE_URL"]) == (EVENTS, EVENTS)
    assert outbox_state(outbox) == (0, EVENTS, 0)
