"""SIGKILL a relay run right after each durable step, then run again: every event lands exactly once.

The run is a real process (outbox_pipeline_tests/support/relay_worker.py) that
kills itself with SIGKILL right after the claim committed, after ClickHouse
acknowledged the insert, or after the mark committed. The next run takes the
dead run's batches over when their lease (OUTBOX_LEASE_SECONDS=3) expires.
"""

import datetime as dt
import signal
import time

import pytest

from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay
from outbox_pipeline_tests.support.relay_worker import run_worker

EVENTS = 3_000
BATCH = 1_000
# Longer than the dying run takes from its claims to its loads on a busy machine: with 1 s, a job run on two cores
# shared with other test processes saw its own lease expire and claimed its batch again before it died.
LEASE_SECONDS = "3"


@pytest.fixture
def short_lease_env(relay_env, monkeypatch):
    monkeypatch.setenv("OUTBOX_LEASE_SECONDS", LEASE_SECONDS)
    return {**relay_env, "OUTBOX_LEASE_SECONDS": LEASE_SECONDS}


def batches(outbox) -> list[tuple]:
    return outbox.conn.execute("SELECT id, state, claim_count, row_count FROM outbox_batch ORDER BY id").fetchall()


def wait_for_expired_leases(outbox, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while outbox.conn.execute("SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at >= now()").fetchone()[0]:
        assert time.monotonic() < deadline, "the dead run's leases never expired"
        time.sleep(0.2)


def kill_run(env: dict, runner: str, step: str, *, kill_at: int = 1) -> None:
    died = run_worker(runner, "--kill-after", step, "--kill-at", str(kill_at), "--batch-size", str(BATCH), env=env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert "READY" in died.stdout  # it died inside the run, not before


# (runner, kill point, n-th step): the job claims its batches up front, then loads and marks
# them; the drain loop claims, loads and marks one batch at a time; the following job loads
# one batch of its backlog, then the others in its follow_outbox op, where the 2nd insert happens.
KILLS = [
    ("job", "claim", 1), ("job", "insert", 1), ("job", "insert", 2), ("job", "mark", 1), ("drain", "insert", 2),
    ("follow", "insert", 2),
]


def assert_died_right_after(step: str, kill_at: int, rows: int, processed: int) -> None:
    """What a run killed right after its n-th claim, insert or mark must have left behind."""
    if step == "claim":
        assert (rows, processed) == (0, 0)
    elif step == "insert":
        # n batches in ClickHouse, the last of them not marked
        assert rows == kill_at * BATCH and processed < rows
    else:
        assert processed == kill_at * BATCH and rows >= processed


@pytest.mark.parametrize("runner, step, kill_at", KILLS)
def test_sigkill_after_each_step_then_a_new_run_delivers_every_event_exactly_once(short_lease_env, outbox, runner, step, kill_at):
    publish_raw(short_lease_env["OUTBOX_DATABASE_URL"], EVENTS)

    kill_run(short_lease_env, runner, step, kill_at=kill_at)

    with event_log_store(short_lease_env["CLICKHOUSE_URL"]) as event_log:
        rows_left, distinct_left = event_log.counts()
    assert rows_left == distinct_left
    processed_left = outbox.counts().processed
    assert_died_right_after(step, kill_at, rows_left, processed_left)
    left = {batch_id: (state, claims) for batch_id, state, claims, _ in batches(outbox)}
    assert sorted(left.values()) == sorted([("done", 1)] * (processed_left // BATCH) + [("claimed", 1)] * (len(left) - processed_left // BATCH))
    assert any(state == "claimed" for state, _ in left.values())

    wait_for_expired_leases(outbox)
    restarted_at = dt.datetime.now(dt.UTC)
    result = run_relay(run_config={"batch_size": BATCH})
    assert result.success

    with event_log_store(short_lease_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (EVENTS, EVENTS)
        loaded_before_restart = event_log.client.command(
            "SELECT count() FROM event_log WHERE loaded_at < {t:DateTime64(6, 'UTC')}", parameters={"t": restarted_at}
        )
    counts = outbox.counts()
    assert (counts.pending, counts.processed, counts.failed) == (0, EVENTS, 0)
    # The dead run's unmarked batches were taken over (claim_count 2); no other batch was claimed twice.
    after = {batch_id: (state, claims) for batch_id, state, claims, _ in batches(outbox)}
    assert len(after) == EVENTS // BATCH
    for batch_id, (state, claims) in after.items():
        taken_over = left.get(batch_id, ("new", 0))[0] == "claimed"
        assert (state, claims) == ("done", 2 if taken_over else 1), (batch_id, left, after)
    # Rows the dead run inserted kept their first copy: the retaken batches' inserts under the same
    # deduplication tokens wrote nothing (a second copy, even merged away, would carry a later loaded_at).
    assert loaded_before_restart == rows_left
