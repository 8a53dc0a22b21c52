"""The real stack end to end: `dagster dev` (webserver, daemon, code server) on the embedded defaults.

Everything is real and separate processes: the embedded PostgreSQL outbox, chDB,
the sensor in the code server, runs launched by the daemon, and a backfill
launched through the webserver's GraphQL API, as the UI launches one.
"""

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import requests
from dagster_graphql import DagsterGraphQLClient

# One `dagster dev` stack at a time (with dev_script_tests.py, the same group): each is a webserver, a daemon, a code
# server and run workers, and several beside each other on two cores would stretch the waits this module bounds.
pytestmark = pytest.mark.xdist_group("dagster_dev_stack")

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCATION = "outbox_pipeline"
REPOSITORY = "__repository__"
BIN = Path(sys.executable).parent
TODAY_EVENTS = 1_500
YESTERDAY_EVENTS = 400

PUBLISH_YESTERDAY = """
import datetime as dt, sys
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.producer import publish_many
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.stores.postgres_connection import connect_postgres, resolve_outbox_database_url

day = dt.date.fromisoformat(sys.argv[1])
start = dt.datetime.combine(day, dt.time(8), tzinfo=dt.timezone.utc)
events = [RawEvent(event_type="backdated_event", context='{"n": %d}' % n, event_date_time=start + dt.timedelta(seconds=n))
          for n in range(int(sys.argv[2]))]
with connect_postgres(resolve_outbox_database_url(RelaySettings.from_env()), autocommit=False) as conn:
    with conn.transaction():
        publish_many(conn, events)
"""

TRUNCATE_CLICKHOUSE = """
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.stores.event_log_store import EventLogStore

store = EventLogStore.connect(RelaySettings.from_env().clickhouse_url, busy_wait_seconds=60)
store.truncate()
store.close()
"""

RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter, limit: 200) {
    __typename
    ... on Runs { results { runId jobName status tags { key value } } }
    ... on PythonError { message }
  }
}
"""

SENSOR_QUERY = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { name sensorState { status ticks(limit: 100) { status runIds skipReason } } }
    ... on PythonError { message }
  }
}
"""

LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on PartitionSetNotFoundError { message }
  }
}
"""

BACKFILL_QUERY = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status numPartitions partitionNames runs { runId status tags { key value } } }
    ... on PythonError { message }
  }
}
"""

ASSET_QUERY = """
query Asset {
  assetOrError(assetKey: {path: ["event_log"]}) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 50) {
        runId
        description
        metadataEntries {
          label
          __typename
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
        }
      }
      definition {
        isMaterializable
        isExecutable
        groupName
        kinds
        assetChecksOrError {
          __typename
          ... on AssetChecks { checks { name description jobNames } }
        }
      }
    }
  }
}
"""

CHECK_EXECUTIONS = """
query Checks($name: String!) {
  assetCheckExecutions(assetKey: {path: ["event_log"]}, checkName: $name, limit: 5) {
    runId
    status
    evaluation { severity description metadataEntries { label __typename ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue } } }
  }
}
"""

LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status tags { key value } }
  }
}
"""

TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen
    port: int
    env: dict[str, str]
    state_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def graphql(self, query: str, **variables) -> dict:
        response = requests.post(self.url, json={"query": query, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def command(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def outbox_pipeline(self, *args: str) -> subprocess.CompletedProcess:
        result = self.command(str(BIN / "outbox-pipeline"), *args)
        assert result.returncode == 0, result.stderr
        return result

    def python(self, code: str, *args: str) -> None:
        result = self.command(sys.executable, "-c", code, *args)
        assert result.returncode == 0, result.stderr[-3000:]

    def runs(self, **run_filter) -> list[dict]:
        data = self.graphql(RUNS_QUERY, filter=run_filter)["runsOrError"]
        assert data["__typename"] == "Runs", data
        return data["results"]

    def wait_for(self, what: str, condition: Callable[[], object], timeout: float = 150, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                pytest.fail(f"dagster dev exited ({self.process.returncode}) while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log_tail()}")
            time.sleep(interval)


def stack_environment(state_dir: Path, home: Path) -> dict[str, str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OUTBOX_", "CLICKHOUSE_", "DAGSTER_", "SENTRY_", "PG")) and key != "DEBUG"
    }
    return {
        **inherited,
        "DAGSTER_HOME": str(home),
        "OUTBOX_STATE_DIR": str(state_dir),
        "OUTBOX_SENSOR_INTERVAL_SECONDS": "1",
        "OUTBOX_BATCH_SIZE": "500",
        # Sensor runs follow the stream as by default, and end a few seconds after it goes quiet.
        "OUTBOX_FOLLOW_QUIET_SECONDS": "5",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def processes_started_for(state_dir: Path) -> list[int]:
    """Our leftovers by id: processes whose environment names this test's own state directory."""
    marker = f"OUTBOX_STATE_DIR={state_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def embedded_postgres_pid(state_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((state_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])
    return None


