"""dagster.yaml's production block, uncommented, starts a DagsterInstance on a real PostgreSQL server."""

import urllib.parse
import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from outbox_pipeline_tests.conftest import with_database

REPO_ROOT = Path(__file__).resolve().parents[2]
START_MARKER = "# >>> production storage"
END_MARKER = "# <<< production storage"


def production_config_text() -> str:
    """dagster.yaml with the production storage block uncommented, as an operator would do it."""
    lines = (REPO_ROOT / "dagster.yaml").read_text().splitlines()
    start, end = lines.index(START_MARKER), lines.index(END_MARKER)
    block = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[start + 1 : end]]
    assert block, "the production storage block is empty"
    return "\n".join(lines[:start] + block + lines[end + 1 :]) + "\n"


def dagster_pg_env(url: str) -> dict[str, str]:
    """DAGSTER_PG_* for a server URL; a Unix-socket server (the embedded one) is reached through PGHOST."""
    parts = urllib.parse.urlsplit(url)
    socket_dir = urllib.parse.parse_qs(parts.query).get("host", [None])[0]
    env = {
        "DAGSTER_PG_USERNAME": urllib.parse.unquote(parts.username or "postgres"),
        "DAGSTER_PG_PASSWORD": urllib.parse.unquote(parts.password or ""),
        "DAGSTER_PG_PORT": str(parts.port or 5432),
    }
    if parts.hostname:
        env["DAGSTER_PG_HOST"] = parts.hostname
    else:
        # An empty host makes libpq take PGHOST, which may name a socket directory; a URL host cannot.
        env["DAGSTER_PG_HOST"] = ""
        env["PGHOST"] = socket_dir
    return env


@pytest.fixture
def dagster_database(postgres_server_url):
    name = f"dagster_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dg.op
def say_hello(context: dg.OpExecutionContext) -> str:
    context.log.info("hello from the production instance")
    return "hello"


@dg.job
def hello_job():
    say_hello()


def test_production_storage_block_starts_an_instance_on_postgresql(tmp_path, monkeypatch, postgres_server_url, dagster_database):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(production_config_text())
    for key, value in {**dagster_pg_env(postgres_server_url), "DAGSTER_PG_DB": dagster_database}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    with dg.DagsterInstance.from_config(str(home)) as instance:
        from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)

        result = hello_job.execute_in_process(instance=instance)
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        assert any("hello from the production instance" in message for message in logs)

        # The run is in the database named by DAGSTER_PG_DB, not in a local file.
        with psycopg.connect(with_database(postgres_server_url, dagster_database)) as conn:
            stored = conn.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,)).fetchone()
        assert stored == ("SUCCESS",)
        assert not list(home.glob("**/*.db"))

        # The rest of the file loads as the daemon reads it.
        settings = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == settings["concurrency"]["runs"]["max_concurrent_runs"]
        limits = {limit["key"]: limit["limit"] for limit in queue.tag_concurrency_limits}
        assert limits == {"outbox_pipeline/embedded_clickhouse": 1, "outbox_pipeline/fleet": 1, "outbox_pipeline/relay": 4, "dagster/backfill": 2}
        # Pools are enforced when the queue launches a run, so a run that needs the chDB pool waits for it.
        pools = instance.get_concurrency_config().pool_config
        assert (pools.pool_granularity.value, pools.default_pool_limit) == ("run", 1)
        assert (instance.run_retries_enabled, instance.run_retries_max_retries) == (True, 2)
        assert instance.run_retries_retry_on_asset_or_op_failure is False  # the relay retries inside its ops
        assert instance.run_monitoring_enabled
        assert instance.get_settings("sensors") == {"use_threads": True, "num_workers": 4}
        assert instance.get_settings("schedules") == {"use_threads": True, "num_workers": 2}


def test_concurrency_uses_one_style_only():
    settings = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    # The `concurrency:` keys and the older run_coordinator / run_queue keys may not be mixed.
    assert "concurrency" in settings
    assert "run_coordinator" not in settings and "run_queue" not in settings
    production = yaml.safe_load(production_config_text())
    assert production["storage"]["postgres"]["postgres_db"]["db_name"] == {"env": "DAGSTER_PG_DB"}


def test_no_run_limit_can_hold_the_fleet_s_run_in_the_queue():
    runs = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["concurrency"]["runs"]
    limits = {limit["key"]: limit["limit"] for limit in runs["tag_concurrency_limits"]}
    # Every relay follows in the fleet's one run, which carries none of the relay or backfill tags ...
    from outbox_pipeline.definitions import defs

    fleet_tags = defs.resolve_job_def("follow_outbox_fleet").tags
    assert not {"outbox_pipeline/relay", "dagster/backfill"} & set(fleet_tags)
    # ... and finds a slot even when one-off relay runs and replays fill their limits, beside a scheduled run or two.
    assert runs["max_concurrent_runs"] >= limits["outbox_pipeline/relay"] + limits["dagster/backfill"] + limits["outbox_pipeline/fleet"] + 2
