"""A relay run in a process of its own, for fault-injection tests.

Runs the real Dagster job ``process_outbox_events`` (``job``; ``follow``: one batch of
the backlog, then the rest through its ``follow_outbox`` op, as a run following a
stream) or the framework-free ``Relay.drain`` loop (``drain``) against the stores
named by the environment
(OUTBOX_DATABASE_URL, CLICKHOUSE_URL, OUTBOX_LEASE_SECONDS, ...)::

    python -m outbox_pipeline_tests.support.relay_worker job --kill-after insert
    python -m outbox_pipeline_tests.support.relay_worker drain --until-file /tmp/stop

``--kill-after claim|insert|mark`` wraps the store method of that step in this
process only, and SIGKILLs the process right after the N-th call of it returned:
after the claim's transaction committed, after ClickHouse acknowledged the
insert, after the mark's transaction committed. Nothing is flushed, released or
cleaned up, as when the OOM killer or a lost pod ends a run. Production code has
no hooks for this: the wrapping happens in this process only.

``--relay NAME --event-types 'order_*,refund' --table orders_event_log`` makes the
``drain`` runner a relay of its own, with its own bookkeeping, into its own table.
``--component FILE`` makes the ``job`` runner run the relay job of the
``OutboxRelay`` component that FILE (a defs.yaml) configures.

``--until-file`` repeats runs until that file exists and a run then finds no
work (a relay that keeps polling while producers publish).

The last stdout line is a JSON summary: runs, events_loaded, batches, failures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore

# step name -> (class, method) whose return marks that the step is durable
KILL_POINTS = {
    "claim": (OutboxStore, "claim_next_batch"),
    "insert": (EventLogStore, "insert_csv"),
    "mark": (OutboxStore, "complete_batch"),
}

_ROOT = Path(__file__).resolve().parents[2]


def worker_command(runner: str, *options: str) -> list[str]:
    return [sys.executable, "-m", __spec__.name if __spec__ else "outbox_pipeline_tests.support.relay_worker", runner, *options]


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    merged = {**os.environ, **env}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), merged.get("PYTHONPATH")) if p)
    return merged


def run_worker(runner: str, *options: str, env: Mapping[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one worker to its end (or its death); ``returncode == -SIGKILL`` when a kill point fired."""
    return subprocess.run(worker_command(runner, *options), env=worker_env(env), cwd=_ROOT, capture_output=True, text=True, timeout=timeout)