def default_signal_handling() -> None:
    """dagster dev stops its services with SIGINT: a shell that started us in the background may have set it to ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_stack(process: subprocess.Popen, state_dir: Path) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # dagster dev stops its webserver, daemon and code server
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for pid in processes_started_for(state_dir):  # a run worker still finishing, say
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    postgres = embedded_postgres_pid(state_dir)
    if postgres:
        # The embedded server runs until it is stopped (`outbox-pipeline stop`); this one is the test's own.
        with contextlib.suppress(ProcessLookupError):
            os.kill(postgres, signal.SIGQUIT)  # immediate shutdown: the data is thrown away anyway
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{postgres}").exists():
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(postgres, signal.SIGKILL)


@pytest.fixture
def dagster_dev() -> Iterator[Stack]:
    # Not under pytest's temporary root (mode 0700): the embedded PostgreSQL runs as its own system user.
    state_dir = Path(tempfile.mkdtemp(prefix="outbox-e2e-state-"))
    home = Path(tempfile.mkdtemp(prefix="outbox-e2e-dagster-home-"))
    state_dir.chmod(0o755)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = stack_environment(state_dir, home)
    port = free_port()
    log_path = home / "dagster-dev.log"
    init = subprocess.run([str(BIN / "outbox-pipeline"), "init"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: SIGTERM reaches all of dagster dev
            preexec_fn=default_signal_handling,
        )
    stack = Stack(process, port, env, state_dir, log_path)
    try:
        yield stack
    finally:
        stop_stack(process, state_dir)
        print(f"\n--- dagster dev log (tail) ---\n{stack.log_tail(3000)}")
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def location_loaded(stack: Stack) -> bool:
    try:
        data = stack.graphql(
            SENSOR_QUERY,
            selector={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": "outbox_pending_sensor"},
        )
    except (requests.RequestException, AssertionError):
        return False
    return data["sensorOrError"]["__typename"] == "Sensor"


def metadata_values(entries: list[dict]) -> dict:
    values = {}
    for entry in entries:
        for field in ("intValue", "floatValue", "text"):
            if field in entry:
                values[entry["label"]] = entry[field]
    return values


def test_dagster_dev_sensor_relays_events_and_a_backfill_replays_two_days(dagster_dev: Stack):
    stack = dagster_dev
    started = time.monotonic()
    today = dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)

    stack.wait_for("the code location to load", lambda: location_loaded(stack), timeout=120)
    loaded_at = time.monotonic()
    client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port, timeout=60)

    # Events arrive while the stack runs: the sensor (running by default) must pick them up.
    stack.outbox_pipeline("demo", "--count", str(TODAY_EVENTS))
    stack.python(PUBLISH_YESTERDAY, yesterday.isoformat(), str(YESTERDAY_EVENTS))
    published = TODAY_EVENTS + YESTERDAY_EVENTS

    def relayed_everything():
        runs = stack.runs(pipelineName="follow_outbox_fleet")
        if not runs or any(run["status"] not in TERMINAL_RUN_STATUSES for run in runs):
            return None
        materializations = stack.graphql(ASSET_QUERY)["assetOrError"].get("assetMaterializations", [])
        loaded = sum(metadata_values(m["metadataEntries"]).get("events_loaded", 0) for m in materializations)
        return runs if loaded >= published else None

    relay_runs = stack.wait_for("the sensor's relay runs to load every event", relayed_everything)
    relayed_at = time.monotonic()

    # Every relay run was started by the sensor, and every one succeeded.
    assert all(client.get_run_status(run["runId"]) == dg.DagsterRunStatus.SUCCESS for run in relay_runs)
    sensor = stack.graphql(
        SENSOR_QUERY,
        selector={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": "outbox_pending_sensor"},
    )["sensorOrError"]
    assert sensor["sensorState"]["status"] == "RUNNING"
    sensor_run_ids = {run_id for tick in sensor["sensorState"]["ticks"] for run_id in tick["runIds"]}
    assert {run["runId"] for run in relay_runs} <= sensor_run_ids
    for run in relay_runs:
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        assert tags.get("dagster/sensor_name") == "outbox_pending_sensor"
        assert tags.get("outbox_pipeline/fleet") == "true"

    # No run is active now and nothing is pending, so the sensor launches nothing: chDB is free to open.
    status = json.loads(stack.outbox_pipeline("status", "--json").stdout)
    assert (status["pending"], status["processed"], status["failed"]) == (0, published, 0)
    assert status["clickhouse_rows"] == status["clickhouse_distinct_event_ids"] == published

    # ClickHouse loses its data; a backfill of the two days, launched as the UI launches one, restores it.
    stack.python(TRUNCATE_CLICKHOUSE)
    launched = stack.graphql(
        LAUNCH_BACKFILL,
        params={
            "selector": {
                "partitionSetName": "replay_outbox_events_partition_set",
                "repositorySelector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY},
            },
            "partitionNames": [yesterday.isoformat(), today.isoformat()],
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def backfill_finished():
        backfill = stack.graphql(BACKFILL_QUERY, id=backfill_id)["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        if backfill["status"] in ("REQUESTED", "CANCELING", "FAILING"):
            return None
        if len(backfill["runs"]) < 2 or any(run["status"] not in TERMINAL_RUN_STATUSES for run in backfill["runs"]):
            return None
        return backfill

    backfill = stack.wait_for("the backfill to finish", backfill_finished, timeout=180)
    backfilled_at = time.monotonic()
    assert backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), backfill
    assert sorted(backfill["partitionNames"]) == [yesterday.isoformat(), today.isoformat()]
    partitions = {}
    for run in backfill["runs"]:
        assert run["status"] == "SUCCESS", run
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        partitions[tags["dagster/partition"]] = run["runId"]
    assert set(partitions) == {yesterday.isoformat(), today.isoformat()}

    status = json.loads(stack.outbox_pipeline("status", "--json").stdout)
    assert status["clickhouse_rows"] == status["clickhouse_distinct_event_ids"] == published

    # The checks job, submitted through the Python GraphQL client, evaluates both checks.
    check_run = client.submit_job_execution("check_event_log", repository_location_name=LOCATION, repository_name=REPOSITORY)
    stack.wait_for("the check run", lambda: client.get_run_status(check_run) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE))
    assert client.get_run_status(check_run) == dg.DagsterRunStatus.SUCCESS
    for check_name in ("freshness", "no_duplicates", "complete"):
        executions = stack.graphql(CHECK_EXECUTIONS, name=check_name)["assetCheckExecutions"]
        [ours] = [execution for execution in executions if execution["runId"] == check_run]
        assert ours["status"] == "SUCCEEDED", ours

    asset = stack.graphql(ASSET_QUERY)["assetOrError"]
    replayed = [metadata_values(m["metadataEntries"]) for m in asset["assetMaterializations"] if m["runId"] in partitions.values()]
    assert sorted(m["events_replayed"] for m in replayed) == sorted([YESTERDAY_EVENTS, TODAY_EVENTS])
    finished = time.monotonic()
    print(
        f"\nend-to-end: code location loaded in {loaded_at - started:.1f} s; {published} events relayed by "
        f"{len(relay_runs)} sensor runs in {relayed_at - loaded_at:.1f} s; backfill of 2 days in "
        f"{backfilled_at - relayed_at:.1f} s; checks in {finished - backfilled_at:.1f} s; test body {finished - started:.1f} s"
    )


def launch_run(stack: Stack, selector: dict, run_config: dict | None = None) -> str:
    params = {
        "mode": "default",
        "executionMetadata": {},
        "runConfigData": json.dumps(run_config or {}),
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, **selector},
    }
    launched = stack.graphql(LAUNCH_RUN, executionParams=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def run_of(stack: Stack, run_id: str) -> dict:
    run = stack.graphql(RUN_QUERY, runId=run_id)["runOrError"]
    assert run["__typename"] == "Run", run
    return run


def test_execute_checks_from_the_asset_page_queues_behind_a_run_holding_the_embedded_clickhouse(dagster_dev: Stack):
    stack = dagster_dev
    stack.wait_for("the code location to load", lambda: location_loaded(stack), timeout=120)

    # A low-latency relay run holds the embedded ClickHouse directory for its whole duration.
    relay_run = launch_run(stack, {"jobName": "relay_low_latency"}, {"ops": {"relay_continuously": {"config": {"max_seconds": 25}}}})
    stack.wait_for("the relay run to start", lambda: run_of(stack, relay_run)["status"] in ({"STARTED"} | TERMINAL_RUN_STATUSES))
    assert run_of(stack, relay_run)["status"] == "STARTED"

    # *Execute checks* on the asset page: the job that all the asset's checks share, as the UI picks it.
    checks = stack.graphql(ASSET_QUERY)["assetOrError"]["definition"]["assetChecksOrError"]["checks"]
    shared_jobs = [name for name in checks[0]["jobNames"] if all(name in check["jobNames"] for check in checks)]
    assert shared_jobs[0] == "__ASSET_JOB"  # a job Dagster builds itself: it carries none of our tags
    check_run = launch_run(
        stack,
        {
            "jobName": shared_jobs[0],
            "assetSelection": [],
            "assetCheckSelection": [{"assetKey": {"path": ["event_log"]}, "name": check["name"]} for check in checks],
        },
    )
    assert "outbox_pipeline/embedded_clickhouse" not in {tag["key"] for tag in run_of(stack, check_run)["tags"]}

    # The run queue holds the check run back while the relay run holds ClickHouse...
    observed_queued = 0
    while run_of(stack, relay_run)["status"] == "STARTED":
        status = run_of(stack, check_run)["status"]
        assert status == "QUEUED", f"the check run was launched ({status}) while the relay run held ClickHouse"
        observed_queued += 1
        time.sleep(1)
    assert observed_queued >= 5  # several passes of the run queue
    assert run_of(stack, relay_run)["status"] == "SUCCESS"

    # ...and launches it once ClickHouse is free.
    stack.wait_for("the check run", lambda: run_of(stack, check_run)["status"] in TERMINAL_RUN_STATUSES)
    assert run_of(stack, check_run)["status"] == "SUCCESS"
    for check in checks:
        executions = stack.graphql(CHECK_EXECUTIONS, name=check["name"])["assetCheckExecutions"]
        [ours] = [execution for execution in executions if execution["runId"] == check_run]
        assert ours["status"] == "SUCCEEDED", ours


RUN_MESSAGES = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId, limit: 500) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message } } }
  }
}
"""


