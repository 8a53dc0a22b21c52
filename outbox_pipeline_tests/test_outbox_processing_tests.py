"""Sentry monitoring of process_outbox_events, end to end.

Real runs of the job on real PostgreSQL and chDB, the real sentry-sdk and its
real HTTP transport, pointed at a recording server on 127.0.0.1
(outbox_pipeline_tests/support/sentry_recorder.py). ClickHouse failures come
from the chDB-backed ClickHouse HTTP test server answering 503.
"""

import logging
import os
import subprocess
import sys
import time
import urllib.parse

import dagster as dg
import psycopg
import pytest

from outbox_pipeline.monitoring.run_monitor import TRACE_ID_TAG, TRANSACTION_STATUS_TAG
from outbox_pipeline.orchestration.resources import ClickHouseResource
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.monitoring.envelopes import (
    ENVIRONMENT,
    PUBLIC_KEY,
    check_ins,
    errors,
    metrics,
    metrics_named,
    trace,
    transactions,
)
from outbox_pipeline_tests.support.clickhouse_http_server import closed_port_url, get_faults, running_clickhouse_http_server
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay
from outbox_pipeline_tests.support.sentry_recorder import SentryRecorder, unreachable_dsn

# 25 events in batches of 10: three batches (10, 10, 5).
EVENTS = 25
BATCH = {"batch_size": 10}
PASSWORD = "Zq9-w4Lk-Secret"


def chdb_path(relay_env: dict[str, str]) -> str:
    return relay_env["CLICKHOUSE_URL"].removeprefix("chdb://")


def spans_by_op(transaction: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for span in transaction["spans"]:
        out.setdefault(span["op"], []).append(span)
    return out


def test_process_outbox_events_sentry_integration(relay_env, outbox, recorder):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)

    instance = dg.DagsterInstance.ephemeral()
    result = run_relay(instance, run_config=BATCH)

    assert result.success
    # The monitor flushed before the run returned: no waiting here.
    [transaction] = transactions(recorder)
    assert transaction["transaction"] == "process_outbox_events"
    assert transaction["environment"] == ENVIRONMENT
    assert transaction["release"].startswith("outbox-pipeline@")
    assert trace(transaction)["op"] == "process_events"
    assert trace(transaction)["status"] == "ok"
    data = trace(transaction)["data"]
    assert data["batch_size"] == 10
    assert data["events_processed"] == EVENTS
    assert data["events_failed"] == 0
    assert data["batches"] == 3
    assert data["queue_size_before"] == EVENTS and data["queue_size_after"] == 0
    assert data["retry_attempts"] == 0 and data["failed_steps"] == 0
    assert data["duration"] > 0
    assert "error" not in data
    assert transaction["tags"]["dagster.run_id"] == result.run_id
    assert transaction["tags"]["dagster.job"] == "process_outbox_events"

    # One extract, one load and one mark span per batch (the short last batch ends the claims: it is the tail).
    spans = spans_by_op(transaction)
    batch_ids = sorted(s["data"]["batch_id"] for s in spans["load"])
    assert len(batch_ids) == 3
    assert sorted(s["data"]["batch_id"] for s in spans["extract"] if "batch_id" in s["data"]) == batch_ids
    assert len(spans["extract"]) == 3
    assert sorted(s["data"]["batch_id"] for s in spans["mark"]) == batch_ids
    assert sorted(s["data"]["batch_size"] for s in spans["load"]) == [5, 10, 10]
    assert all(s["parent_span_id"] == trace(transaction)["span_id"] for s in transaction["spans"])
    assert all(s.get("status") in (None, "ok") for s in transaction["spans"])

    assert errors(recorder) == []
    opened, closed = check_ins(recorder)
    assert (opened["status"], closed["status"]) == ("in_progress", "ok")
    assert opened["check_in_id"] == closed["check_in_id"]
    assert opened["monitor_slug"] == closed["monitor_slug"] == "outbox-relay"
    assert opened["monitor_config"]["schedule"] == {"type": "interval", "value": 10, "unit": "minute"}

    assert sum(m["value"] for m in metrics_named(recorder, "outbox.events_processed")) == EVENTS
    assert len(metrics_named(recorder, "outbox.batch_processing_time")) == 3
    assert [m["value"] for m in metrics_named(recorder, "outbox.queue_size")] == [EVENTS, 0]
    assert {m["type"] for m in metrics(recorder)} == {"counter", "distribution", "gauge"}
    for metric in metrics(recorder):
        assert metric["attributes"]["job"] == "process_outbox_events"
        assert metric["attributes"]["environment"] == ENVIRONMENT

    # The run records its trace for the Dagster UI and the run-failure sensor.
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[TRACE_ID_TAG] == trace(transaction)["trace_id"]
    assert tags[TRANSACTION_STATUS_TAG] == "ok"
    assert outbox.counts().pending == 0


