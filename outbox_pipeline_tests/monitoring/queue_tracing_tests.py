"""An event's journey in one Sentry trace: a ``queue.publish`` span where it is published,
``queue.process`` spans where the relay delivers it (Sentry's Queues module).

The producer side runs under Sentry as an application starts it (``sentry_sdk.init``);
the relay under the project's own set-up. Everything reaches the recording Sentry
server through the real sentry-sdk transport; the stores are real PostgreSQL and chDB.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import sentry_sdk

from outbox_pipeline.monitoring import queue_tracing
from outbox_pipeline.monitoring.queue_tracing import EXAMINED_ROWS, SAMPLE_SIZE
from outbox_pipeline.monitoring.relay_report import RelayRunReport
from outbox_pipeline.monitoring.sentry_setup import SentrySettings, flush_sentry, init_sentry
from outbox_pipeline.producer import publish, publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.relay.retrying import BackoffPolicy
from outbox_pipeline.stores.embedded_postgres import embedded_postgres_url, stop_embedded_postgres
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store, prepare_relay
from outbox_pipeline_tests.monitoring.envelopes import ENVIRONMENT, PUBLIC_KEY, trace, transactions
from outbox_pipeline_tests.support.relay_runs import run_relay
from outbox_pipeline_tests.support.sentry_fixtures import reset_sentry_sdk

FAST_RETRIES = BackoffPolicy(attempts=3, base_seconds=0.01)
BIN = Path(sys.executable).parent


# -- helpers ------------------------------------------------------------------------------


def start_application_sentry(dsn: str, **options) -> None:
    """Sentry as an application starts it (the project's own set-up is for the relay)."""
    sentry_sdk.init(dsn=dsn, traces_sample_rate=1.0, default_integrations=False, environment="app", **options)


def raw_events(count: int, event_type: str = "order_paid", start: int = 0) -> list[RawEvent]:
    return [RawEvent(event_type=event_type, context=f'{{"n": {n}}}') for n in range(start, start + count)]


def publish_in_a_transaction(url: str, *calls: list[RawEvent], name: str = "POST /checkout") -> str:
    """Each list is one publish_many call, all in one request's transaction; returns the trace id."""
    with sentry_sdk.start_transaction(op="http.server", name=name) as transaction:
        with psycopg.connect(url) as conn:
            for events in calls:
                publish_many(conn, events)
    sentry_sdk.flush()
    return transaction.trace_id


def stored_headers(url: str) -> dict[str, tuple[str | None, str | None]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT event_id::text, sentry_trace, sentry_baggage FROM outbox ORDER BY id").fetchall()
    return {event_id: (sentry_trace, baggage) for event_id, sentry_trace, baggage in rows}


def producer_transaction(rec) -> dict:
    [transaction] = [t for t in transactions(rec) if trace(t).get("op") == "http.server"]
    return transaction


def publish_spans(transaction: dict) -> list[dict]:
    return [span for span in transaction["spans"] if span["op"] == "queue.publish"]


def ours(data: dict) -> dict:
    """Span data without what the SDK adds to every span (thread id and name)."""
    return {key: value for key, value in data.items() if not key.startswith("thread.")}


def process_transactions(rec) -> list[dict]:
    return [t for t in transactions(rec) if trace(t).get("op") == queue_tracing.TASK_OP]


def process_span(transaction: dict) -> dict:
    [span] = transaction["spans"]
    assert span["op"] == "queue.process"
    return span


def by_message_id(rec) -> dict[str, dict]:
    return {process_span(t)["data"]["messaging.message.id"]: t for t in process_transactions(rec)}


def relay_settings(dsn: str) -> SentrySettings:
    return SentrySettings(dsn=dsn, environment=ENVIRONMENT, flush_timeout_seconds=2.0)


def drain_traced(url: str, clickhouse_url: str, *, batch_size: int, store: OutboxStore | None = None, **policy):
    """A framework-free relay run whose report continues each loaded batch's traces (as `outbox-pipeline relay`)."""
    report = RelayRunReport("process_outbox_events", ENVIRONMENT)
    warnings: list[str] = []
    outbox = store or OutboxStore.connect(url)
    try:
        with event_log_store(clickhouse_url) as event_log:
            relay = Relay(outbox, event_log, RelayPolicy(batch_size=batch_size, retry=FAST_RETRIES, **policy), claimed_by="test-run")
            totals = relay.drain(on_loaded=report.batch_tracer(outbox, "event_log", warn=warnings.append))
    finally:
        if store is None:
            outbox.close()
    flush_sentry()
    assert warnings == []
    return totals


def clickhouse(url: str, statement: str) -> None:
    with event_log_store(url) as event_log:
        event_log.client.command(statement)


# -- the producer's span ----------------------------------------------------------------------


def test_a_publish_inside_a_transaction_is_one_queue_publish_span_whose_headers_travel_with_its_events(relay_env, recorder):
    url = relay_env["OUTBOX_DATABASE_URL"]
    start_application_sentry(recorder.dsn)
    one = RawEvent(event_type="order_paid", context='{"order": "é"}')  # two bytes for é
    many = raw_events(250)  # COPY
    other = RawEvent(event_type="order_paid", context="{}")

    with sentry_sdk.start_transaction(op="http.server", name="POST /checkout") as transaction:
        with psycopg.connect(url) as conn:
            publish(conn, one)  # INSERT
            publish_many(conn, many)
            publish(conn, other, destination="orders_event_log")
    sentry_sdk.flush()

    [single, batch, elsewhere] = publish_spans(recorder.wait_for(lambda r: producer_transaction(r)))
    assert ours(single["data"]) == {
        "messaging.system": "outbox_pipeline",
        "messaging.destination.name": "event_log",
        "messaging.message.id": str(one.event_id),
        "messaging.message.body.size": len('{"order": "é"}'.encode()),
    }
    assert ours(batch["data"]) == {
        "messaging.system": "outbox_pipeline",
        "messaging.destination.name": "event_log",
        "messaging.message.id": str(many[0].event_id),
        "messaging.batch.message_count": 250,
        "messaging.message.body.size": sum(len(e.context) for e in many),
    }
    assert elsewhere["data"]["messaging.destination.name"] == "orders_event_log"
    assert all(span["parent_span_id"] == transaction.span_id for span in (single, batch, elsewhere))

    headers = stored_headers(url)
    for span, events in ((single, [one]), (batch, many), (elsewhere, [other])):
        for event in events:
            sentry_trace, baggage = headers[str(event.event_id)]
            # The publish span is the parent of whatever continues the trace.
            assert sentry_trace == f"{transaction.trace_id}-{span['span_id']}-1"
            assert f"sentry-trace_id={transaction.trace_id}" in baggage and "sentry-sampled=true" in baggage


def test_outside_a_transaction_or_without_sentry_nothing_is_stored_and_no_span_is_sent(relay_env, recorder):
    url = relay_env["OUTBOX_DATABASE_URL"]
    with psycopg.connect(url) as conn:
        publish(conn, RawEvent(event_type="no_sentry", context="{}"))  # no client at all
    start_application_sentry(recorder.dsn)
    with psycopg.connect(url) as conn:
        publish_many(conn, raw_events(3, "no_transaction"))
    with sentry_sdk.start_transaction(op="http.server", name="GET /unsampled", sampled=False):
        with psycopg.connect(url) as conn:
            publish_many(conn, raw_events(3, "unsampled"))
    sentry_sdk.flush()
    time.sleep(0.3)

    assert set(stored_headers(url).values()) == {(None, None)}
    assert transactions(recorder) == []


# -- the relay continues the trace -----------------------------------------------------------


def test_a_relay_run_continues_the_producers_trace_in_queue_process_spans(relay_env, outbox, recorder):
    url = relay_env["OUTBOX_DATABASE_URL"]
    start_application_sentry(recorder.dsn)
    first, second = raw_events(15), raw_events(10, start=15)
    before_publish = time.time()
    trace_id = publish_in_a_transaction(url, first, second)
    publish_spans_by_call = publish_spans(recorder.wait_for(lambda r: producer_transaction(r)))
    time.sleep(0.5)  # the events wait in the outbox

    result = run_relay(dg.DagsterInstance.ephemeral(), run_config={"batch_size": 10})
    relayed = time.time()

    assert result.success
    sent = recorder.wait_for(lambda r: len(process_transactions(r)) == 25 and by_message_id(r))
    [run] = [t for t in transactions(recorder) if t["transaction"] == "process_outbox_events"]
    # The run's own transaction as before: a load and a mark span per batch, an extract span per claim.
    ops = collections.Counter(span["op"] for span in run["spans"])
    assert (ops["load"], ops["mark"]) == (3, 3) and ops["extract"] >= 3
    assert set(ops) <= {"extract", "load", "mark", "follow"}
    for events, publish_span in ((first, publish_spans_by_call[0]), (second, publish_spans_by_call[1])):
        for event in events:
            transaction = sent[str(event.event_id)]
            assert trace(transaction)["trace_id"] == trace_id != trace(run)["trace_id"]
            assert trace(transaction)["parent_span_id"] == publish_span["span_id"]
            assert transaction["transaction"] == "deliver to event_log"
            assert trace(transaction)["status"] == "ok"
            data = process_span(transaction)["data"]
            assert data["messaging.system"] == "outbox_pipeline"
            assert data["messaging.destination.name"] == "event_log"
            assert data["messaging.message.body.size"] == len(event.context)
            assert data["messaging.message.retry.count"] == 0
            assert data["outbox.outcome"] == "delivered"
            assert data["outbox.claimed_by"] == result.run_id
            # From the commit (or the producer's transaction start) to ClickHouse's acknowledgement.
            assert (relayed - before_publish) * 1000 >= data["messaging.message.receive.latency"] >= 490
    assert outbox.counts().pending == 0


def test_outbox_pipeline_relay_continues_the_traces_too(relay_env, outbox, recorder, tmp_path):
    url = relay_env["OUTBOX_DATABASE_URL"]
    start_application_sentry(recorder.dsn)
    events = raw_events(5)
    trace_id = publish_in_a_transaction(url, events)

    done = subprocess.run(
        [str(BIN / "outbox-pipeline"), "relay"], env=dict(os.environ), cwd=tmp_path, capture_output=True, text=True, timeout=180
    )

    assert done.returncode == 0 and done.stderr == "", done.stderr
    sent = recorder.wait_for(lambda r: len(process_transactions(r)) == 5 and by_message_id(r))
    assert set(sent) == {str(e.event_id) for e in events}
    assert {trace(t)["trace_id"] for t in sent.values()} == {trace_id}


# -- the sampling rule -------------------------------------------------------------------------


def test_a_batch_continues_a_spread_sample_and_always_the_rejected_and_retried_events(relay_env, recorder):
    url, clickhouse_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    clickhouse(clickhouse_url, "ALTER TABLE event_log ADD CONSTRAINT no_poison CHECK event_type != 'poison'")
    start_application_sentry(recorder.dsn)
    events = raw_events(300)
    events[137] = poison = RawEvent(event_type="poison", context="{}")
    publish_in_a_transaction(url, events)
    init_sentry(relay_settings(recorder.dsn))

    # One batch of 300 (every row looked at): the poison event and 10 of the other 299, spread evenly.
    assert len(events) <= EXAMINED_ROWS
    assert drain_traced(url, clickhouse_url, batch_size=1_000).events_rejected == 1
    sent = recorder.wait_for(lambda r: len(process_transactions(r)) == SAMPLE_SIZE + 1 and by_message_id(r))
    others = [e for e in events if e is not poison]
    assert set(sent) == {str(poison.event_id)} | {str(others[i * len(others) // SAMPLE_SIZE].event_id) for i in range(SAMPLE_SIZE)}
    rejected = sent[str(poison.event_id)]
    assert trace(rejected)["status"] == "internal_error"
    assert process_span(rejected)["data"]["outbox.outcome"] == "rejected"
    assert process_span(rejected)["data"]["messaging.message.retry.count"] == 0

    # Fixed and retried: the retry batch continues its trace once more, with its retry count.
    recorder.clear()
    clickhouse(clickhouse_url, "ALTER TABLE event_log DROP CONSTRAINT no_poison")
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE outbox_failure SET next_attempt_at = now()")  # its backoff has passed
    assert drain_traced(url, clickhouse_url, batch_size=1_000).events_loaded == 1
    [retried] = recorder.wait_for(lambda r: process_transactions(r))
    assert process_span(retried)["data"]["messaging.message.id"] == str(poison.event_id)
    assert process_span(retried)["data"]["messaging.message.retry.count"] == 1
    assert trace(retried)["status"] == "ok"


def test_a_large_batch_continues_exactly_the_sample_size_plus_its_rejected_events(relay_env, recorder):
    url, clickhouse_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    clickhouse(clickhouse_url, "ALTER TABLE event_log ADD CONSTRAINT no_poison CHECK event_type != 'poison'")
    start_application_sentry(recorder.dsn)
    events = raw_events(3 * EXAMINED_ROWS)
    events[2 * EXAMINED_ROWS + 1] = poison = RawEvent(event_type="poison", context="{}")
    publish_in_a_transaction(url, events[:EXAMINED_ROWS], events[EXAMINED_ROWS:])
    init_sentry(relay_settings(recorder.dsn))

    totals = drain_traced(url, clickhouse_url, batch_size=10_000)

    assert (totals.batches, totals.events_rejected) == (1, 1)
    time.sleep(0.3)
    sent = recorder.wait_for(lambda r: by_message_id(r))
    assert len(process_transactions(recorder)) == len(sent) == SAMPLE_SIZE + 1
    assert str(poison.event_id) in sent
    # The sample is spread over the whole batch, not taken from its head.
    picks = sorted(index for index, event in enumerate(events) if str(event.event_id) in sent and event is not poison)
    assert picks[0] < 10 and picks[-1] > 0.9 * len(events)
    assert max(b - a for a, b in zip(picks, picks[1:])) < 2 * len(events) / SAMPLE_SIZE


class CountingOutboxStore(OutboxStore):
    """The real store, counting how often a batch's trace headers are read."""

    reads = 0

    def read_trace_sample(self, *args, **kwargs):
        self.reads += 1
        return super().read_trace_sample(*args, **kwargs)


def test_with_sentry_off_the_relay_reads_no_trace_headers(relay_env, recorder):
    url, clickhouse_url = relay_env["OUTBOX_DATABASE_URL"], relay_env["CLICKHOUSE_URL"]
    start_application_sentry(recorder.dsn)
    publish_in_a_transaction(url, raw_events(30))
    reset_sentry_sdk()  # the relay's process has no Sentry
    recorder.clear()

    store = CountingOutboxStore.connect(url)
    try:
        assert drain_traced(url, clickhouse_url, batch_size=10, store=store).batches == 3
        assert store.reads == 0
        with psycopg.connect(url) as conn:
            publish_many(conn, raw_events(30, start=30))
        init_sentry(relay_settings(recorder.dsn))
        assert drain_traced(url, clickhouse_url, batch_size=10, store=store).batches == 3
        assert store.reads == 3  # one query per batch
    finally:
        store.close()
    time.sleep(0.3)
    assert process_transactions(recorder) == []


# -- nothing secret, no payload --------------------------------------------------------------


def test_no_secret_or_payload_reaches_sentry_on_the_events_journey(tmp_path, outbox_database_url, clickhouse_url, recorder, monkeypatch):
    # A password in the outbox URL (the test server does not ask for it) and personal data in the payload.
    parts = urllib.parse.urlsplit(outbox_database_url)
    secret_url = parts._replace(netloc=f"{parts.username}:S3cretPassw0rd@{parts.netloc.rpartition('@')[2]}").geturl()
    env = prepare_relay(monkeypatch, secret_url, clickhouse_url, tmp_path / "state")
    monkeypatch.setenv("SENTRY_CONFIG_DSN", recorder.dsn)  # prepare_relay turns Sentry off
    start_application_sentry(recorder.dsn)
    payload = '{"email": "someone@example.com", "card": "4111 1111 1111 1111", "password": "hunter22"}'
    events = [RawEvent(event_type="order_paid", context=payload) for _ in range(3)]
    publish_in_a_transaction(env["OUTBOX_DATABASE_URL"], events)

    result = run_relay(dg.DagsterInstance.ephemeral())

    assert result.success
    recorder.wait_for(lambda r: len(process_transactions(r)) == 3)
    text = recorder.raw_text_without_trace_key()
    for secret in ("S3cretPassw0rd", "someone@example.com", "4111 1111", "hunter22", PUBLIC_KEY):
        assert secret not in text
    for transaction in process_transactions(recorder):
        assert set(ours(process_span(transaction)["data"])) == {
            "messaging.system", "messaging.destination.name", "messaging.message.id", "messaging.message.body.size",
            "messaging.message.receive.latency", "messaging.message.retry.count",
            "outbox.relay", "outbox.batch_id", "outbox.claimed_by", "outbox.latency_from", "outbox.outcome",
        }



# -- the time an event waited -------------------------------------------------------------------

_TRACKING_SERVER = """
import sys
from pathlib import Path

import psycopg

from outbox_pipeline.stores.embedded_postgres import embedded_postgres_url, stop_embedded_postgres

data_dir = Path(sys.argv[1])
with psycopg.connect(embedded_postgres_url(data_dir), autocommit=True) as conn:
    conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
stop_embedded_postgres(data_dir)
"""


@pytest.fixture
def commit_tracking_database_url(tmp_path) -> str:
    """A PostgreSQL server of its own that records commit times (a server setting: set, then restarted)."""
    data_dir = tmp_path / "postgres"
    subprocess.run([sys.executable, "-c", _TRACKING_SERVER, str(data_dir)], check=True, timeout=120, env=dict(os.environ))
    url = embedded_postgres_url(data_dir, delete_on_exit=True)
    yield url
    stop_embedded_postgres(data_dir)


@pytest.mark.parametrize("commit_times", [False, True], ids=["created_at", "commit_time"])
def test_the_wait_runs_from_the_commit_when_the_server_records_commit_times(
    commit_times, relay_env, recorder, request, tmp_path, monkeypatch
):
    url = request.getfixturevalue("commit_tracking_database_url") if commit_times else relay_env["OUTBOX_DATABASE_URL"]
    if commit_times:
        prepare_relay(monkeypatch, url, relay_env["CLICKHOUSE_URL"], tmp_path / "state")
    start_application_sentry(recorder.dsn)
    event = RawEvent(event_type="order_paid", context="{}")
    with sentry_sdk.start_transaction(op="http.server", name="POST /slow"):
        with psycopg.connect(url) as conn:
            publish(conn, event)
            time.sleep(1.0)  # the producer's transaction goes on for a second after the insert
            committed = time.time()
    sentry_sdk.flush()
    init_sentry(relay_settings(recorder.dsn))

    drain_traced(url, relay_env["CLICKHOUSE_URL"], batch_size=100)
    acknowledged = time.time()

    [transaction] = recorder.wait_for(lambda r: process_transactions(r))
    data = process_span(transaction)["data"]
    latency = data["messaging.message.receive.latency"]
    if commit_times:
        assert data["outbox.latency_from"] == "commit"
        assert latency <= (acknowledged - committed) * 1000 + 50  # the second before the commit is not counted
    else:
        assert data["outbox.latency_from"] == "created_at"
        assert latency >= 1000  # from the start of the producer's transaction
