"""The console script, run as a user runs it: a real process, its exit code and stderr."""

import json
import os
import shutil
import subprocess
import sys

import psycopg
import pytest

from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.support.clickhouse_http_server import clear_faults, running_clickhouse_http_server, set_faults


def outbox_pipeline(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    executable = shutil.which("outbox-pipeline", path=os.path.dirname(sys.executable))
    command = [executable] if executable else [sys.executable, "-m", "outbox_pipeline.cli"]
    return subprocess.run([*command, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


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
    assert after == {
        "pending": 0,
        "processed": 1500,
        "failed": 0,
        "oldest_pending_age_seconds": None,
        "clickhouse_rows": 1500,
        "clickhouse_distinct_event_ids": 1500,
        "in_flight": 0,
        "retrying": 0,
    }


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