def test_process_outbox_events_sentry_error_handling(relay_env, outbox, recorder, monkeypatch):
    monkeypatch.setenv("OUTBOX_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("OUTBOX_RETRY_BASE_SECONDS", "0.01")
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    # Every INSERT answered 503: transient, retried, then the load fails; the rest of the server works.
    faults = {"fail_next_n": 1000, "fail_status": 503, "match": r"^\s*INSERT"}
    with running_clickhouse_http_server(chdb_path(relay_env), password=PASSWORD, faults=faults) as url:
        monkeypatch.setenv("CLICKHOUSE_URL", url)
        # One batch per step: three load steps fail alike.
        result = run_relay(run_config={**BATCH, "batches_per_step": 1})
        assert get_faults(url)["injected"]["fail"] == 6  # 3 batches x 2 attempts

    assert not result.success
    [transaction] = transactions(recorder)
    assert trace(transaction)["op"] == "process_events"
    assert trace(transaction)["status"] == "internal_error"
    data = trace(transaction)["data"]
    assert "inserting into ClickHouse failed 2 times" in data["error"]
    assert data["events_processed"] == 0 and data["batches"] == 0
    assert data["retry_attempts"] == 3
    assert data["failed_steps"] == 3

    # Three load steps failed alike: one event for the run, and Dagster's ERROR log lines made none.
    time.sleep(0.3)
    [event] = errors(recorder)
    assert event["level"] == "error"
    assert event["fingerprint"] == ["dagster-op-failure", "process_outbox_events", "load_batch", "RetriesExhaustedError"]
    [exception] = event["exception"]["values"][-1:]
    assert exception["type"] == "RetriesExhaustedError"
    assert event["tags"]["dagster.job"] == "process_outbox_events"
    assert event["tags"]["dagster.op"] == "load_batch"
    assert event["tags"]["dagster.run_id"] == result.run_id
    assert event["tags"]["dagster.retry_number"] == "0"
    assert event["tags"]["dagster.step"].startswith("load_batch[")
    assert event["contexts"]["trace"]["trace_id"] == trace(transaction)["trace_id"]
    assert event["contexts"]["outbox_run"]["retry_attempts"] >= 1
    crumbs = event["breadcrumbs"]["values"]
    assert any(c["level"] == "error" and "STEP_FAILURE" in (c.get("message") or "") for c in crumbs), (
        "Dagster's ERROR log line is kept as a breadcrumb"
    )
    assert any(c.get("category") == "outbox.retry" for c in crumbs)
    messages = [c.get("message") for c in crumbs]
    assert all(a != b for a, b in zip(messages, messages[1:])), "Dagster's double log lines are kept once"

    opened, closed = check_ins(recorder)
    assert (opened["status"], closed["status"]) == ("in_progress", "error")
    assert opened["check_in_id"] == closed["check_in_id"]

    assert sum(m["value"] for m in metrics_named(recorder, "outbox.retry_attempts")) == 3
    assert metrics_named(recorder, "outbox.events_processed") == []

    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (EVENTS, 0, 0)
    assert PASSWORD not in recorder.raw_text()


def test_a_run_whose_clickhouse_is_unreachable_sends_its_end_of_run_figures(relay_env, outbox, recorder, monkeypatch):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    monkeypatch.setenv("CLICKHOUSE_URL", closed_port_url())

    result = run_relay(run_config=BATCH)

    assert not result.success
    [transaction] = transactions(recorder)
    assert trace(transaction)["status"] == "internal_error"
    assert "connecting to ClickHouse failed 5 times" in trace(transaction)["data"]["error"]
    data = trace(transaction)["data"]
    # The failed loads gave their batches back: everything still waits.
    assert data["queue_size_before"] == EVENTS
    assert data["queue_size_after"] == EVENTS
    assert [m["value"] for m in metrics_named(recorder, "outbox.queue_size")] == [EVENTS, EVENTS]
    [age] = metrics_named(recorder, "outbox.oldest_pending_age")
    assert age["value"] > 0 and age["unit"] == "second"
    assert outbox.counts().pending == EVENTS


def test_when_the_end_of_run_figures_cannot_be_read_the_run_keeps_its_own_outcome(
    relay_env, outbox, recorder, monkeypatch, postgres_server_url
):
    """PostgreSQL stops accepting connections once the run is under way, then ClickHouse cannot be reached."""
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    database = urllib.parse.urlsplit(relay_env["OUTBOX_DATABASE_URL"]).path.lstrip("/")
    connect_clickhouse = ClickHouseResource.store

    def refuse_new_outbox_connections_then_connect(self):
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        return connect_clickhouse(self)

    monkeypatch.setattr(ClickHouseResource, "store", refuse_new_outbox_connections_then_connect)
    monkeypatch.setenv("CLICKHOUSE_URL", closed_port_url())
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = run_relay(instance, run_config=BATCH)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

    assert not result.success
    [failure, *_] = result.get_step_failure_events()
    assert "connecting to ClickHouse failed 5 times" in failure.step_failure_data.error.to_string()
    [transaction] = transactions(recorder)
    assert trace(transaction)["status"] == "internal_error"
    assert "connecting to ClickHouse failed 5 times" in trace(transaction)["data"]["error"]
    assert "queue_size_after" not in trace(transaction)["data"]
    assert [c["status"] for c in check_ins(recorder)] == ["in_progress", "error"]
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert any(m.startswith("could not read the outbox queue at the end of the run:") for m in warnings), warnings
    assert instance.get_run_by_id(result.run_id).tags[TRANSACTION_STATUS_TAG] == "internal_error"


def test_rejected_events_are_counted_as_failed(relay_env, outbox, recorder):
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.client.command("ALTER TABLE event_log ADD CONSTRAINT no_poison CHECK event_type != 'poison'")
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 9)
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 1, event_type="poison", start=9)

    result = run_relay(run_config=BATCH)

    assert result.success
    [transaction] = transactions(recorder)
    assert trace(transaction)["status"] == "ok"
    assert trace(transaction)["data"]["events_processed"] == 9
    assert trace(transaction)["data"]["events_failed"] == 1
    [load] = spans_by_op(transaction)["load"]
    assert load["data"]["rejected"] == 1 and load["data"]["inserts"] > 1
    [failed] = metrics_named(recorder, "outbox.events_failed")
    assert failed["value"] == 1 and failed["type"] == "counter"
    assert errors(recorder) == []
    assert outbox.counts().retrying == 1


