import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg

from outbox_pipeline.producer import publish_many
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

AWKWARD_CONTEXTS = [
    '{"a": "tab\\there"}',
    "  leading and trailing blanks  ",
    "quote \" and 'single' and \\ backslash and \\N",
    "new\nline\r\nCRLF\rCR",
    "\x0b\x0c\x01\x7f control",
    "ünïcødé 🚀 和",
    "",
    ",,,",
    '"',
    "\\.",
    '{"nested": {"list": [1, 2.50, null, true]}}',
]


def test_one_run_moves_more_events_than_a_batch_field_by_field(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    base = dt.datetime(2026, 11, 29, 8, 0, 0, 1, tzinfo=dt.UTC)
    events = [
        RawEvent(
            event_type=f"type_{n % 3}",
            context=AWKWARD_CONTEXTS[n % len(AWKWARD_CONTEXTS)] + (f" #{n}" if n % 2 else ""),
            event_date_time=base + dt.timedelta(seconds=n, microseconds=n),
            environment="test" if n % 2 else "staging",
            metadata_version=1 + n % 2,
        )
        for n in range(250)
    ]
    with psycopg.connect(url) as conn:
        publish_many(conn, events)

    result = run_relay(run_config={"batch_size": 40})

    assert result.success
    summary = result.output_for_node("report_relay_run")
    assert summary["events_loaded"] == 250
    assert summary["batches"] == 7  # 6 full batches of 40 and one of 10
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (250, 250)
        rows = {row["event_id"]: row for row in event_log.rows_for([str(e.event_id) for e in events])}
    for event in events:
        row = rows[str(event.event_id)]
        assert row["event_type"] == event.event_type
        assert row["event_context"].encode() == event.context.encode()
        assert row["event_date_time"].replace(tzinfo=dt.UTC) == event.event_date_time
        assert row["environment"] == event.environment
        assert row["metadata_version"] == event.metadata_version
    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (0, 250, 0)


def test_empty_outbox_run_succeeds_and_does_nothing(relay_env, outbox):
    result = run_relay()
    assert result.success
    assert result.output_for_node("report_relay_run")["events_loaded"] == 0
    assert result.output_for_node("report_relay_run")["batches"] == 0
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (0, 0)


def test_run_stops_at_max_batches_and_the_next_run_continues(relay_env, outbox):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 100)
    first = run_relay(run_config={"batch_size": 10, "max_batches": 3})
    assert first.success and first.output_for_node("report_relay_run")["events_loaded"] == 30
    assert outbox.counts().pending == 70
    second = run_relay(run_config={"batch_size": 50})
    assert second.output_for_node("report_relay_run")["events_loaded"] == 70
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (100, 100)


def test_run_past_its_time_limit_releases_unloaded_batches(relay_env, outbox):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 30)
    result = run_relay(run_config={"batch_size": 10, "max_seconds": 0.000001})
    assert result.success
    summary = result.output_for_node("report_relay_run")
    assert summary["events_loaded"] == 0 and summary["batches_released"] == 3
    # Released batches are taken again at once, not after the lease.
    assert run_relay().output_for_node("report_relay_run")["events_loaded"] == 30


def test_run_records_event_log_materialization_with_metadata(relay_env, outbox):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 20)
    with dg.instance_for_test() as instance:
        result = run_relay(instance)
        assert result.success
        materialization = instance.get_latest_materialization_event(dg.AssetKey("event_log")).asset_materialization
    metadata = materialization.metadata
    assert metadata["events_loaded"].value == 20
    assert metadata["queue_size"].value == 0
    assert metadata["events_per_second"].value > 0
    assert {"batches", "duration_seconds", "oldest_pending_age_seconds"} <= set(metadata)


def test_claims_stop_at_the_tail_of_the_backlog_while_producers_keep_committing(relay_env, outbox, monkeypatch):
    """A steady stream must not turn a run's start into one Dagster step per trickle of new events."""
    from outbox_pipeline.stores.outbox_store import OutboxStore

    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 25)
    original = OutboxStore.claim_next_batch
    published = [25]

    def a_producer_commits_between_claims(self, **kwargs):
        handle = original(self, **kwargs)
        publish_raw(url, 1, start=published[0])  # as a stream would, while the run claims
        published[0] += 1
        return handle

    monkeypatch.setattr(OutboxStore, "claim_next_batch", a_producer_commits_between_claims)
    result = run_relay(run_config={"batch_size": 10, "max_batches": 20})
    assert result.success
    # Two full batches, then the tail (7 events): not one more batch per event committed meanwhile.
    assert result.output_for_node("report_relay_run")["batches"] == 3


def test_a_step_takes_several_batches_each_with_its_own_insert_and_mark(relay_env, outbox):
    """Fewer Dagster steps per run: a load step and its mark step take up to batches_per_step batches."""
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 250)
    result = run_relay(run_config={"batch_size": 40, "batches_per_step": 3})
    assert result.success
    loads = sorted(e.step_key for e in result.get_step_success_events() if e.step_key.startswith("load_batch"))
    marks = sorted(e.step_key for e in result.get_step_success_events() if e.step_key.startswith("mark_batch_processed"))
    assert loads == ["load_batch[batch_7]", "load_batch[batches_1_to_3]", "load_batch[batches_4_to_6]"]
    assert [key.replace("mark_batch_processed", "load_batch") for key in marks] == loads
    summary = result.output_for_node("report_relay_run")
    assert (summary["events_loaded"], summary["batches"]) == (250, 7)
    done = outbox.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'done'").fetchone()[0]
    assert done == 7  # each batch marked on its own
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (250, 250)


def test_the_readme_s_shell_command_for_one_run_ends_with_the_backlog(relay_env, outbox, monkeypatch):
    """`dagster job execute … -c scripts/run_config/backlog_only.yaml` in a real process, with following on."""
    root = Path(__file__).resolve().parents[1]
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 300)
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
    # Following would go on for ten minutes, quiet or not, but for the run config.
    env = {**{k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}, "OUTBOX_FOLLOW_SECONDS": "600", "OUTBOX_FOLLOW_QUIET_SECONDS": "600"}
    command = [dagster, "job", "execute", "-m", "outbox_pipeline.definitions", "-j", "process_outbox_events",
               "-c", "scripts/run_config/backlog_only.yaml"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < 120
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (300, 300)
