"""Retention of Dagster's own storage: old relay runs are deleted, failed ones later, the figures rolled up.

A real SQLite DagsterInstance in a temporary directory (the storage `dagster dev`
uses: one database file per run for its event log), real relay runs on the test
stores, and the real `prune_dagster_runs` job.
"""

import os
import time
from pathlib import Path

import dagster as dg

from outbox_pipeline.config.settings import load_settings
from outbox_pipeline.definitions import build_resources, defs
from outbox_pipeline.orchestration.jobs import pruned_job_names
from outbox_pipeline.orchestration.relay_instance import RelayInstance
from outbox_pipeline.orchestration.run_history import RetentionPolicy, prune
from outbox_pipeline_tests.support.default_relay import process_outbox_events
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

EVENT_LOG = dg.AssetKey("event_log")
# Hours: runs that ended more than about a second ago are past this retention.
TINY_RETENTION_HOURS = 1 / 3600


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_prune(instance: dg.DagsterInstance, **config) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def("prune_dagster_runs").execute_in_process(
        instance=instance, resources=build_resources(), run_config={"ops": {"prune_run_history": {"config": config}}}
    )
    assert result.success
    return result


def relay_runs(instance: dg.DagsterInstance, url: str, count: int, start: int) -> int:
    for n in range(count):
        publish_raw(url, 3, start=start + 3 * n)
        assert run_relay(instance).success
    return start + 3 * count


def test_storage_stops_growing_once_the_retention_period_is_reached(relay_env, tmp_path):
    url = relay_env["OUTBOX_DATABASE_URL"]
    home = tmp_path / "dagster_home"
    home.mkdir()
    sizes, kept, files, published = [], [], [], 0
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        for _ in range(6):
            published = relay_runs(instance, url, 6, published)
            time.sleep(1.2)  # every run of this round is now past the tiny retention
            run_prune(instance, run_retention_hours=TINY_RETENTION_HOURS)
            sizes.append(directory_bytes(home))
            kept.append(len(instance.get_run_records()))
            files.append(len(os.listdir(home / "history" / "runs")))
        # Without pruning, the same 6 runs grow the storage by this much.
        before = directory_bytes(home)
        relay_runs(instance, url, 6, published)
        unpruned_growth_per_round = directory_bytes(home) - before
    # Runs stored: the latest of each job, whatever the number of rounds.
    assert kept[-1] == kept[1] <= 3, kept
    # After the second round the storage stays nearly flat (SQLite reuses the freed pages), while an unpruned round
    # grows it by its runs' event logs. What remains is Dagster's row per check execution (about 2 KB a run), which
    # delete_run keeps.
    assert unpruned_growth_per_round > 500_000, unpruned_growth_per_round
    growth_per_pruned_round = (sizes[-1] - sizes[1]) / (len(sizes) - 2)
    assert growth_per_pruned_round < unpruned_growth_per_round / 10, (sizes, unpruned_growth_per_round)
    assert files[-1] == kept[-1] + 1, files  # one event-log file per run kept, and index.db


def test_failed_runs_are_kept_longer_than_successful_ones(relay_env, tmp_path):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 5)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        failed = instance.create_run_for_job(process_outbox_events, status=dg.DagsterRunStatus.STARTED)
        instance.report_run_failed(failed)
        succeeded = [run_relay(instance).run_id for _ in range(3)]
        time.sleep(1.2)

        first = run_prune(instance, run_retention_hours=TINY_RETENTION_HOURS).output_for_node("prune_run_history")
        remaining = {record.dagster_run.run_id for record in instance.get_run_records()}
        assert failed.run_id in remaining  # younger than the failed-run retention (30 days)
        assert set(succeeded[:-1]).isdisjoint(remaining) and succeeded[-1] in remaining  # the latest one is kept
        assert (first["runs_deleted"], first["failed_runs_deleted"], first["failed_runs_kept"]) == (2, 0, 1)

        second = run_prune(
            instance, run_retention_hours=TINY_RETENTION_HOURS, failed_run_retention_days=TINY_RETENTION_HOURS / 24
        ).output_for_node("prune_run_history")
        assert second["failed_runs_deleted"] == 1
        assert instance.get_run_by_id(failed.run_id) is None


def test_hourly_rollups_keep_the_figures_of_deleted_runs(relay_env, tmp_path):
    url = relay_env["OUTBOX_DATABASE_URL"]
    instance_settings = RelayInstance.from_settings(load_settings())
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        relay_runs(instance, url, 4, 0)
        loaded = sum(
            record.asset_materialization.metadata["events_loaded"].value
            for record in instance.fetch_materializations(EVENT_LOG, limit=100).records
        )
        assert loaded == 12
        # An hour later the current hour is complete: it is rolled up, then its runs are past a one-hour retention.
        later = time.time() + 3600
        policy = RetentionPolicy(success_seconds=1800, failure_seconds=30 * 86400)
        result = prune(instance, pruned_job_names(instance_settings), EVENT_LOG, policy, later)
        assert result.hours_rolled_up >= 1 and result.runs_deleted == 3  # the latest run is kept
        assert prune(instance, pruned_job_names(instance_settings), EVENT_LOG, policy, later).hours_rolled_up == 0

        rollups = [record.asset_observation.metadata for record in instance.fetch_observations(EVENT_LOG, limit=10).records]
        assert sum(m["hour_events_loaded"].value for m in rollups) == 12
        assert sum(m["hour_runs"].value for m in rollups) == 4
        # The deleted runs' materializations are gone; the rollups are runless and stay.
        assert len(instance.fetch_materializations(EVENT_LOG, limit=100).records) == 1
