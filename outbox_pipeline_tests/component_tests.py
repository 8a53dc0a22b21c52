"""Several relays in one code location, configured as ``outbox_pipeline.OutboxRelay`` components.

The code location holds the default relay (outbox A, every type, into ``event_log``)
and three components:

* ``orders``: outbox A, ``order_*``, into ``orders_event_log``;
* ``users``: outbox A, ``user_*``, into ``users_event_log``;
* ``billing``: outbox B (another database), every type, into ``event_log`` as well.

Each destination must hold exactly its matching events once, also after a run of
one relay was killed in the middle.
"""

import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import code_location_settings, load_settings
from outbox_pipeline.definitions import build_defs
from outbox_pipeline.orchestration.component import OutboxRelay
from outbox_pipeline_tests.conftest import event_log_store, new_database
from outbox_pipeline_tests.support.relay_runs import publish_raw
from outbox_pipeline_tests.support.relay_worker import run_worker

COMPONENTS = {
    "orders": {
        "name": "orders",
        "outbox_database_url": "{{ env.OUTBOX_DATABASE_URL }}",
        "clickhouse_url": "{{ env.CLICKHOUSE_URL }}",
        "table": "orders_event_log",
        "event_types": ["order_*"],
    },
    "users": {
        "name": "users",
        "outbox_database_url": "{{ env.OUTBOX_DATABASE_URL }}",
        "clickhouse_url": "{{ env.CLICKHOUSE_URL }}",
        "table": "users_event_log",
        "event_types": ["user_*"],
    },
    "billing": {
        "name": "billing",
        "outbox_database_url": "{{ env.BILLING_OUTBOX_DATABASE_URL }}",
        "clickhouse_url": "{{ env.CLICKHOUSE_URL }}",
    },
}


@pytest.fixture
def billing_database_url(postgres_server_url, relay_env, monkeypatch):
    with new_database(postgres_server_url, "outbox_billing", migrated=True) as url:
        monkeypatch.setenv("BILLING_OUTBOX_DATABASE_URL", url)
        yield url


@pytest.fixture
def code_location(relay_env, billing_database_url) -> dg.Definitions:
    """The project's code location with the three components, built from this test's environment."""
    code_location_settings.cache_clear()
    components = [OutboxRelay.resolve_from_yaml(yaml.safe_dump(attributes)) for attributes in COMPONENTS.values()]
    defs = build_defs(load_settings(), with_defs_folder=False, components=[dg.build_defs_for_component(c) for c in components])
    yield defs
    code_location_settings.cache_clear()


def tables_rows(clickhouse_url: str) -> dict[str, tuple[int, int, set[str]]]:
    with event_log_store(clickhouse_url) as store:
        result = {}
        for table in ("event_log", "orders_event_log", "users_event_log"):
            if not int(store.client.command(f"EXISTS TABLE {table}")):
                result[table] = (0, 0, set())
                continue
            rows = store.client.query(f"SELECT count(), uniqExact(event_id), groupUniqArray(event_type) FROM {table}").result_rows[0]
            result[table] = (int(rows[0]), int(rows[1]), set(rows[2]))
        return result


def publish_mix(url: str, per_type: int) -> None:
    for event_type in ("order_paid", "order_shipped", "user_created", "payment_refunded"):
        publish_raw(url, per_type, event_type=event_type)


def run_job(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, batch_size: int = 50) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance, run_config={"ops": {"extract_outbox_batches": {"config": {"batch_size": batch_size}}}}, raise_on_error=False
    )
    assert result.success, [event.message for event in result.all_events if event.is_failure]
    return result


def test_the_code_location_names_every_relay_and_keeps_the_default_names(code_location):
    repository = code_location.get_repository_def()
    jobs = {job.name for job in repository.get_all_jobs()}
    for base in ("process_outbox_events", "relay_low_latency", "requeue_failed_events", "replay_outbox_events", "cleanup_outbox", "check_event_log"):
        assert {base, f"{base}_orders", f"{base}_users", f"{base}_billing"} <= jobs
    assert "follow_outbox_fleet" in jobs
    sensors = {sensor.name for sensor in repository.sensor_defs}
    # One sensor of each kind watches every relay: none has a pending sensor (nor a following run) of its own.
    assert sensors == {"outbox_pending_sensor", "outbox_lag_sensor", "sentry_run_failure_sensor"}
    keys = {node.key for node in repository.asset_graph.asset_nodes}
    assert keys == {
        dg.AssetKey("event_log"),
        dg.AssetKey(["orders", "orders_event_log"]),
        dg.AssetKey(["users", "users_event_log"]),
        dg.AssetKey(["billing", "event_log"]),
        # The default relay's typed tables (OUTBOX_EVENT_CLASSES: the demo's classes); the components register none.
        *map(dg.AssetKey, ["order_paid", "order_shipped", "payment_refunded", "user_created"]),
    }


