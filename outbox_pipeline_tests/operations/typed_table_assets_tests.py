"""Typed tables in the code location: the README's demo, their assets and checks, and a class that cannot map."""

import decimal
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import load_settings
from outbox_pipeline.definitions import build_defs, build_resources, defs
from outbox_pipeline.orchestration.component import OutboxRelay
from outbox_pipeline.orchestration.relay_defs import build_relay_defs
from outbox_pipeline.producer.events import RawEvent
from outbox_pipeline.producer.publishing import publish_many
from outbox_pipeline_tests.cli_tests import outbox_pipeline
from outbox_pipeline_tests.support.relay_runs import run_relay
from outbox_pipeline_tests.support.typed_events import TYPED_TABLES, publish_demo, typed_counts, typed_store

ROOT = Path(__file__).resolve().parents[2]


def test_after_init_demo_and_one_relay_run_order_paid_sums_the_outbox_amounts(relay_env):
    for command in (["init"], ["demo", "--count", "3000"]):
        result = outbox_pipeline(*command, env=relay_env)
        assert result.returncode == 0, result.stderr
    assert "typed tables order_paid, order_shipped, payment_refunded, user_created ready" in outbox_pipeline("init", env=relay_env).stdout

    with dg.instance_for_test() as instance:
        assert run_relay(instance).success
        # The typed tables were filled inside the run's inserts: the run records them as materialized too.
        for table in TYPED_TABLES:
            assert instance.get_latest_materialization_event(dg.AssetKey(table)) is not None, table

    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        expected, paid = conn.execute(
            "SELECT sum((event_context::jsonb ->> 'amount')::numeric), count(*) FROM outbox WHERE event_type = 'order_paid'"
        ).fetchone()
    store = typed_store(relay_env["CLICKHOUSE_URL"])
    try:
        total, rows, column_type = store.client.query(
            "SELECT sum(amount), count(), toTypeName(any(amount)) FROM order_paid"
        ).result_rows[0]
    finally:
        store.close()
    assert paid > 1_000 and (total, rows) == (expected, paid)
    assert isinstance(total, decimal.Decimal) and column_type == "Decimal(38, 9)"


def test_each_typed_table_is_an_asset_downstream_of_event_log_with_its_checks():
    graph = defs.resolve_asset_graph()
    for table in TYPED_TABLES:
        key = dg.AssetKey(table)
        assert graph.get(key).parent_keys == {dg.AssetKey("event_log")}
        assert {check.name for check in graph.get_check_keys_for_assets({key})} == {"parses", "matches_event_log"}
        columns = {column.name: column.type for column in graph.get(key).metadata["dagster/column_schema"].columns}
        assert columns["event_id"] == "UUID" and columns["event_date_time"] == "DateTime64(6, 'UTC')"
    order_paid = graph.get(dg.AssetKey("order_paid"))
    assert order_paid.metadata["event_class"] == "OrderPaid"
    assert {c.name: c.type for c in order_paid.metadata["dagster/column_schema"].columns}["amount"] == "Decimal(38, 9)"


def test_the_checks_count_events_that_do_not_parse_and_name_one(relay_env):
    drifted = RawEvent(event_type="order_paid", context='{"order_id": 1, "user_id": 2, "amount": 10.5, "currency": 3}')
    good = RawEvent(event_type="order_paid", context='{"order_id": 1, "user_id": 2, "amount": "10.50", "currency": "EUR"}')
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        publish_many(conn, [good, drifted])
    assert run_relay().success

    result = defs.resolve_job_def("check_event_log").execute_in_process(resources=build_resources(), raise_on_error=False)

    evaluations = {
        evaluation.check_name: evaluation
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.asset_key == dg.AssetKey("order_paid")
    }
    parses, matches = evaluations["parses"], evaluations["matches_event_log"]
    assert not parses.passed and parses.metadata["parse_failures"].value == 1
    assert parses.metadata["example_event_id"].value == str(drifted.event_id)
    assert f"1 of 2 order_paid events do not parse into order_paid, for example event_id {drifted.event_id}" in parses.description
    assert matches.passed and matches.metadata["rows"].value == 1
    store = typed_store(relay_env["CLICKHOUSE_URL"])
    try:
        assert store.counts() == (2, 2)  # the drifted event stays in event_log
    finally:
        store.close()


