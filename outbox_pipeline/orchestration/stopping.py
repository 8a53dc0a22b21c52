"""Ending the fleet's runs as a success before the deployment stops (``outbox-pipeline end-runs``).

A run interrupted by the deployment's stop (Ctrl-C, SIGTERM) ends as a success when the stop
reaches it inside its op. One that is still starting (launching, importing, setting up its
resources) cannot catch it, nor can one whose interrupt lands while Dagster handles an event
the op has just yielded: Dagster records a failure. So every fleet run in progress is asked to
end, through the stop tag the op reads at its start and every second after, and the stop waits
for them: each ends within a second or two, from wherever it is, its claims given back.
"""

from __future__ import annotations

import time

import dagster as dg

from outbox_pipeline.orchestration.fleet_defs import FLEET_TAG
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_STOP_TAG

IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def ask_fleet_runs_to_end(instance: dg.DagsterInstance, reason: str) -> list[str]:
    """Tag every fleet run in progress to end; returns their ids. Queued runs are left queued for the next start."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS, tags={FLEET_TAG: "true"}))
    for run in runs:
        if not run.tags.get(FLEET_STOP_TAG):
            instance.add_run_tags(run.run_id, {FLEET_STOP_TAG: reason})
    return [run.run_id for run in runs]


def wait_for_runs_to_end(instance: dg.DagsterInstance, run_ids: list[str], timeout: float) -> list[str]:
    """Wait up to ``timeout`` seconds; returns the ids of the runs still in progress then."""
    deadline = time.monotonic() + timeout
    while True:
        left = [run_id for run_id in run_ids if (run := instance.get_run_by_id(run_id)) is not None and run.status in IN_PROGRESS]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)
