"""One relay run follows a steady stream: exactly once, bounded, and it ends by itself.

Real stores throughout: a producer thread commits events into the PostgreSQL outbox
while ``process_outbox_events`` runs in process against chDB.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg

from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

# Short limits so a test takes seconds: look every 0.1 s, a window per second, quiet after 1.5 s.
FAST = {"interval_seconds": 0.1, "window_seconds": 1.0, "quiet_seconds": 1.5}


class Producer(threading.Thread):
    """Commits ``per_round`` events every ``pause`` seconds until ``seconds`` after the run loaded its first events.

    Counted from the run's first load, not from the producer's start: a run slow to start (a busy machine
    takes seconds to start one) still has a stream of ``seconds`` to follow, not the tail of one.
    """

    def __init__(self, url: str, *, seconds: float, per_round: int = 20, pause: float = 0.1):
        super().__init__(daemon=True)
        self.url, self.seconds, self.per_round, self.pause = url, seconds, per_round, pause
        self.published = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            outbox = OutboxStore.connect(self.url)
            try:
                stop = time.monotonic() + 120  # a run that never loads fails its test; the stream ends anyway
                loaded = False
                while time.monotonic() < stop:
                    publish_raw(self.url, self.per_round, start=self.published)
                    self.published += self.per_round
                    if not loaded and outbox.counts().processed > 0:
                        loaded, stop = True, time.monotonic() + self.seconds
                    time.sleep(self.pause)
            finally:
                outbox.close()
        except BaseException as exc:  # surfaced by the test
            self.failure = exc

    def finish(self) -> int:
        self.join(timeout=60)
        assert self.failure is None, self.failure
        return self.published


def materializations(instance: dg.DagsterInstance, run_id: str) -> list:
    records = instance.fetch_materializations(dg.AssetKey("event_log"), limit=1000).records
    return [record for record in records if record.run_id == run_id]


def test_a_run_follows_a_stream_exactly_once_and_ends_when_it_goes_quiet(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 50, start=100_000)  # the backlog the run starts with
    # The stream goes on for 5 s after the run's first load: it outlasts the run's start and backlog.
    producer = Producer(url, seconds=5.0)
    producer.start()
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = run_relay(instance, follow={"follow_seconds": 60, **FAST})
        took = time.monotonic() - started
        published = producer.finish() + 50
        assert result.success
        followed = result.output_for_node("follow_outbox")
        windows = materializations(instance, result.run_id)
        stats = instance.get_run_stats(result.run_id)

    assert followed["ended"] == "quiet"
    # It ran while the producer did, then stopped about quiet_seconds after the last event: not at its maximum.
    assert 5.0 <= took < 30
    assert followed["drains"] >= 5  # it kept loading as events arrived, not once at the end
    backlog = result.output_for_node("report_relay_run")["events_loaded"]
    assert backlog + followed["events_loaded"] == published
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (published, published)
    assert outbox.counts().pending == 0
    # One materialization for the backlog and one per window: far fewer than the loads, and one Dagster step.
    assert 2 <= len(windows) <= followed["drains"]
    assert sum(w.asset_materialization.metadata["events_loaded"].value for w in windows) == published
    # extract, report and follow, plus a load and a mark per batch the backlog claimed (the producer may
    # commit between two claims): the following itself adds no step.
    backlog_batches = result.output_for_node("report_relay_run")["batches"]
    assert stats.steps_succeeded == 3 + 2 * backlog_batches


def test_a_following_run_stops_at_its_maximum_and_the_next_run_takes_the_rest(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    producer = Producer(url, seconds=4.0)
    producer.start()
    first = run_relay(follow={"follow_seconds": 1.5, **FAST})
    assert first.success
    followed = first.output_for_node("follow_outbox")
    assert followed["ended"] == "maximum"
    assert followed["seconds"] < 3.5  # it did not wait for the producer to stop
    published = producer.finish()
    assert 0 < followed["events_loaded"] < published

    second = run_relay()  # OUTBOX_FOLLOW_SECONDS=0 in the tests' environment: the backlog only
    assert second.success and second.output_for_node("follow_outbox")["ended"].startswith("not following")
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (published, published)
    assert outbox.counts().pending == 0


def test_follow_seconds_zero_ends_the_run_with_its_backlog(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 10)
    started = time.monotonic()
    result = run_relay(follow={"follow_seconds": 0, "quiet_seconds": 30})
    assert result.success and time.monotonic() - started < 20
    assert result.output_for_node("follow_outbox")["drains"] == 0
    assert result.output_for_node("report_relay_run")["events_loaded"] == 10


def test_a_command_reads_the_embedded_clickhouse_while_a_run_follows_the_stream(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 30)
    outcome = {}
    run = threading.Thread(
        target=lambda: outcome.update(result=run_relay(follow={"follow_seconds": 60, **FAST, "quiet_seconds": 10})),
        daemon=True,
    )
    run.start()
    # The run has loaded and marked its backlog: it now follows, holding the chDB directory.
    deadline = time.monotonic() + 60
    while outbox.counts().processed < 30:
        assert time.monotonic() < deadline and run.is_alive(), "the run never loaded its backlog"
        time.sleep(0.05)
    # `outbox-pipeline status` in another process waits for the directory; the run lets go between two loads.
    status = subprocess.run(
        [str(Path(sys.executable).parent / "outbox-pipeline"), "status", "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS": "4"},
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["clickhouse_rows"] == 30
    publish_raw(url, 20, start=30)  # the run takes the directory back and relays these too
    run.join(timeout=60)
    result = outcome["result"]
    assert result.success and result.output_for_node("follow_outbox")["ended"] == "quiet"
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (50, 50)


def test_a_drain_takes_what_is_pending_and_leaves_what_commits_meanwhile_to_the_next_look(relay_env, outbox):
    # Claiming on until the outbox is empty would follow a steady stream one tiny batch at a time,
    # a core busy for a few events each (10-event commits every 10 ms kept a drain claiming for good).
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 30)
    committed_meanwhile = []

    def commit_more(handle, result):
        if not committed_meanwhile:
            committed_meanwhile.extend(publish_raw(url, 10, start=30))

    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        event_log.migrate()
        relay = Relay(outbox, event_log, RelayPolicy(batch_size=100), claimed_by="test")
        first = relay.drain(on_loaded=commit_more)
        assert (first.batches, first.events_loaded, len(committed_meanwhile)) == (1, 30, 10)
        assert outbox.counts().pending == 10
        second = relay.drain()
        assert (second.batches, second.events_loaded) == (1, 10)
        assert event_log.counts() == (40, 40)
        # A full batch is not the tail: a backlog is drained whole.
        publish_raw(url, 250, start=40)
        backlog = relay.drain()
        assert (backlog.batches, backlog.events_loaded) == (3, 250)
        assert outbox.counts().pending == 0