@pytest.mark.parametrize("setting", ["no dsn", "debug"])
def test_nothing_is_sent_without_dsn_or_in_debug(relay_env, outbox, recorder, monkeypatch, setting):
    if setting == "no dsn":
        monkeypatch.delenv("SENTRY_CONFIG_DSN")
    else:
        monkeypatch.setenv("DEBUG", "true")
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 5)
    monkeypatch.setenv("CLICKHOUSE_URL", f"http://app:{PASSWORD}@127.0.0.1:9/nowhere")  # refused, so a hook runs too

    instance = dg.DagsterInstance.ephemeral()
    result = run_relay(instance)

    assert not result.success
    time.sleep(0.5)
    assert recorder.envelopes == []
    assert TRACE_ID_TAG not in instance.get_run_by_id(result.run_id).tags


def test_password_in_an_error_message_reaches_no_envelope(relay_env, outbox, recorder, monkeypatch):
    # The outbox URL carries a password (the embedded test server trusts local
    # connections and ignores it): a configured secret all the same.
    url = relay_env["OUTBOX_DATABASE_URL"].replace("postgresql://postgres:@", f"postgresql://postgres:{PASSWORD}@")
    assert PASSWORD in url
    monkeypatch.setenv("OUTBOX_DATABASE_URL", url)
    # A table constraint that quotes the secret and rejects every row: ClickHouse's
    # error message repeats the constraint's expression, password included.
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.client.command(
            f"ALTER TABLE event_log ADD CONSTRAINT quotes_a_secret CHECK event_context != '{PASSWORD}' AND length(event_type) > 100"
        )
    publish_raw(url, 150)

    result = run_relay()

    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert PASSWORD in failure.step_failure_data.error.to_string(), "the message really carries the password"
    [event] = errors(recorder)
    value = event["exception"]["values"][-1]["value"]
    assert "Expression: ((event_context != '[Filtered]')" in value  # readable around the secret
    [transaction] = transactions(recorder)
    assert "[Filtered]" in trace(transaction)["data"]["error"]
    # The envelope header's trace.public_key is the DSN's public key by design.
    text = recorder.raw_text_without_trace_key()
    assert "STEP_FAILURE" in text  # Dagster's log line travelled as a breadcrumb, scrubbed
    assert PASSWORD not in text
    assert PUBLIC_KEY not in text
    assert outbox.counts().pending == 150


