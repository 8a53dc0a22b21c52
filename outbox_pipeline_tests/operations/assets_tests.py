"""The event_log asset: what the relay records on it, and its checks on the real stores."""

import psycopg

import dagster as dg

from outbox_pipeline.definitions import build_resources, defs
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

PLOTTED = {"events_loaded", "batches", "duration_seconds", "events_per_second", "queue_size", "oldest_pending_age_seconds"}


def run_checks(instance: dg.DagsterInstance | None = None, **freshness_config):
    run_config = {"ops": {"event_log_freshness": {"config": freshness_config}}} if freshness_config else None
    job = defs.resolve_job_def("check_event_log")
    return job.execute_in_process(instance=instance, resources=build_resources(), run_config=run_config, raise_on_error=False)


def evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()}


def test_relay_materializes_event_log_with_numeric_metadata_that_plots(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 120)
    with dg.instance_for_test() as instance:
        assert run_relay(instance, run_config={"batch_size": 50}).success
        record = instance.get_latest_materialization_event(dg.AssetKey("event_log"))
    metadata = record.asset_materialization.metadata
    assert PLOTTED <= set(metadata)
    for key in PLOTTED:
        # The UI plots int and float metadata over the materializations; text would not plot.
        assert isinstance(metadata[key], (dg.IntMetadataValue, dg.FloatMetadataValue)), key
    assert metadata["events_loaded"].value == 120 and metadata["batches"].value == 3


def test_checks_pass_on_a_delivered_outbox_without_duplicates(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 30)
    assert run_relay().success

    result = run_checks()

    assert result.success
    checks = evaluations(result)
    assert checks["no_duplicates"].passed
    assert checks["no_duplicates"].metadata["rows"].value == 30
    assert checks["freshness"].passed
    assert checks["freshness"].metadata["queue_size"].value == 0


def test_duplicate_check_fails_as_an_error_when_an_event_is_there_twice(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 10)
    assert run_relay().success
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        # A second copy of one row, as an insert under another token would leave it.
        event_log.client.command("INSERT INTO event_log SELECT * FROM event_log LIMIT 1")

    check = evaluations(run_checks())["no_duplicates"]

    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert (check.metadata["rows"].value, check.metadata["duplicate_rows"].value) == (11, 1)


def test_freshness_check_warns_when_the_oldest_pending_event_passes_the_threshold(relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 4)
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE outbox SET created_at = now() - interval '10 minutes'")

    late = evaluations(run_checks(max_lag_seconds=120))["freshness"]
    relaxed = evaluations(run_checks(max_lag_seconds=3600))["freshness"]

    assert not late.passed and late.severity == dg.AssetCheckSeverity.WARN
    assert late.metadata["oldest_pending_age_seconds"].value >= 600 and late.metadata["queue_size"].value == 4
    assert relaxed.passed
