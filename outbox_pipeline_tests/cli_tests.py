"""The console script, run as a user runs it: a real process, its exit code and stderr."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from outbox_pipeline.relay.delivery import Relay, RelayPolicy
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.clickhouse_http_server import clear_faults, running_clickhouse_http_server, set_faults


def outbox_pipeline_command(*args: str) -> list[str]:
    executable = shutil.which("outbox-pipeline", path=os.path.dirname(sys.executable))
    return [*([executable] if executable else [sys.executable, "-m", "outbox_pipeline.cli"]), *args]


def outbox_pipeline(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(outbox_pipeline_command(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def cli_env(outbox_database_url, clickhouse_url, tmp_path) -> dict[str, str]:
    return {"OUTBOX_DATABASE_URL": outbox_database_url, "CLICKHOUSE_URL": clickhouse_url, "OUTBOX_STATE_DIR": str(tmp_path)}


def test_init_twice_then_demo_relay_and_status_json(cli_env):
    for _ in range(2):
        result = outbox_pipeline("init", env=cli_env)
        assert result.returncode == 0, result.stderr
    assert outbox_pipeline("demo", "--count", "1500", env=cli_env).returncode == 0
    before = json.loads(outbox_pipeline("status", "--json", env=cli_env).stdout)
    assert before["pending"] == 1500 and before["processed"] == 0 and before["oldest_pending_age_seconds"] >= 0
    relay = outbox_pipeline("relay", "--batch-size", "500", env=cli_env)
    assert relay.returncode == 0 and "loaded 1500 events in 3 batches" in relay.stdout
    after = json.loads(outbox_pipeline("status", "--json", env=cli_env).stdout)
    outbox_bytes = after.pop("outbox_bytes")
    assert after == {
        "pending": 0,
        "processed": 1500,
        "failed": 0,
        "oldest_pending_age_seconds": None,
        "clickhouse_rows": 1500,
        "clickhouse_distinct_event_ids": 1500,
        "in_flight": 0,
        "retrying": 0,
        "outbox_partitions": 9,  # today, the 7 days ahead and the default partition
    }
    assert outbox_bytes >= before["outbox_bytes"] > 0  # delivering adds no rows (vacuum may add its map forks)


def test_demo_rate_paces_publishing(cli_env):
    outbox_pipeline("init", env=cli_env)
    result = outbox_pipeline("demo", "--count", "40", "--rate", "20", env=cli_env)
    assert result.returncode == 0
    seconds = float(result.stdout.split(" in ")[1].split("s")[0])
    assert 1.5 <= seconds < 10


def test_status_before_init_says_to_run_init(cli_env):
    assert_one_line_error(outbox_pipeline("status", env=cli_env), "outbox-pipeline init")


@pytest.mark.parametrize(
    "variable, url, fragment",
    [
        ("OUTBOX_DATABASE_URL", "mysql://user:pw@host/db", "must start with postgresql://"),
        ("OUTBOX_DATABASE_URL", "postgresql://user:pw@host:notaport/db", "invalid port"),
        ("CLICKHOUSE_URL", "ftp://host/db", "must start with http://, https:// or chdb://"),
        ("CLICKHOUSE_URL", "chdb://relative/path", "absolute path"),
    ],
)
def test_malformed_urls_get_one_line(cli_env, variable, url, fragment):
    outbox_pipeline("init", env=cli_env)
    result = outbox_pipeline("status", env={**cli_env, variable: url})
    assert_one_line_error(result, fragment)
    assert "pw" not in result.stderr


def test_unreachable_postgres_gets_one_line(cli_env):
    result = outbox_pipeline("status", env={**cli_env, "OUTBOX_DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:1/outbox"})
    assert_one_line_error(result, "cannot reach PostgreSQL at 127.0.0.1:1/outbox", "connection refused")
    assert "s3cret" not in result.stderr


def test_unreachable_clickhouse_gets_one_line(cli_env):
    outbox_pipeline("init", env=cli_env)
    result = outbox_pipeline("status", env={**cli_env, "CLICKHOUSE_URL": "http://default:s3cret@127.0.0.1:1/default"})
    assert_one_line_error(result, "cannot reach ClickHouse at http://127.0.0.1:1/default")
    assert "s3cret" not in result.stderr


def test_busy_embedded_clickhouse_gets_one_line(cli_env):
    outbox_pipeline("init", env=cli_env)
    with event_log_store(cli_env["CLICKHOUSE_URL"]):
        result = outbox_pipeline("status", env={**cli_env, "OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS": "0.5"})
    assert_one_line_error(result, "is in use by another process", f"pid {os.getpid()}")


def test_wrong_password_gets_one_line(cli_env, postgres_server_url):
    if os.environ.get("OUTBOX_TEST_DATABASE_URL"):
        pytest.skip("needs the embedded server, whose authentication rules the test may change")
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS outbox_pw_user")
        admin.execute("CREATE ROLE outbox_pw_user LOGIN PASSWORD 'right-password'")
        hba_file = admin.execute("SHOW hba_file").fetchone()[0]
        rules = open(hba_file).read()
        if "outbox_pw_user" not in rules:
            with open(hba_file, "w") as hba:
                hba.write("local all outbox_pw_user scram-sha-256\n" + rules)
            admin.execute("SELECT pg_reload_conf()")
    url = cli_env["OUTBOX_DATABASE_URL"].replace("postgresql://postgres:@", "postgresql://outbox_pw_user:wrong-password@")
    assert "wrong-password" in url
    result = outbox_pipeline("status", env={**cli_env, "OUTBOX_DATABASE_URL": url})
    assert_one_line_error(result, "rejected the credentials")
    assert "wrong-password" not in result.stderr


def test_relay_command_gives_back_a_batch_it_could_not_load(cli_env, tmp_path):
    with running_clickhouse_http_server(tmp_path / "served-clickhouse") as url:
        env = {**cli_env, "CLICKHOUSE_URL": url, "OUTBOX_RETRY_ATTEMPTS": "2", "OUTBOX_RETRY_BASE_SECONDS": "0.01"}
        assert outbox_pipeline("init", env=env).returncode == 0
        assert outbox_pipeline("demo", "--count", "10", env=env).returncode == 0
        set_faults(url, fail_next_n=100, match="INSERT")
        assert_one_line_error(outbox_pipeline("relay", env=env), "inserting into ClickHouse failed 2 times", "nothing was lost")
        with psycopg.connect(cli_env["OUTBOX_DATABASE_URL"]) as conn:
            live_leases = conn.execute(
                "SELECT count(*) FROM outbox_batch WHERE state = 'claimed' AND lease_expires_at > now()"
            ).fetchone()[0]
        assert live_leases == 0  # released at once, not left for the lease
        clear_faults(url)
        relay = outbox_pipeline("relay", env=env)
        assert relay.returncode == 0 and "loaded 10 events" in relay.stdout


def test_status_figures_are_of_one_moment_while_a_relay_holds_clickhouse(cli_env):
    """status waits for the embedded ClickHouse; the PostgreSQL counts must not be older than the ClickHouse ones."""
    assert outbox_pipeline("init", env=cli_env).returncode == 0
    assert outbox_pipeline("demo", "--count", "300", env=cli_env).returncode == 0
    lock_file = Path(cli_env["CLICKHOUSE_URL"].removeprefix("chdb://") + ".lock")
    env = {**os.environ, **cli_env, "OUTBOX_CLICKHOUSE_BUSY_WAIT_SECONDS": "60"}
    # This process holds the chDB directory, as a relay run does, and relays while status waits for it.
    with event_log_store(cli_env["CLICKHOUSE_URL"]) as event_log:
        status = subprocess.Popen(outbox_pipeline_command("status", "--json"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            # status opens the lock file when it starts waiting for the directory.
            while not any(Path(f.path) == lock_file for f in psutil.Process(status.pid).open_files()):
                assert status.poll() is None, status.communicate()
                assert time.monotonic() < deadline, "status never waited for the ClickHouse directory"
                time.sleep(0.05)
            outbox = OutboxStore.connect(cli_env["OUTBOX_DATABASE_URL"])
            try:
                totals = Relay(outbox, event_log, RelayPolicy(batch_size=100), claimed_by="test").drain()
            finally:
                outbox.close()
            assert totals.events_loaded == 300
        except BaseException:
            status.kill()
            raise
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    report = json.loads(out)
    assert (report["pending"], report["in_flight"], report["processed"]) == (0, 0, 300), report
    assert report["clickhouse_rows"] == report["clickhouse_distinct_event_ids"] == 300, report


@pytest.fixture
def embedded_env() -> dict[str, str]:
    """The command's default stores: an embedded PostgreSQL and chDB under a state directory of the test's own."""
    # Not under pytest's temporary root (mode 0700): the embedded server runs as its own system user under root.
    state_dir = Path(tempfile.mkdtemp(prefix="outbox-cli-state-"))
    state_dir.chmod(0o755)
    yield {"OUTBOX_STATE_DIR": str(state_dir), "OUTBOX_DATABASE_URL": "", "CLICKHOUSE_URL": ""}
    pid = embedded_postgres_pid(state_dir)
    if pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            process.send_signal(signal.SIGQUIT)  # immediate shutdown: the data is thrown away
            process.wait(15)
    shutil.rmtree(state_dir, ignore_errors=True)


def embedded_postgres_pid(state_dir: Path) -> int | None:
    """The embedded server's pid from its postmaster.pid file, if that process is alive."""
    try:
        pid = int((state_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def test_status_does_not_start_a_stopped_embedded_server(embedded_env):
    state_dir = Path(embedded_env["OUTBOX_STATE_DIR"])
    assert outbox_pipeline("init", env=embedded_env).returncode == 0
    pid = embedded_postgres_pid(state_dir)
    if pid is not None:  # stopped by hand
        server = psutil.Process(pid)
        server.send_signal(signal.SIGINT)
        server.wait(60)
    result = outbox_pipeline("status", env=embedded_env)
    assert_one_line_error(result, f"the embedded PostgreSQL server in {state_dir / 'postgres'} is not running", "outbox-pipeline start")
    assert result.returncode == 1
    assert embedded_postgres_pid(state_dir) is None
    assert not (state_dir / "postgres" / "postmaster.pid").exists()


def test_start_and_stop_the_embedded_server(embedded_env):
    data_dir = Path(embedded_env["OUTBOX_STATE_DIR"]) / "postgres"
    started = outbox_pipeline("start", env=embedded_env)
    assert started.returncode == 0, started.stderr
    pid = embedded_postgres_pid(data_dir.parent)
    assert pid is not None
    assert started.stdout == f"started the embedded PostgreSQL server in {data_dir} (pid {pid})\n"
    again = outbox_pipeline("start", env=embedded_env)
    assert again.stdout == f"the embedded PostgreSQL server in {data_dir} is already running (pid {pid})\n"
    # Commands use the running server and leave it running.
    assert outbox_pipeline("init", env=embedded_env).returncode == 0
    assert json.loads(outbox_pipeline("status", "--json", env=embedded_env).stdout)["pending"] == 0
    assert embedded_postgres_pid(data_dir.parent) == pid

    stopped = outbox_pipeline("stop", env=embedded_env)
    assert (stopped.returncode, stopped.stderr) == (0, "")
    assert stopped.stdout == f"stopped the embedded PostgreSQL server in {data_dir} (pid {pid})\n"
    assert not psutil.pid_exists(pid)
    assert not (data_dir / "postmaster.pid").exists()
    already = outbox_pipeline("stop", env=embedded_env)
    assert (already.returncode, already.stdout) == (0, f"the embedded PostgreSQL server in {data_dir} is not running\n")


def test_end_runs_asks_the_fleets_runs_in_progress_to_end_and_reports_those_still_running(cli_env, tmp_path):
    import dagster as dg

    from outbox_pipeline.orchestration.fleet_defs import FLEET_TAG
    from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_RELAYS_TAG, FLEET_STOP_TAG

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # One still starting (its op has not tagged its relays yet), one following inside its op: both are asked.
        started = dg.DagsterRun(job_name="follow_outbox_fleet", run_id="a" * 32, status=dg.DagsterRunStatus.STARTED, tags={FLEET_TAG: "true"})
        following = dg.DagsterRun(
            job_name="follow_outbox_fleet", run_id="d" * 32, status=dg.DagsterRunStatus.STARTED, tags={FLEET_TAG: "true", FLEET_RELAYS_TAG: "default"}
        )
        not_started = dg.DagsterRun(job_name="follow_outbox_fleet", run_id="b" * 32, status=dg.DagsterRunStatus.NOT_STARTED, tags={FLEET_TAG: "true"})
        other = dg.DagsterRun(job_name="cleanup_outbox", run_id="c" * 32, status=dg.DagsterRunStatus.STARTED)
        for run in (started, following, not_started, other):
            instance.add_run(run)

    result = outbox_pipeline("end-runs", "--wait", "0.5", env={**cli_env, "DAGSTER_HOME": str(home)})

    assert result.returncode == 0, result.stderr
    # No run worker here to end them: both are reported still running after the wait.
    head, running = result.stdout.strip().split(", still running: ")
    assert (head, sorted(running.split(", "))) == ("asked 2 relay runs to end; 0 ended", ["a" * 32, "d" * 32])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tags = {run_id: instance.get_run_by_id(run_id).tags for run_id in ("a" * 32, "d" * 32, "b" * 32, "c" * 32)}
    # Only the fleet's runs in progress: one not started yet would end at once when it starts, later.
    assert [run_id for run_id, run_tags in tags.items() if FLEET_STOP_TAG in run_tags] == ["a" * 32, "d" * 32]

    without_home = {key: value for key, value in cli_env.items() if key != "DAGSTER_HOME"}
    assert_one_line_error(outbox_pipeline("end-runs", env=without_home), "DAGSTER_HOME", "Set DAGSTER_HOME to its folder")
