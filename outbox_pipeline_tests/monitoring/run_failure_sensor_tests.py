"""The run-failure sensor reports failed runs that no op hook saw, and only those.

The sensor is evaluated directly with ``dg.build_run_status_sensor_context``
(the daemon is what calls it in production). Where the run monitoring daemon
would mark a dead run worker's run failed, the test does what it does:
``instance.report_run_failed(run, message)``.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import pytest

from outbox_pipeline.monitoring.run_monitor import CHECK_IN_TAG, TRACE_ID_TAG, TRANSACTION_STATUS_TAG
from outbox_pipeline.orchestration.run_failure_sensor import SENSOR_NAME, failure_kind
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.monitoring.envelopes import check_ins, errors, trace, transactions
from outbox_pipeline_tests.support.default_relay import process_outbox_events, requeue_failed_events, run_failure_sensor_from_env
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

WORKER_DIED = (
    "Detected run worker status WorkerStatus.FAILED: 'Run worker process exited with code -9'. Marking run {} as failed."
)


def failure_event(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterEvent:
    [record] = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return record.event_log_entry.dagster_event


def evaluate(instance: dg.DagsterInstance, run_id: str):
    context = dg.build_run_status_sensor_context(
        sensor_name=SENSOR_NAME,
        dagster_event=failure_event(instance, run_id),
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id),
    ).for_run_failure()
    return run_failure_sensor_from_env()(context)


def test_failure_before_the_first_step_is_reported_with_a_transaction(recorder):
    instance = dg.DagsterInstance.ephemeral()
    run = instance.create_run_for_job(job_def=process_outbox_events)
    instance.report_run_failed(run, WORKER_DIED.format(run.run_id))

    result = evaluate(instance, run.run_id)

    assert "reported to Sentry" in result.skip_message
    [event] = errors(recorder)
    assert event["level"] == "error"
    assert event["fingerprint"] == ["dagster-run-failure", "process_outbox_events", "run_worker_failed"]
    assert event["tags"]["dagster.job"] == "process_outbox_events"
    assert event["tags"]["dagster.run_id"] == run.run_id
    assert event["tags"]["dagster.failure_kind"] == "run_worker_failed"
    assert "exited with code -9" in event["message"] or "exited with code -9" in event["logentry"]["message"]
    # The saved query of failed runs finds this run too.
    [transaction] = transactions(recorder)
    assert trace(transaction)["op"] == "process_events"
    assert trace(transaction)["status"] == "internal_error"
    assert "exited with code -9" in trace(transaction)["data"]["error"]
    assert transaction["tags"]["dagster.run_id"] == run.run_id
    assert check_ins(recorder) == []  # the run never opened one
    assert instance.get_run_by_id(run.run_id).tags[TRANSACTION_STATUS_TAG] == "internal_error"


def test_other_jobs_get_the_event_but_no_relay_transaction(recorder):
    instance = dg.DagsterInstance.ephemeral()
    run = instance.create_run_for_job(job_def=requeue_failed_events)
    instance.report_run_failed(run, "Exceeded maximum runtime of 600 seconds.")

    evaluate(instance, run.run_id)

    [event] = errors(recorder)
    assert event["fingerprint"] == ["dagster-run-failure", "requeue_failed_events", "run_timeout"]
    assert transactions(recorder) == []


def test_failure_seen_by_an_op_hook_is_not_reported_again(relay_env, outbox, recorder, monkeypatch):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 3)
    monkeypatch.setenv("CLICKHOUSE_URL", "http://127.0.0.1:9/nowhere")  # connection refused: the load fails
    instance = dg.DagsterInstance.ephemeral()
    result = run_relay(instance)
    assert not result.success
    [hook_event] = errors(recorder)
    [transaction] = transactions(recorder)

    sensor_result = evaluate(instance, result.run_id)

    assert "reported by its op hook" in sensor_result.skip_message
    time.sleep(0.3)
    assert errors(recorder) == [hook_event]
    assert transactions(recorder) == [transaction]


def test_nothing_is_sent_when_sentry_is_off(recorder, monkeypatch):
    monkeypatch.delenv("SENTRY_CONFIG_DSN")
    instance = dg.DagsterInstance.ephemeral()
    run = instance.create_run_for_job(job_def=process_outbox_events)
    instance.report_run_failed(run, WORKER_DIED.format(run.run_id))

    evaluate(instance, run.run_id)

    time.sleep(0.3)
    assert recorder.envelopes == []


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (WORKER_DIED, "run_worker_failed"),
        ("Exceeded maximum runtime of 600 seconds.", "run_timeout"),
        ("This run has been marked as failed from outside the execution context.", "run_failed"),
    ],
)
def test_failure_kinds_come_from_the_failure_not_its_wording_details(message, kind):
    instance = dg.DagsterInstance.ephemeral()
    run = instance.create_run_for_job(job_def=process_outbox_events)
    instance.report_run_failed(run, message.format(run.run_id))
    assert failure_kind(failure_event(instance, run.run_id)) == kind


WORKER = textwrap.dedent(
    """
    import dagster as dg
    from outbox_pipeline_tests.support.relay_runs import run_relay

    run_relay(dg.DagsterInstance.get(), run_config={"batch_size": 10})
    """
)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["killed", "interrupted"])
def test_run_worker_stopped_in_the_middle_of_a_load(relay_env, outbox, recorder, tmp_path, monkeypatch, signum):
    """A real run worker, stopped while it waits in load_batch for the embedded ClickHouse the test holds.

    SIGKILL: nothing of the worker runs any more; the sensor reports the run,
    sends its transaction and closes the check-in the worker opened. SIGINT
    (how a run is terminated, e.g. on a run timeout): the worker finishes its
    transaction and check-in, but an interrupted step runs no hook, so the
    error event comes from the sensor.
    """
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 5)
    instance = dg.DagsterInstance.get()
    with event_log_store(relay_env["CLICKHOUSE_URL"]):
        worker = subprocess.Popen([sys.executable, "-c", WORKER], env=dict(os.environ))
        try:
            run = wait_for_load_step(instance, worker)
            worker.send_signal(signum)
            worker.wait(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    run = instance.get_run_by_id(run.run_id)
    opened = recorder.wait_for(lambda r: check_ins(r))[0]
    assert opened["status"] == "in_progress"
    assert opened["check_in_id"] == run.tags[CHECK_IN_TAG]
    if signum == signal.SIGKILL:
        assert not run.is_finished
        instance.report_run_failed(run, WORKER_DIED.format(run.run_id))  # the monitoring daemon's part
        assert transactions(recorder) == []
    else:
        assert run.status == dg.DagsterRunStatus.FAILURE
        [transaction] = transactions(recorder)
        assert trace(transaction)["status"] == "internal_error"
        assert "Interrupted" in trace(transaction)["data"]["error"]
        assert [c["status"] for c in check_ins(recorder)] == ["in_progress", "error"]
    assert errors(recorder) == []  # no hook ran
    recorder.clear()

    evaluate(instance, run.run_id)

    run = instance.get_run_by_id(run.run_id)
    [event] = errors(recorder)
    assert event["fingerprint"][:2] == ["dagster-run-failure", "process_outbox_events"]
    assert event["tags"]["dagster.run_id"] == run.run_id
    assert run.tags[TRANSACTION_STATUS_TAG] == "internal_error"
    if signum == signal.SIGKILL:
        assert event["fingerprint"][2] == "run_worker_failed"
        [transaction] = transactions(recorder)
        assert trace(transaction)["status"] == "internal_error"
        assert trace(transaction)["trace_id"] == run.tags[TRACE_ID_TAG]
        [closed] = check_ins(recorder)
        assert (closed["status"], closed["check_in_id"]) == ("error", opened["check_in_id"])
    else:
        assert event["fingerprint"][2] == "run_interrupted"
        assert transactions(recorder) == [] and check_ins(recorder) == []
    assert outbox.counts().pending == 5
    instance.dispose()


def wait_for_load_step(instance: dg.DagsterInstance, worker: subprocess.Popen) -> dg.DagsterRun:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the run worker ended early"
        runs = instance.get_runs(dg.RunsFilter(job_name="process_outbox_events"))
        if runs and TRACE_ID_TAG in runs[0].tags:
            started = instance.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START).records
            if any(r.event_log_entry.step_key.startswith("load_batch") for r in started):
                return runs[0]
        time.sleep(0.1)
    raise TimeoutError("the run worker never reached load_batch")


def test_a_dead_fleet_run_gets_each_relay_s_transaction_and_check_in_closed(recorder):
    from outbox_pipeline.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    run = instance.create_run_for_job(job_def=defs.resolve_job_def("follow_outbox_fleet"))
    # What the fleet's monitors tag as the run starts: each relay's trace and open check-in, under its own name.
    trace_ids = {"default": "a" * 32, "orders": "b" * 32}
    instance.add_run_tags(run.run_id, {
        **{f"{TRACE_ID_TAG}/{relay}": trace_id for relay, trace_id in trace_ids.items()},
        f"{CHECK_IN_TAG}/orders": "c" * 32,
    })
    instance.report_run_failed(run, WORKER_DIED.format(run.run_id))

    evaluate(instance, run.run_id)

    [event] = errors(recorder)
    assert event["fingerprint"] == ["dagster-run-failure", "follow_outbox_fleet", "run_worker_failed"]
    finished = {t["tags"]["outbox.relay"]: t for t in transactions(recorder)}
    assert set(finished) == {"default", "orders"}
    for relay, transaction in finished.items():
        assert trace(transaction)["trace_id"] == trace_ids[relay]
        assert trace(transaction)["status"] == "internal_error"
        assert transaction["transaction"] == "process_outbox_events"
    [closed] = check_ins(recorder)
    assert (closed["status"], closed["check_in_id"], closed["monitor_slug"]) == ("error", "c" * 32, "outbox-relay-orders")
    tags = instance.get_run_by_id(run.run_id).tags
    assert tags[f"{TRANSACTION_STATUS_TAG}/orders"] == tags[f"{TRANSACTION_STATUS_TAG}/default"] == "internal_error"