def start_worker(runner: str, *options: str, env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Start a worker in the background; its stderr (Dagster's run log) goes to ``log``, so no pipe fills up.

    Its first stdout line is READY once it is set up and about to start its first run.
    """
    with open(log, "w") as stderr:
        return subprocess.Popen(
            worker_command(runner, *options), env=worker_env(env), cwd=_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        )


def summary_of(stdout: str) -> dict:
    """The worker's JSON summary (its last stdout line)."""
    return json.loads(stdout.strip().splitlines()[-1])


def install_kill_point(step: str, nth: int) -> None:
    cls, name = KILL_POINTS[step]
    original = getattr(cls, name)
    calls = 0

    def wrapper(self, *args, **kwargs):
        nonlocal calls
        result = original(self, *args, **kwargs)
        # A claim that found nothing and a mark that lost its lease did not happen.
        if (step == "claim" and result is None) or (step == "mark" and result is False):
            return result
        calls += 1
        if calls >= nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, name, wrapper)


def component_relay_job(defs_yaml: Path):
    """The relay job of the OutboxRelay component configured by ``defs_yaml``, as the code location builds it."""
    import dagster as dg
    import yaml

    from outbox_pipeline.orchestration.component import OutboxRelay

    component = OutboxRelay.resolve_from_yaml(yaml.safe_dump(yaml.safe_load(defs_yaml.read_text())["attributes"]))
    defs = dg.build_defs_for_component(component)
    return defs.resolve_job_def(component.relay_instance().named("process_outbox_events"))


# The ``follow`` runner: the job claims one batch of its backlog, then its follow_outbox op loads the rest.
FOLLOW = {"follow_seconds": 60, "quiet_seconds": 2, "interval_seconds": 0.1, "window_seconds": 1}


def run_job_once(
    instance, batch_size: int | None, max_batches: int | None, follow: dict | None = None, component: Path | None = None
) -> dict:
    from outbox_pipeline_tests.support.relay_runs import run_relay

    run_config = {key: value for key, value in (("batch_size", batch_size), ("max_batches", max_batches)) if value}
    if component is None:
        result = run_relay(instance, run_config=run_config or None, follow=follow)
    else:
        config = {"ops": {"extract_outbox_batches": {"config": run_config}}} if run_config else None
        result = component_relay_job(component).execute_in_process(instance=instance, run_config=config, raise_on_error=False)
    if result.success:
        backlog, followed = result.output_for_node("report_relay_run"), result.output_for_node("follow_outbox")
        return {
            "events_loaded": backlog["events_loaded"] + followed["events_loaded"],
            "batches": backlog["batches"] + followed["batches"],
            "failure": None,
        }
    failures = [
        f"{event.step_key}: {event.step_failure_data.error.cls_name}: {event.step_failure_data.error.message.strip()}"
        for event in result.get_step_failure_events()
    ]
    return {"events_loaded": 0, "batches": 0, "failure": "; ".join(failures) or "run failed"}


class DrainRunner:
    def __init__(self, batch_size: int | None, max_batches: int | None, relay: str, event_types: str, table: str):
        from outbox_pipeline.config.settings import RelaySettings
        from outbox_pipeline.relay.delivery import Relay, RelayPolicy
        from outbox_pipeline.stores.relay_identity import RelayIdentity

        settings = RelaySettings.from_env()
        policy = RelayPolicy.from_settings(settings, **({"batch_size": batch_size} if batch_size else {}))
        identity = RelayIdentity(relay, tuple(p for p in event_types.split(",") if p))
        self.outbox = OutboxStore.connect(settings.outbox_database_url, relay=identity)
        self.event_log = EventLogStore.connect(settings.clickhouse_url, table=table, busy_wait_seconds=30)
        self.relay = Relay(self.outbox, self.event_log, policy, claimed_by=f"worker:{socket.gethostname()}:{os.getpid()}")
        self.max_batches = max_batches

    def run_once(self) -> dict:
        try:
            totals = self.relay.drain(max_batches=self.max_batches)
        except Exception as exc:
            return {"events_loaded": 0, "batches": 0, "failure": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        return {"events_loaded": totals.events_loaded, "batches": totals.batches, "failure": None}

    def close(self) -> None:
        self.outbox.close()
        self.event_log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("runner", choices=("job", "follow", "drain"))
    parser.add_argument("--kill-after", choices=sorted(KILL_POINTS), default=None)
    parser.add_argument("--kill-at", type=int, default=1, help="kill after the N-th such step (default 1)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--until-file", type=Path, default=None)
    parser.add_argument("--relay", default="default", help="drain runner: the relay's name")
    parser.add_argument("--event-types", default="", help="drain runner: comma-separated event type patterns")
    parser.add_argument("--table", default="event_log", help="drain runner: the ClickHouse table")
    parser.add_argument("--component", type=Path, default=None, help="job runner: a defs.yaml of an OutboxRelay")
    args = parser.parse_args(argv)

    if args.kill_after:
        install_kill_point(args.kill_after, args.kill_at)
    if args.runner in ("job", "follow"):
        import dagster as dg

        instance = dg.DagsterInstance.ephemeral()
        if args.runner == "follow":
            if args.batch_size:
                # follow_outbox claims batches of the relay's batch size (the resource reads it from here).
                os.environ["OUTBOX_BATCH_SIZE"] = str(args.batch_size)
            run_once = lambda: run_job_once(instance, args.batch_size, args.max_batches or 1, FOLLOW)  # noqa: E731
        else:
            run_once = lambda: run_job_once(instance, args.batch_size, args.max_batches, component=args.component)  # noqa: E731
        close = lambda: None  # noqa: E731
    else:
        runner = DrainRunner(args.batch_size, args.max_batches, args.relay, args.event_types, args.table)
        run_once, close = runner.run_once, runner.close
    print("READY", flush=True)

    totals = {"runs": 0, "events_loaded": 0, "batches": 0, "failures": []}
    while True:
        stopping = args.until_file is None or args.until_file.exists()
        outcome = run_once()
        totals["runs"] += 1
        totals["events_loaded"] += outcome["events_loaded"]
        totals["batches"] += outcome["batches"]
        if outcome["failure"]:
            totals["failures"].append(outcome["failure"])
        if stopping and (args.until_file is None or outcome["batches"] == 0):
            break
        if outcome["batches"] == 0:
            time.sleep(0.05)
    close()
    print(json.dumps(totals), flush=True)
    return 1 if totals["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
