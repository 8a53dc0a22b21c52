"""replay_outbox_events on the real stores: PostgreSQL and chDB."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from outbox_pipeline.orchestration.ops.replay_ops import (
    ReplayOutsideRetentionError,
    check_within_retention,
    replay_day,
    replay_token,
)
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.operations.support import (
    lose_rows,
    publish_on,
    publish_poison,
    run_replay,
    step_failure_message,
    utc_today,
)
from outbox_pipeline_tests.support.relay_runs import run_relay

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_replay_restores_lost_events_of_its_day_only_and_twice_leaves_no_duplicates(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    day = utc_today() - dt.timedelta(days=1)
    events = publish_on(url, day, 300)
    next_day = publish_on(url, day + dt.timedelta(days=1), 20)
    assert run_relay(run_config={"batch_size": 100}).success
    lost = [str(e.event_id) for e in events[::7]]  # 43 events of the day
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        lose_rows(event_log, lost + [str(next_day[0].event_id)])
        assert event_log.counts() == (276, 276)

    first = run_replay(day, chunk_size=64)

    assert first.success
    summary = first.output_for_node("replay_outbox_day")
    assert (summary["events_found"], summary["already_present"], summary["inserted"]) == (300, 257, 43)
    assert (summary["left_to_relay"], summary["failed_kept"]) == (0, 0)
    assert summary["chunks_inserted"] == 5  # every chunk of 64 had a lost event
    [materialization] = first.asset_materializations_for_node("replay_outbox_day")
    assert materialization.metadata["events_replayed"].value == 43
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        # The other day's lost event stays lost: a replay touches its own day only.
        assert event_log.counts() == (319, 319)
        rows = {row["event_id"]: row for row in event_log.rows_for(lost)}
    by_id = {str(e.event_id): e for e in events}
    for event_id in lost:
        assert rows[event_id]["event_context"].encode() == by_id[event_id].context.encode()
        assert rows[event_id]["event_date_time"].replace(tzinfo=dt.UTC) == by_id[event_id].event_date_time

    second = run_replay(day, chunk_size=64)

    assert second.success
    summary = second.output_for_node("replay_outbox_day")
    assert (summary["events_found"], summary["already_present"], summary["inserted"]) == (300, 300, 0)
    assert not second.asset_materializations_for_node("replay_outbox_day")
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (319, 319)


def test_replay_leaves_undelivered_events_to_the_relay(relay_env, outbox, monkeypatch):
    """The relay inserts pending events under its own tokens: had the replay inserted them too, two copies."""
    monkeypatch.setenv("OUTBOX_MAX_EVENT_ATTEMPTS", "1")
    url = relay_env["OUTBOX_DATABASE_URL"]
    day = utc_today()
    publish_on(url, day, 100)
    publish_poison(url, day)
    assert run_relay().success
    assert (outbox.counts().processed, outbox.counts().failed) == (100, 1)
    publish_on(url, day, 40, event_type="late_event")
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.truncate()

    result = run_replay(day)

    assert result.success
    summary = result.output_for_node("replay_outbox_day")
    assert (summary["events_found"], summary["inserted"], summary["left_to_relay"], summary["failed_kept"]) == (141, 100, 40, 1)
    assert run_relay().success
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (140, 140)


def test_replay_inserts_again_when_clickhouse_remembers_the_token_of_lost_rows(relay_env, outbox):
    """ClickHouse drops an insert whose token it has seen, even when those rows were deleted since."""
    day = utc_today()
    events = publish_on(relay_env["OUTBOX_DATABASE_URL"], day, 50)
    assert run_relay().success
    lost = [str(e.event_id) for e in events[:10]]
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        lose_rows(event_log, lost)
        first = replay_day(outbox, event_log, day, chunk_size=1_000)
        lose_rows(event_log, lost)  # lost again: the next replay sees exactly the same missing events
        second = replay_day(outbox, event_log, day, chunk_size=1_000)
        counts = event_log.counts()
    assert (first.inserted, first.token_rounds) == (10, 0)
    assert (second.inserted, second.token_rounds) == (10, 1)
    assert counts == (50, 50)


class FirstLookRecorder:
    """Passes through to ClickHouse and remembers each chunk's first answer: the view before any insert."""

    def __init__(self, store: EventLogStore, replay_first_looks: dict | None = None):
        self.store = store
        self.first_looks: dict = {}
        self.replay_first_looks = replay_first_looks

    def present_event_ids(self, day, event_ids):
        key = tuple(event_ids)
        if key not in self.first_looks:
            answer = self.store.present_event_ids(day, event_ids)
            if self.replay_first_looks is not None:
                answer = self.replay_first_looks[key]
            self.first_looks[key] = answer
            return answer
        return self.store.present_event_ids(day, event_ids)

    def insert_csv(self, csv_block, *, deduplication_token):
        self.store.insert_csv(csv_block, deduplication_token=deduplication_token)

    def refresh_typed_day(self, day):
        return self.store.refresh_typed_day(day)


