"""Schedules: switchable by configuration, and the relay schedule never stacks runs."""

import json
import os
import subprocess
import sys

import dagster as dg

from outbox_pipeline.definitions import defs
from outbox_pipeline_tests.support.default_relay import RELAY_TAG, process_outbox_events, process_outbox_events_schedule

_PRINT_STATUSES = """
import json
from outbox_pipeline.definitions import defs
statuses = {s.name: [s.default_status.value, s.cron_schedule] for s in defs.schedules}
statuses.update({s.name: [s.default_status.value, None] for s in defs.sensors})
print(json.dumps(statuses))
"""


def load_definitions(**env: str) -> subprocess.CompletedProcess:
    """Import the code location in a fresh process, as the code server does, with this environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_SCHEDULE", "OUTBOX_SENSOR", "OUTBOX_CLEANUP", "OUTBOX_CHECK"))}
    return subprocess.run([sys.executable, "-c", _PRINT_STATUSES], env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_schedules_and_sensor_follow_configuration():
    default = load_definitions()
    assert default.returncode == 0, default.stderr
    statuses = json.loads(default.stdout.strip().splitlines()[-1])
    expected = {
        "process_outbox_events_schedule": ["STOPPED", "* * * * *"],
        "cleanup_outbox_schedule": ["RUNNING", "30 3 * * *"],
        "check_event_log_schedule": ["RUNNING", "*/15 * * * *"],
        "outbox_pending_sensor": ["RUNNING", None],
    }
    assert {name: statuses.get(name) for name in expected} == expected
    switched = load_definitions(
        OUTBOX_SCHEDULE_ENABLED="true", OUTBOX_SCHEDULE_CRON="*/5 * * * *", OUTBOX_SENSOR_ENABLED="false",
        OUTBOX_CLEANUP_CRON="0 1 * * *",
    )
    assert switched.returncode == 0, switched.stderr
    statuses = json.loads(switched.stdout.strip().splitlines()[-1])
    assert statuses["process_outbox_events_schedule"] == ["RUNNING", "*/5 * * * *"]
    assert statuses["outbox_pending_sensor"] == ["STOPPED", None]
    assert statuses["cleanup_outbox_schedule"] == ["RUNNING", "0 1 * * *"]


def test_a_bad_cron_is_named_in_one_line():
    result = load_definitions(OUTBOX_SCHEDULE_CRON="every minute")
    assert result.returncode != 0
    assert "OUTBOX_SCHEDULE_CRON='every minute' is not a cron expression of five fields" in result.stderr.strip().splitlines()[-1]


def test_relay_schedule_requests_a_tagged_run_unless_a_relay_run_is_active():
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance) as context:
            request = process_outbox_events_schedule(context)
        assert isinstance(request, dg.RunRequest) and request.tags[RELAY_TAG] == "true"
        run = instance.create_run_for_job(process_outbox_events, status=dg.DagsterRunStatus.STARTED)
        with dg.build_schedule_context(instance=instance) as context:
            skipped = process_outbox_events_schedule(context)
        assert isinstance(skipped, dg.SkipReason) and run.run_id in skipped.skip_message


def test_code_location_wires_jobs_schedules_sensor_asset_and_checks():
    dg.Definitions.validate_loadable(defs)
    job_names = {job.name for job in defs.jobs}
    assert {"process_outbox_events", "requeue_failed_events", "replay_outbox_events", "cleanup_outbox", "check_event_log"} <= job_names
    check_keys = defs.resolve_asset_graph().asset_check_keys
    assert {(key.asset_key, key.name) for key in check_keys} == {
        (dg.AssetKey("event_log"), "freshness"),
        (dg.AssetKey("event_log"), "no_duplicates"),
        (dg.AssetKey("event_log"), "complete"),
        # The typed tables of the demo's classes, registered by default (OUTBOX_EVENT_CLASSES).
        *(
            (dg.AssetKey(table), check)
            for table in ("order_paid", "order_shipped", "payment_refunded", "user_created")
            for check in ("parses", "matches_event_log")
        ),
    }
    replay = defs.resolve_job_def("replay_outbox_events")
    assert isinstance(replay.partitions_def, dg.DailyPartitionsDefinition)
    assert replay.executor_def is dg.in_process_executor