def test_secrets_from_the_environment_stay_variable_names(code_location):
    job = code_location.resolve_job_def("process_outbox_events_billing")
    config = job.resource_defs["outbox"].config_schema.default_value
    assert config["url"] == {"env": "BILLING_OUTBOX_DATABASE_URL"}
    assert config["relay_name"] == "billing"


def test_every_destination_holds_its_matching_events_once(code_location, relay_env, billing_database_url):
    url_a = relay_env["OUTBOX_DATABASE_URL"]
    publish_mix(url_a, 120)
    publish_raw(billing_database_url, 70, event_type="invoice_sent")
    instance = dg.DagsterInstance.ephemeral()

    for name in ("process_outbox_events", "process_outbox_events_orders", "process_outbox_events_users", "process_outbox_events_billing"):
        run_job(code_location, name, instance)

    rows = tables_rows(relay_env["CLICKHOUSE_URL"])
    assert rows["event_log"] == (4 * 120 + 70, 4 * 120 + 70, {"order_paid", "order_shipped", "user_created", "payment_refunded", "invoice_sent"})
    assert rows["orders_event_log"] == (240, 240, {"order_paid", "order_shipped"})
    assert rows["users_event_log"] == (120, 120, {"user_created"})

    # Each relay's bookkeeping is its own: later events reach each destination once more, no more.
    publish_mix(url_a, 10)
    for name in ("process_outbox_events_users", "process_outbox_events", "process_outbox_events_orders", "process_outbox_events_billing"):
        run_job(code_location, name, instance)
    rows = tables_rows(relay_env["CLICKHOUSE_URL"])
    assert rows["event_log"][:2] == (4 * 130 + 70, 4 * 130 + 70)
    assert rows["orders_event_log"][:2] == (260, 260)
    assert rows["users_event_log"][:2] == (130, 130)


def test_a_killed_relay_of_one_instance_loses_and_repeats_nothing(code_location, relay_env, billing_database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("OUTBOX_LEASE_SECONDS", "1")
    url_a = relay_env["OUTBOX_DATABASE_URL"]
    publish_mix(url_a, 150)
    orders_yaml = tmp_path / "defs.yaml"
    orders_yaml.write_text(yaml.safe_dump({"type": "outbox_pipeline.OutboxRelay", "attributes": COMPONENTS["orders"]}))
    env = {**relay_env, "OUTBOX_LEASE_SECONDS": "1", "BILLING_OUTBOX_DATABASE_URL": billing_database_url}

    # The orders relay's run dies right after ClickHouse acknowledged its second insert.
    died = run_worker("job", "--component", str(orders_yaml), "--kill-after", "insert", "--kill-at", "2", "--batch-size", "100", env=env)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert tables_rows(relay_env["CLICKHOUSE_URL"])["orders_event_log"][0] == 200  # two batches in, none marked

    # Meanwhile the other relays go on, untouched by the dead run's leases.
    instance = dg.DagsterInstance.ephemeral()
    run_job(code_location, "process_outbox_events", instance, batch_size=100)
    run_job(code_location, "process_outbox_events_users", instance, batch_size=100)
    time.sleep(1.5)  # the dead run's leases expire
    run_job(code_location, "process_outbox_events_orders", instance, batch_size=100)

    rows = tables_rows(relay_env["CLICKHOUSE_URL"])
    assert rows["orders_event_log"][:2] == (300, 300)
    assert rows["users_event_log"][:2] == (150, 150)
    assert rows["event_log"][:2] == (600, 600)


def test_a_bad_component_fails_the_code_location_in_one_line(relay_env):
    with pytest.raises(ConfigurationError, match="relay name 'orders-eu' is not valid"):
        OutboxRelay.resolve_from_yaml("name: orders-eu").relay_instance()
    with pytest.raises(ConfigurationError, match="relay billing: outbox_database_url: the variable NOWHERE_URL is not set"):
        OutboxRelay.resolve_from_yaml('name: billing\noutbox_database_url: "{{ env.NOWHERE_URL }}"').relay_instance()
    with pytest.raises(ConfigurationError, match="relay orders: ClickHouse table name 'drop table' is not valid"):
        OutboxRelay.resolve_from_yaml("name: orders\ntable: drop table").relay_instance()


def test_dg_checks_and_lists_the_project(tmp_path):
    root = Path(__file__).resolve().parents[1]
    import subprocess
    import sys

    dg_cli = Path(sys.executable).with_name("dg")
    checked = subprocess.run([str(dg_cli), "check", "defs"], cwd=root, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = subprocess.run([str(dg_cli), "list", "defs", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "process_outbox_events" in listed.stdout and "outbox_pending_sensor" in listed.stdout