def test_two_replays_that_saw_the_same_missing_events_leave_one_copy(relay_env, outbox):
    day = utc_today()
    events = publish_on(relay_env["OUTBOX_DATABASE_URL"], day, 120)
    assert run_relay().success
    lost = [str(e.event_id) for e in events[5:30]]
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        lose_rows(event_log, lost)
        first_view = FirstLookRecorder(event_log)
        first = replay_day(outbox, first_view, day, chunk_size=40)
        # A second replay that looked at ClickHouse at the same moment as the first, before its
        # insert landed: it sends the same events under the same token, and ClickHouse keeps one copy.
        second = replay_day(outbox, FirstLookRecorder(event_log, first_view.first_looks), day, chunk_size=40)
        counts = event_log.counts()
    assert (first.inserted, first.chunks_inserted) == (25, 1)
    assert (second.inserted, second.token_rounds) == (25, 0)  # sent again, dropped as a repeat
    assert counts == (120, 120)


def test_a_day_older_than_the_retention_fails_with_a_clear_message(relay_env, monkeypatch):
    monkeypatch.setenv("OUTBOX_RETENTION_DAYS", "30")
    day = utc_today() - dt.timedelta(days=31)
    publish_on(relay_env["OUTBOX_DATABASE_URL"], day, 3)

    result = run_replay(day)

    assert not result.success
    message = step_failure_message(result)
    assert f"cannot replay {day.isoformat()}: it is older than the outbox retention of 30 days" in message
    assert "OUTBOX_RETENTION_DAYS" in message and "the oldest day that can be replayed is" in message
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (0, 0)


def test_retention_boundary():
    now = dt.datetime(2026, 11, 29, 11, 3, tzinfo=dt.UTC)
    check_within_retention(dt.date(2026, 10, 31), 30, now)  # starts after the cutoff (2026-10-30 11:03)
    with pytest.raises(ReplayOutsideRetentionError, match="oldest day that can be replayed is 2026-10-31"):
        check_within_retention(dt.date(2026, 10, 30), 30, now)  # partly before the cutoff
    midnight = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    check_within_retention(dt.date(2026, 10, 30), 30, midnight)
    with pytest.raises(ReplayOutsideRetentionError, match="is 2026-10-30"):
        check_within_retention(dt.date(2026, 10, 29), 30, midnight)


def test_replay_tokens_name_the_day_the_events_and_the_round():
    ids = ["6d0e1f6a-0000-4000-8000-000000000001", "6d0e1f6a-0000-4000-8000-000000000002"]
    day = dt.date(2026, 11, 29)
    token = replay_token("inst", day, ids)
    assert token == replay_token("inst", day, list(ids))
    assert token.startswith("replay-inst-2026-11-29-2-")
    assert len({token, replay_token("inst", day, ids[:1]), replay_token("inst", day + dt.timedelta(days=1), ids),
                replay_token("other", day, ids), replay_token("inst", day, ids, 2)}) == 5


def test_replay_without_a_partition_says_how_to_choose_one(relay_env):
    from outbox_pipeline.definitions import build_resources
    from outbox_pipeline_tests.support.default_relay import replay_outbox_events

    result = replay_outbox_events.execute_in_process(resources=build_resources(), raise_on_error=False)
    assert not result.success
    assert "choose a partition" in step_failure_message(result)


def test_dagster_job_execute_replays_one_day_from_the_shell(relay_env, outbox):
    """The command from the operating guide, in a real process."""
    day = utc_today()
    publish_on(relay_env["OUTBOX_DATABASE_URL"], day, 500)
    assert run_relay().success
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.truncate()
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
    command = [dagster, "job", "execute", "-m", "outbox_pipeline.definitions", "-j", "replay_outbox_events",
               "--tags", json.dumps({"dagster/partition": day.isoformat()})]
    env = {key: value for key, value in os.environ.items() if key != "DAGSTER_HOME"}

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{day.isoformat()}: 500 events in the outbox, 0 already in ClickHouse, 500 inserted" in result.stdout + result.stderr
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (500, 500)
