"""Exactly one Sentry transaction and one check-in pair per relay run, whoever runs it.

Each way of running the relay is exercised as a user runs it: `dagster job
execute` (a real process that, after the run, opens the run's result, which sets
the job's resources up a second time), a run queued with `dagster job launch`
and started by a real `dagster-daemon`, `execute_in_process`, and the
`outbox-pipeline relay` command. Everything reaches the recording Sentry server
through the real sentry-sdk transport.
"""

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from outbox_pipeline.monitoring.run_monitor import TRACE_ID_TAG, TRANSACTION_STATUS_TAG
from outbox_pipeline_tests.monitoring.envelopes import check_ins, errors, metrics_named, trace, transactions
from outbox_pipeline_tests.support.clickhouse_http_server import closed_port_url
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EVENTS = 25
BATCH_SIZE = 10  # three batches


def command(name: str, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    executable = BIN / name
    assert executable.exists(), f"{executable} is not installed"
    return subprocess.run([str(executable), *args], env=dict(os.environ), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def summary(recorder) -> str:
    lines = [f"transaction {trace(t)['trace_id']} with {len(t['spans'])} spans" for t in transactions(recorder)]
    lines += [f"check-in {c['status']} {c['check_in_id']}" for c in check_ins(recorder)]
    return "; ".join(lines) or "nothing"


def the_one_report(recorder, *, dagster_run: bool = True) -> dict:
    """The run's transaction, after checking it is the only one and that one check-in pair goes with it."""
    time.sleep(0.3)  # anything sent late would be here by now
    sent = transactions(recorder)
    assert len(sent) == 1, f"expected one transaction and one check-in pair, got: {summary(recorder)}"
    assert [c["status"] for c in check_ins(recorder)] == ["in_progress", "ok"], summary(recorder)
    opened, closed = check_ins(recorder)
    assert opened["check_in_id"] == closed["check_in_id"]
    [transaction] = sent
    assert trace(transaction)["status"] == "ok"
    data = trace(transaction)["data"]
    assert data["events_processed"] == EVENTS and data["batches"] == 3
    ops = collections.Counter(span["op"] for span in transaction["spans"])
    if dagster_run:
        # An extract span per claim (the run stops at its backlog's tail), a load and a mark per batch.
        assert ops["extract"] >= 3 and (ops["load"], ops["mark"]) == (3, 3), ops
    else:
        assert ops == {}, ops  # the command's drain loop has no spans of its own
    return transaction


def run_config_file(folder: Path) -> str:
    path = folder / "run_config.yaml"
    path.write_text(f"ops:\n  extract_outbox_batches:\n    config:\n      batch_size: {BATCH_SIZE}\n")
    return str(path)


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # Only the run under test: no sensor may start relay runs or send heartbeats of its own.
    monkeypatch.setenv("OUTBOX_SENSOR_ENABLED", "false")
    monkeypatch.setenv("OUTBOX_LAG_SENSOR_ENABLED", "false")
    return home


def test_dagster_job_execute(relay_env, outbox, recorder, dagster_home, tmp_path):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)

    done = command(
        "dagster", "job", "execute", "-m", "outbox_pipeline.definitions", "-j", "process_outbox_events",
        "-c", run_config_file(tmp_path),
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    transaction = the_one_report(recorder)
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        assert run.tags[TRACE_ID_TAG] == trace(transaction)["trace_id"]
        assert run.tags[TRANSACTION_STATUS_TAG] == "ok"
        assert transaction["tags"]["dagster.run_id"] == run.run_id
    assert outbox.counts().pending == 0


def test_run_launched_by_the_daemon(relay_env, outbox, recorder, dagster_home, tmp_path):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    workspace = str(REPO_ROOT / "workspace.yaml")
    # Create the instance's storage before two processes race to create it.
    dg.DagsterInstance.get().dispose()
    with open(tmp_path / "daemon.log", "w") as log:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", workspace],
            env=dict(os.environ), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        launched = command(
            "dagster", "job", "launch", "-w", workspace, "-j", "process_outbox_events",
            "-c", run_config_file(tmp_path),
            cwd=tmp_path,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        with dg.DagsterInstance.get() as instance:
            run = wait_for_finished_run(instance, daemon, tmp_path / "daemon.log")
            assert run.status == dg.DagsterRunStatus.SUCCESS
            recorder.wait_for(lambda r: len(check_ins(r)) >= 2, timeout=10)
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait(timeout=60)

    transaction = the_one_report(recorder)
    assert run.tags[TRACE_ID_TAG] == trace(transaction)["trace_id"]
    assert transaction["tags"]["dagster.run_id"] == run.run_id
    assert outbox.counts().pending == 0


def wait_for_finished_run(instance: dg.DagsterInstance, daemon: subprocess.Popen, log: Path) -> dg.DagsterRun:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"the daemon ended: {log.read_text()[-3000:]}"
        runs = instance.get_runs(dg.RunsFilter(job_name="process_outbox_events"))
        if runs and runs[0].is_finished:
            # Tags the monitor wrote at teardown are read from the stored run.
            return instance.get_run_by_id(runs[0].run_id)
        time.sleep(0.2)
    raise TimeoutError(f"the daemon did not finish the run: {log.read_text()[-3000:]}")


def test_execute_in_process(relay_env, outbox, recorder):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    instance = dg.DagsterInstance.ephemeral()

    result = run_relay(instance, run_config={"batch_size": BATCH_SIZE})

    assert result.success
    transaction = the_one_report(recorder)
    assert instance.get_run_by_id(result.run_id).tags[TRACE_ID_TAG] == trace(transaction)["trace_id"]


def test_outbox_pipeline_relay_command(relay_env, outbox, recorder, tmp_path):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)

    done = command("outbox-pipeline", "relay", "--batch-size", str(BATCH_SIZE), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    transaction = the_one_report(recorder, dagster_run=False)
    assert transaction["transaction"] == "process_outbox_events"
    assert transaction["tags"]["outbox.runner"] == "cli"
    assert trace(transaction)["data"]["queue_size_before"] == EVENTS
    assert trace(transaction)["data"]["queue_size_after"] == 0
    assert outbox.counts().pending == 0


def test_a_failed_relay_command_sends_one_report_with_its_end_of_run_figures(relay_env, outbox, recorder, tmp_path, monkeypatch):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], EVENTS)
    monkeypatch.setenv("CLICKHOUSE_URL", closed_port_url())

    done = command("outbox-pipeline", "relay", "--batch-size", str(BATCH_SIZE), cwd=tmp_path)

    assert done.returncode == 1
    assert done.stderr.startswith("outbox-pipeline: error: cannot reach ClickHouse") and done.stderr.count("\n") == 1
    time.sleep(0.3)
    [transaction] = transactions(recorder)
    assert trace(transaction)["status"] == "internal_error"
    data = trace(transaction)["data"]
    assert "cannot reach ClickHouse" in data["error"]
    assert data["queue_size_before"] == data["queue_size_after"] == EVENTS
    assert [m["value"] for m in metrics_named(recorder, "outbox.queue_size")] == [EVENTS, EVENTS]
    assert len(metrics_named(recorder, "outbox.oldest_pending_age")) == 1
    assert [c["status"] for c in check_ins(recorder)] == ["in_progress", "error"]
    [event] = errors(recorder)
    assert event["tags"]["outbox.runner"] == "cli"
    assert event["contexts"]["trace"]["trace_id"] == trace(transaction)["trace_id"]
    assert outbox.counts().pending == EVENTS
