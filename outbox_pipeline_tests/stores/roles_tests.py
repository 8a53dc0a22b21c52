"""Least-privilege roles on the real server: producers may only add events; the relay role runs every relay job."""

import datetime as dt
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from outbox_pipeline.definitions import build_resources
from outbox_pipeline.producer import publish
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline_tests.conftest import event_log_store
from outbox_pipeline_tests.operations.assets_tests import run_checks
from outbox_pipeline_tests.operations.support import publish_on, run_cleanup, run_replay, utc_today
from outbox_pipeline_tests.support.default_relay import follow_outbox_fleet, requeue_failed_events
from outbox_pipeline_tests.support.relay_runs import publish_raw, run_relay

CLI = Path(sys.executable).with_name("outbox-pipeline")


def as_user(url: str, user: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
def roles(relay_env):
    """Both roles made by `outbox-pipeline init --roles`, and a login user in each; dropped afterwards."""
    url = relay_env["OUTBOX_DATABASE_URL"]
    suffix = uuid.uuid4().hex[:8]
    names = {"producer": f"outbox_producer_{suffix}", "relay": f"outbox_relay_{suffix}"}
    users = {"producer": f"orders_app_{suffix}", "relay": f"relay_worker_{suffix}"}
    init = subprocess.run(
        [str(CLI), "init", "--roles", "--producer-role", names["producer"], "--relay-role", names["relay"]],
        env={**relay_env, "PATH": str(CLI.parent)}, capture_output=True, text=True, timeout=180,
    )
    assert init.returncode == 0, init.stderr
    with psycopg.connect(url, autocommit=True) as admin:
        for kind in ("producer", "relay"):
            admin.execute(f'CREATE ROLE "{users[kind]}" LOGIN IN ROLE "{names[kind]}"')
    try:
        yield {kind: as_user(url, users[kind]) for kind in users}
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            for role in [*users.values(), *names.values()]:
                admin.execute(f'DROP OWNED BY "{role}"')
                admin.execute(f'DROP ROLE "{role}"')


def test_the_producer_role_publishes_and_can_neither_read_nor_alter_events(relay_env, roles):
    publish_raw(roles["producer"], 20)  # publish_many: COPY
    with psycopg.connect(roles["producer"]) as conn:
        publish(conn, RawEvent(event_type="order_paid", context="{}"))  # publish: one INSERT
    forbidden = [
        "SELECT count(*) FROM outbox",
        "SELECT event_context FROM outbox LIMIT 1",
        "UPDATE outbox SET event_type = 'forged'",
        "DELETE FROM outbox",
        "TRUNCATE outbox",
        "SELECT count(*) FROM outbox_batch",
        "UPDATE outbox_relay_cursor SET updated_at = now()",
    ]
    for statement in forbidden:
        with psycopg.connect(roles["producer"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as admin:
        assert admin.execute("SELECT count(*) FROM outbox").fetchone()[0] == 21


def test_every_relay_job_runs_under_the_relay_role(relay_env, roles, monkeypatch):
    yesterday = utc_today() - dt.timedelta(days=1)
    events = publish_on(roles["producer"], yesterday, 30)
    publish_raw(roles["producer"], 20)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", roles["relay"])

    assert run_relay(run_config={"batch_size": 10}).success
    publish_raw(roles["producer"], 5, start=20)
    fleet = follow_outbox_fleet.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), resources=build_resources(),
        run_config={"ops": {"follow_fleet": {"config": {"follow_seconds": 0}}}}, raise_on_error=False,
    )
    assert fleet.success
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (55, 55)
        event_log.client.command(f"DELETE FROM event_log WHERE event_id = '{events[0].event_id}'")
    assert run_replay(yesterday).success
    requeue = requeue_failed_events.execute_in_process(
        resources=build_resources(), run_config={"ops": {"requeue_failed": {"config": {"all_failed": True}}}}, raise_on_error=False
    )
    assert requeue.success
    assert run_cleanup().success
    checks = run_checks()
    assert checks.success and all(evaluation.passed for evaluation in checks.get_asset_check_evaluations())
    with event_log_store(relay_env["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (55, 55)
    # The relay role keeps to its bookkeeping: the schema is the owner's.
    with psycopg.connect(roles["relay"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("ALTER TABLE outbox ADD COLUMN forged text")


def test_grants_prints_the_statements_for_a_dba(relay_env):
    printed = subprocess.run([str(CLI), "grants"], env={**relay_env, "PATH": str(CLI.parent)}, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert 'CREATE ROLE "outbox_producer" NOLOGIN;' in lines
    assert 'GRANT INSERT ON outbox TO "outbox_producer";' in lines
    assert 'GRANT SELECT, DELETE ON outbox, outbox_default TO "outbox_relay";' in lines
    # Nothing else for the producer: no read, no update, no delete; the sequence gives its events their ids.
    assert [line for line in lines if '"outbox_producer"' in line and "GRANT" in line and "USAGE ON SCHEMA" not in line] == [
        'GRANT INSERT ON outbox TO "outbox_producer";',
        'GRANT USAGE ON SEQUENCE outbox_id_seq TO "outbox_producer";',
    ]
