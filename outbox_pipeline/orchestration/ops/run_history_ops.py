"""The op of the prune jobs: hourly rollups of each asset's figures, then old runs deleted (run_history.py)."""

import dataclasses
import time

import dagster as dg
from pydantic import Field

from outbox_pipeline.orchestration.resources import RunHistoryResource
from outbox_pipeline.orchestration.run_history import HOUR, RetentionPolicy, prune


class PruneConfig(dg.Config):
    run_retention_hours: float | None = Field(
        default=None, gt=0, description="Delete successful runs older than this (unset: OUTBOX_RUN_RETENTION_HOURS)."
    )
    failed_run_retention_days: float | None = Field(
        default=None, gt=0, description="Delete failed and canceled runs older than this (unset: OUTBOX_FAILED_RUN_RETENTION_DAYS)."
    )
    max_runs: int = Field(default=1000, ge=1, description="Delete at most this many runs; the next run goes on.")


def build_prune_op(name: str, resource_keys: list[str]) -> dg.OpDefinition:
    """An op that rolls up and prunes the history of each relay whose ``RunHistoryResource`` is under ``resource_keys``."""

    @dg.op(
        name=name, required_resource_keys=set(resource_keys),
        description="Record hourly rollups of each relay's asset, then delete each relay's runs past their retention.",
    )
    def prune_run_history(context: dg.OpExecutionContext, config: PruneConfig) -> dg.Output[dict]:
        totals: dict = {}
        for key in resource_keys:
            summary = _prune_one(context, config, getattr(context.resources, key))
            totals = {field: totals.get(field, 0) + value for field, value in summary.items()}
        metadata = {
            field: dg.MetadataValue.float(value) if isinstance(value, float) else dg.MetadataValue.int(value)
            for field, value in totals.items()
        }
        return dg.Output(totals, metadata=metadata)

    return prune_run_history


def _prune_one(context: dg.OpExecutionContext, config: PruneConfig, run_history: RunHistoryResource) -> dict:
    policy = RetentionPolicy(
        success_seconds=(config.run_retention_hours or run_history.run_retention_hours) * HOUR,
        failure_seconds=(config.failed_run_retention_days or run_history.failed_run_retention_days) * 24 * HOUR,
        max_runs=config.max_runs,
    )
    started = time.perf_counter()
    result = prune(context.instance, run_history.job_names, run_history.asset, policy, time.time())
    context.log.info(
        f"rolled up {result.hours_rolled_up} hours of {run_history.asset.to_user_string()}; deleted {result.runs_deleted} successful and "
        f"{result.failed_runs_deleted} failed runs of {', '.join(run_history.job_names)} ({policy.description}), "
        f"{result.bytes_removed / 2**20:.1f} MB of files; {result.failed_runs_kept} failed runs kept"
    )
    return {**dataclasses.asdict(result), "duration_seconds": round(time.perf_counter() - started, 3)}