def test_a_registered_class_that_cannot_map_fails_the_code_location_in_one_line(relay_env):
    bad = {**relay_env, "OUTBOX_EVENT_CLASSES": "outbox_pipeline_tests.support.unmappable_events"}
    with pytest.raises(ConfigurationError, match="event class field AttachmentUploaded.content: type bytes has no ClickHouse column type"):
        build_defs(load_settings(bad), with_defs_folder=False)

    checked = subprocess.run(
        [str(Path(sys.executable).with_name("dg")), "check", "defs"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **bad, "PYTHONPATH": str(ROOT)},
    )
    assert checked.returncode != 0
    assert "AttachmentUploaded.content: type bytes has no ClickHouse column type" in checked.stdout + checked.stderr


def test_none_registers_no_class():
    assert load_settings({"OUTBOX_EVENT_CLASSES": "none"}).event_classes == ()
    assert load_settings({}).event_classes == ("outbox_pipeline.producer.demo_events",)


def test_a_class_changed_in_a_way_that_cannot_map_stops_the_run_in_one_line_and_loses_nothing(relay_env, monkeypatch, outbox):
    monkeypatch.setenv("OUTBOX_LEASE_SECONDS", "1")
    publish_demo(relay_env["OUTBOX_DATABASE_URL"], 100)
    assert run_relay().success
    later = publish_demo(relay_env["OUTBOX_DATABASE_URL"], 50, seed=8)
    monkeypatch.setenv("OUTBOX_EVENT_CLASSES", "outbox_pipeline_tests.support.changed_events")

    failed = run_relay()

    assert not failed.success
    [failure] = [event for event in failed.all_events if event.event_type_value == "STEP_FAILURE"]
    error, messages = failure.step_failure_data.error, []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    message = messages[-1].strip()  # the error the step raised, under Dagster's wrapper
    assert "\n" not in message.removeprefix("outbox_pipeline.config.errors.ConfigurationError: ")
    assert (
        "typed table order_paid no longer matches OrderPaid (event type order_paid): amount is Decimal(38, 9) in ClickHouse "
        "but the class now maps it to Int64. Publish the changed class under a new event_type" in message
    )
    assert outbox.counts().processed == 100

    monkeypatch.setenv("OUTBOX_EVENT_CLASSES", "outbox_pipeline.producer.demo_events")
    time.sleep(1.5)  # the failed run's lease (OUTBOX_LEASE_SECONDS=1) expires
    assert run_relay().success
    assert outbox.counts().processed == 150
    counts = typed_counts(relay_env["CLICKHOUSE_URL"])
    assert counts["order_paid"][0] == counts["order_paid"][1] >= later.per_type["order_paid"]


def test_a_relay_component_registers_classes_of_its_own_event_types(relay_env):
    yaml = "name: orders\ntable: orders_event_log\nevent_types: ['order_*']\nevent_classes: [{}]"
    orders = OutboxRelay.resolve_from_yaml(yaml.format("'outbox_pipeline.producer.demo_events:OrderPaid'")).relay_instance()
    [table] = orders.typed_tables
    assert (table.name, table.view_name) == ("orders_event_log_order_paid", "orders_event_log_order_paid_mv")
    assert orders.typed_asset_key(table) == dg.AssetKey(["orders", "orders_event_log_order_paid"])

    everything = OutboxRelay.resolve_from_yaml(yaml.format("'outbox_pipeline.producer.demo_events'")).relay_instance()
    with pytest.raises(ConfigurationError, match="relay orders: event_classes: PaymentRefunded has event type payment_refunded, which relay orders does not take"):
        build_relay_defs(everything)  # what loading the component builds
