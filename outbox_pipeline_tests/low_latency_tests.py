import threading
import time

import dagster as dg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.sensors_tests import evaluate, run_requests
from outbox_pipeline_tests.support.default_relay import relay_low_latency
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


def test_low_latency_run_relays_events_committed_while_it_runs(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 5, start=0)  # already waiting when the run starts

    def producer():
        # The rounds start once the run has taken the first events: however long the run takes to start,
        # they arrive while it runs.
        deadline = time.monotonic() + 60
        while outbox.counts().pending and time.monotonic() < deadline:
            time.sleep(0.05)
        for round_ in range(1, 6):
            publish_raw(url, 20, start=round_ * 100)
            time.sleep(0.3)

    thread = threading.Thread(target=producer)
    thread.start()
    with dg.instance_for_test() as instance:
        result = relay_low_latency.execute_in_process(
            instance=instance,
            resources=build_resources(),
            run_config={"ops": {"relay_continuously": {"config": {"max_seconds": 4.0, "min_interval_seconds": 0.05}}}},
        )
    thread.join()
    assert result.success
    summary = result.output_for_node("relay_continuously")
    assert summary["events_loaded"] == 105
    assert summary["batches"] >= 3  # woken several times, not one drain at the end
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (105, 105)
    assert outbox.counts().pending == 0


def test_low_latency_and_sensor_path_runs_never_take_the_same_events(relay_env, outbox):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 300)
    # A batch run claims part of the backlog, then the low-latency run takes the rest.
    assert run_relay(run_config={"batch_size": 100, "max_batches": 1}).success
    with dg.instance_for_test() as instance:
        result = relay_low_latency.execute_in_process(
            instance=instance, resources=build_resources(),
            run_config={"ops": {"relay_continuously": {"config": {"max_seconds": 0.5}}}},
        )
    assert result.output_for_node("relay_continuously")["events_loaded"] == 200
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (300, 300)


def test_sensor_keeps_one_low_latency_run_going_in_low_latency_mode(relay_env, monkeypatch):
    monkeypatch.setenv("OUTBOX_LOW_LATENCY", "true")
    with dg.instance_for_test() as instance:
        [request] = run_requests(evaluate(instance))  # even with nothing pending
        assert request.job_name == relay_low_latency.name
        run = instance.create_run_for_job(relay_low_latency, status=dg.DagsterRunStatus.STARTED)
        assert isinstance(evaluate(instance), dg.SkipReason)
        instance.report_run_failed(run)
        assert "failed" in evaluate(instance).skip_message  # backs off after a failure
    monkeypatch.setenv("OUTBOX_LOW_LATENCY", "false")
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 1)
    with dg.instance_for_test() as instance:
        [request] = run_requests(evaluate(instance))
        assert request.job_name == "follow_outbox_fleet"