def test_a_following_run_ends_when_execute_checks_is_queued_behind_it(dagster_dev: Stack):
    stack = dagster_dev
    stack.wait_for("the code location to load", lambda: location_loaded(stack), timeout=120)

    # The fleet's run, as the sensor starts it, would follow the stream for two minutes, holding the embedded ClickHouse.
    relay_run = launch_run(
        stack, {"jobName": "follow_outbox_fleet"},
        {"ops": {"follow_fleet": {"config": {"follow_seconds": 120, "quiet_seconds": 120}}}},
    )

    def following():
        messages = stack.graphql(RUN_MESSAGES, runId=relay_run)["logsForRun"]["events"]
        return any("following 1 relay:" in (event.get("message") or "") for event in messages)

    stack.wait_for("the relay run to follow the stream", following)

    checks = stack.graphql(ASSET_QUERY)["assetOrError"]["definition"]["assetChecksOrError"]["checks"]
    check_run = launch_run(
        stack,
        {
            "jobName": "__ASSET_JOB",
            "assetSelection": [],
            "assetCheckSelection": [{"assetKey": {"path": ["event_log"]}, "name": check["name"]} for check in checks],
        },
    )
    queued_at = time.monotonic()
    # The queued check run ends the following run within a few looks, not after its two minutes.
    stack.wait_for("the relay run to end", lambda: run_of(stack, relay_run)["status"] in TERMINAL_RUN_STATUSES, timeout=60)
    assert run_of(stack, relay_run)["status"] == "SUCCESS"
    assert time.monotonic() - queued_at < 45
    messages = [event.get("message") or "" for event in stack.graphql(RUN_MESSAGES, runId=relay_run)["logsForRun"]["events"]]
    assert any("a queued run waits for the embedded ClickHouse" in message for message in messages), messages[-10:]
    stack.wait_for("the check run", lambda: run_of(stack, check_run)["status"] in TERMINAL_RUN_STATUSES)
    assert run_of(stack, check_run)["status"] == "SUCCESS"
