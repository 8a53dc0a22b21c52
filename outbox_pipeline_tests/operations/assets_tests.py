"""The event_log asset: what the relay records on it, and its checks on the real stores."""

from pathlib import Path

import dagster as dg
import psycopg

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


CHECK_STATUS_QUERY = """
query CheckStatus {
  assetNodes(assetKeys: [{path: ["event_log"]}]) {
    assetChecksOrError {
      ... on AssetChecks { checks { name executionForLatestMaterialization { runId status evaluation { description } } } }
    }
  }
}
"""


def check_status_on_the_asset_page(instance: dg.DagsterInstance) -> dict[str, dict | None]:
    """What the asset page shows for each check: its execution for the latest materialization, through GraphQL."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    workspace = str(Path(__file__).resolve().parents[2] / "workspace.yaml")
    with define_out_of_process_context(workspace, None, instance) as context:
        result = execute_dagster_graphql(context, CHECK_STATUS_QUERY)
    [node] = result.data["assetNodes"]
    return {check["name"]: check["executionForLatestMaterialization"] for check in node["assetChecksOrError"]["checks"]}


def test_the_asset_page_shows_the_checks_evaluated_against_the_relays_latest_materialization(relay_env):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 40)
    with dg.instance_for_test() as instance:
        # The check job evaluates both checks; a relay run then records a newer materialization.
        assert run_checks(instance).success
        publish_raw(relay_env["OUTBOX_DATABASE_URL"], 10, start=40)
        relay = run_relay(instance)
        assert relay.success
        shown = check_status_on_the_asset_page(instance)
    for name in ("freshness", "no_duplicates"):
        assert shown[name] is not None, f"{name} shows as not evaluated against the latest materialization"
        assert (shown[name]["runId"], shown[name]["status"]) == (relay.run_id, "SUCCEEDED")


def test_a_duplicate_loaded_while_the_relay_runs_fails_its_no_duplicates_evaluation(relay_env):
    url = relay_env["OUTBOX_DATABASE_URL"]
    publish_raw(url, 10)
    assert run_relay().success
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        # A second copy of one event, loaded now (an insert under another token would leave one).
        event_log.client.command(
            "INSERT INTO event_log (event_id, event_type, event_date_time, environment, event_context) "
            "SELECT event_id, event_type, event_date_time, environment, event_context FROM event_log LIMIT 1"
        )
    publish_raw(url, 5, start=10)
    with dg.instance_for_test() as instance:
        result = run_relay(instance)
        key = dg.AssetCheckKey(dg.AssetKey("event_log"), "no_duplicates")
        [record] = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    assert record.run_id == result.run_id
    evaluation = record.evaluation
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["duplicate_rows"].value == 1