def test_unreachable_sentry_leaves_the_run_successful(relay_env, outbox, reset_sentry, monkeypatch):
    monkeypatch.setenv("SENTRY_CONFIG_DSN", unreachable_dsn())
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)

    result = run_relay(run_config=BATCH)

    assert result.success
    assert outbox.counts().pending == 0


def test_stalled_sentry_holds_the_run_at_most_one_flush_timeout(relay_env, outbox, reset_sentry, monkeypatch):
    # The server accepts every request and answers none for a minute.
    with SentryRecorder(delay_seconds=60) as stalled:
        monkeypatch.setenv("SENTRY_CONFIG_DSN", stalled.dsn)
        monkeypatch.setenv("SENTRY_FLUSH_TIMEOUT_SECONDS", "1")
        publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
        started = time.monotonic()
        result = run_relay(run_config=BATCH)
        elapsed = time.monotonic() - started
        assert result.success
        # Waiting for an answer would take 60 s; the run pays at most the 1 s flush
        # timeout (10 s leaves room for a slow machine, not for a wait on Sentry).
        assert elapsed < 10, f"the run took {elapsed:.1f} s"
        assert stalled.wait_for(lambda r: r.payloads("check_in"), timeout=5)
    assert outbox.counts().pending == 0


def test_bad_sentry_settings_fail_the_code_location_in_one_line(relay_env):
    # Every setting is validated when the code location loads: a bad value names its variable.
    env = {**os.environ, "SENTRY_TRACES_SAMPLE_RATE": "lots"}
    loaded = subprocess.run(
        [sys.executable, "-c", "import outbox_pipeline.definitions"], env=env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode != 0
    assert "SENTRY_TRACES_SAMPLE_RATE='lots': Input should be a valid number" in loaded.stderr
