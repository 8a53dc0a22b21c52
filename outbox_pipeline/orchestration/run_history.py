"""Retention of Dagster's own storage for a relay: delete old runs, keep hourly rollups of the asset's figures.

Dagster never prunes runs or their event logs by itself. A relay that runs every
few seconds, or all day long, would grow its run storage without end, and a
slow UI with it. ``prune_dagster_runs`` (hourly by default) does two things, in
this order:

1. **Rollups.** Every complete UTC hour since the last rollup gets one runless
   observation of the relay's asset, summing the hour's materializations
   (``hour_events_loaded``, ``hour_runs``, ...). Observations survive the
   deletion of the runs they summarize, and the asset's Plots tab draws them
   beside the materializations, so the history of the figures stays. They are
   recorded within the hour after the one they describe, so they sit at the
   right place in time; an observation does not change which materialization
   is the latest, so the checks' status is unaffected.
2. **Deletion.** Runs of the relay's frequent jobs that succeeded longer ago than
   the run retention (24 h) are deleted with their event logs
   (``DagsterInstance.delete_run``), those that failed or were canceled only
   after the failed-run retention (30 days). The latest successful run of each
   job is always kept. With the default SQLite storage each run also has a file
   of its own for its event log and a folder of captured logs and op outputs;
   ``delete_run`` empties the first and leaves the second, so both are removed
   too, which is what makes the storage stop growing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import dagster as dg

HOUR = 3600.0
ROLLUP_HOUR_START = "rollup_hour_start"
ROLLUP_HOUR_END = "rollup_hour_end"
FAILED_STATUSES = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    success_seconds: float
    failure_seconds: float
    max_runs: int = 1000  # per pruning run: a long history is deleted over several runs

    @property
    def description(self) -> str:
        return f"successful runs after {self.success_seconds / HOUR:g} h, failed runs after {self.failure_seconds / 86400:g} days"


@dataclasses.dataclass
class PruneResult:
    runs_deleted: int = 0
    failed_runs_deleted: int = 0
    failed_runs_kept: int = 0
    bytes_removed: int = 0
    hours_rolled_up: int = 0


def _floor_hour(timestamp: float) -> float:
    return timestamp - timestamp % HOUR


# -- rollups ----------------------------------------------------------------------------------


def last_rollup_end(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> float | None:
    """Where the last rollup of ``asset_key`` ended (None: never rolled up)."""
    for record in instance.fetch_observations(asset_key, limit=20).records:
        observation = record.asset_observation
        value = observation.metadata.get(ROLLUP_HOUR_END) if observation is not None else None
        if value is not None:
            return float(value.value)
    return None


def _materializations(instance: dg.DagsterInstance, asset_key: dg.AssetKey, after: float | None, before: float) -> Iterable:
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, after_timestamp=after, before_timestamp=before),
            limit=1000, cursor=cursor, ascending=True,
        )
        yield from page.records
        if not page.has_more:
            return
        cursor = page.cursor


def _value(metadata: dict, key: str) -> float:
    entry = metadata.get(key)
    return float(entry.value) if entry is not None and isinstance(entry.value, (int, float)) else 0.0


def roll_up_hours(instance: dg.DagsterInstance, asset_key: dg.AssetKey, now: float) -> int:
    """Record one observation per complete hour with materializations since the last rollup; returns how many."""
    hour, records, rolled_up = None, [], 0
    # Ascending, one hour at a time: a long history is summed without being held in memory.
    for record in _materializations(instance, asset_key, last_rollup_end(instance, asset_key), _floor_hour(now)):
        if hour is not None and _floor_hour(record.timestamp) != hour:
            _record_rollup(instance, asset_key, hour, records)
            rolled_up += 1
            records = []
        hour = _floor_hour(record.timestamp)
        records.append(record)
    if records:
        _record_rollup(instance, asset_key, hour, records)
        rolled_up += 1
    return rolled_up


def _record_rollup(instance: dg.DagsterInstance, asset_key: dg.AssetKey, hour: float, records: list) -> None:
    metadata = [r.asset_materialization.metadata for r in records]

    def total(key: str) -> dg.MetadataValue:
        return dg.MetadataValue.int(int(sum(_value(m, key) for m in metadata)))

    instance.report_runless_asset_event(
        dg.AssetObservation(
            asset_key=asset_key,
            description=f"hourly rollup of {len(records)} materializations of "
            f"{dt.datetime.fromtimestamp(hour, dt.UTC):%Y-%m-%d %H:00} UTC",
            metadata={
                "hour_events_loaded": total("events_loaded"),
                "hour_events_rejected": total("events_rejected"),
                "hour_events_replayed": total("events_replayed"),
                "hour_batches": total("batches"),
                "hour_materializations": dg.MetadataValue.int(len(records)),
                "hour_runs": dg.MetadataValue.int(len({r.run_id for r in records})),
                "hour_max_queue_size": dg.MetadataValue.int(int(max(_value(m, "queue_size") for m in metadata))),
                "hour_max_oldest_pending_age_seconds": dg.MetadataValue.float(
                    max(_value(m, "oldest_pending_age_seconds") for m in metadata)
                ),
                ROLLUP_HOUR_START: dg.MetadataValue.timestamp(hour),
                ROLLUP_HOUR_END: dg.MetadataValue.timestamp(hour + HOUR),
            },
        )
    )


# -- deletion ---------------------------------------------------------------------------------


def _runs_before(instance: dg.DagsterInstance, job_name: str, statuses: list, cutoff: float, limit: int) -> list:
    return instance.get_run_records(
        dg.RunsFilter(
            job_name=job_name, statuses=statuses, updated_before=dt.datetime.fromtimestamp(cutoff, dt.UTC)
        ),
        limit=limit,
        ascending=True,
    )


def remove_run_leftovers(instance: dg.DagsterInstance, run_id: str) -> int:
    """Files a deleted run leaves behind in the instance's directories; returns the bytes removed.

    The default SQLite event log storage keeps one database file per run (``delete_run``
    empties it but keeps the file), and the local artifact storage keeps a folder per run
    (captured logs, op outputs). Only paths named after the run are touched.
    """
    removed = 0
    path_for_shard = getattr(instance.event_log_storage, "path_for_shard", None)
    if callable(path_for_shard):
        shard = Path(path_for_shard(run_id))
        if shard.name == f"{run_id}.db" and shard.is_file():
            removed += shard.stat().st_size
            shard.unlink()
    folder = Path(instance.storage_directory()) / run_id
    if folder.is_dir():
        removed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def delete_old_runs(
    instance: dg.DagsterInstance, job_names: Sequence[str], policy: RetentionPolicy, now: float, result: PruneResult
) -> None:
    budget = policy.max_runs
    for job_name in job_names:
        latest = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
        keep = {record.dagster_run.run_id for record in latest}
        old_successes = _runs_before(instance, job_name, [dg.DagsterRunStatus.SUCCESS], now - policy.success_seconds, budget)
        old_failures = _runs_before(instance, job_name, FAILED_STATUSES, now - policy.failure_seconds, budget)
        for records, failed in ((old_successes, False), (old_failures, True)):
            for record in records:
                run_id = record.dagster_run.run_id
                if run_id in keep or budget <= 0:
                    continue
                instance.delete_run(run_id)
                result.bytes_removed += remove_run_leftovers(instance, run_id)
                budget -= 1
                if failed:
                    result.failed_runs_deleted += 1
                else:
                    result.runs_deleted += 1
        result.failed_runs_kept += instance.get_runs_count(dg.RunsFilter(job_name=job_name, statuses=FAILED_STATUSES))


def prune(
    instance: dg.DagsterInstance, job_names: Sequence[str], asset_key: dg.AssetKey, policy: RetentionPolicy, now: float
) -> PruneResult:
    """Roll up the asset's complete hours, then delete the runs past retention (see the module's docstring)."""
    result = PruneResult()
    result.hours_rolled_up = roll_up_hours(instance, asset_key, now)
    delete_old_runs(instance, job_names, policy, now, result)
    return result
