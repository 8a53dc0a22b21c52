import dagster as dg

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.orchestration.fleet_defs import FLEET_TAG
from outbox_pipeline_tests.support.default_relay import follow_outbox_fleet, outbox_pending_sensor, pending_sensor_from_env
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay


def evaluate(instance: dg.DagsterInstance):
    with dg.build_sensor_context(instance=instance, resources={"outbox": build_resources()["outbox"]}) as context:
        return pending_sensor_from_env()(context)


def run_requests(result) -> list[dg.RunRequest]:
    if isinstance(result, dg.RunRequest):
        return [result]
    if isinstance(result, dg.SensorResult):
        return list(result.run_requests or [])
    return []


def test_sensor_runs_by_default_every_few_seconds():
    assert outbox_pending_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert outbox_pending_sensor.minimum_interval_seconds <= 10


def test_sensor_skips_an_empty_outbox(relay_env):
    with dg.instance_for_test() as instance:
        result = evaluate(instance)
    assert isinstance(result, dg.SkipReason) and "no pending events" in result.skip_message


def test_sensor_requests_a_tagged_run_when_events_are_pending(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 3)
    with dg.instance_for_test() as instance:
        [request] = run_requests(evaluate(instance))
    assert request.tags[FLEET_TAG] == "true"
    assert request.job_name == "follow_outbox_fleet"
    assert request.run_key


def test_sensor_does_not_request_while_the_fleet_s_run_is_active(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 3)
    with dg.instance_for_test() as instance:
        # (QUEUED is in the same filter; a queued run cannot be created without a code location.)
        for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED):
            run = instance.create_run_for_job(follow_outbox_fleet, status=status)
            result = evaluate(instance)
            assert isinstance(result, dg.SkipReason), status
            assert run.run_id in result.skip_message
            instance.delete_run(run.run_id)
        assert run_requests(evaluate(instance))


def test_sensor_run_key_is_stable_until_the_work_or_the_last_run_changes(relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 3)
    with dg.instance_for_test() as instance:
        first = run_requests(evaluate(instance))[0].run_key
        assert run_requests(evaluate(instance))[0].run_key == first  # the daemon launches a key once
        publish_raw(url, 1, start=3)
        second = run_requests(evaluate(instance))[0].run_key
        assert second != first
        assert run_relay(instance).success
        assert isinstance(evaluate(instance), dg.SkipReason)


def test_sensor_backs_off_after_failed_runs(relay_env, monkeypatch):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 3)
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(follow_outbox_fleet, status=dg.DagsterRunStatus.STARTED)
        instance.report_run_failed(run)
        result = evaluate(instance)
    assert isinstance(result, dg.SkipReason) and "next attempt in" in result.skip_message


def test_sensor_reports_an_unreachable_outbox_as_a_skip(relay_env, monkeypatch):
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    with dg.instance_for_test() as instance:
        result = evaluate(instance)
    assert isinstance(result, dg.SkipReason) and "cannot reach PostgreSQL" in result.skip_message
