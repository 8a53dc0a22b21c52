"""A fleet of relays in one code location: one run follows them all, none waits behind another, a failing one fails alone.

The code location holds the default relay and six ``OutboxRelay`` components on two outbox
databases, more than the ``outbox_pipeline/relay`` run limit of ``dagster.yaml`` (4). Real
stores throughout: PostgreSQL, chDB shared by every relay in the run's one process, and the
real sentry-sdk against the recording server.
"""

import json
import threading
import time

import dagster as dg
import pytest
import yaml

from outbox_pipeline.config.settings import code_location_settings, load_settings
from outbox_pipeline.definitions import build_defs
from outbox_pipeline.orchestration.component import OutboxRelay
from outbox_pipeline.orchestration.ops.fleet_ops import FLEET_RELAYS_TAG
from outbox_pipeline_tests.conftest import event_log_store, new_database
from outbox_pipeline_tests.monitoring.envelopes import errors, transactions
from outbox_pipeline_tests.support.relay_runs import publish_raw

# name -> (outbox: "a" or "b", event type, table)
RELAYS = {
    "orders": ("a", "order_paid", "orders_event_log"),
    "users": ("a", "user_created", "users_event_log"),
    "payments": ("a", "payment_refunded", "payments_event_log"),
    "shipping": ("a", "parcel_sent", "shipping_event_log"),
    "billing": ("b", "invoice_sent", "billing_event_log"),
    "support": ("b", "ticket_opened", "support_event_log"),
}
FAST = {"interval_seconds": 0.2, "window_seconds": 1.0, "quiet_seconds": 2.0, "follow_seconds": 60.0}


def component(name: str, outbox: str = "a", event_type: str = "", table: str = "", **overrides) -> dict:
    variable = "OUTBOX_DATABASE_URL" if outbox == "a" else "FLEET_B_OUTBOX_DATABASE_URL"
    return {
        "name": name, "outbox_database_url": f"{{{{ env.{variable} }}}}", "clickhouse_url": "{{ env.CLICKHOUSE_URL }}",
        "table": table, "event_types": [event_type], **overrides,
    }


def fleet_location(attributes: list[dict]) -> dg.Definitions:
    code_location_settings.cache_clear()
    components = [OutboxRelay.resolve_from_yaml(yaml.safe_dump(each)) for each in attributes]
    return build_defs(load_settings(), with_defs_folder=False, components=[dg.build_defs_for_component(c) for c in components])


@pytest.fixture
def second_outbox(postgres_server_url, relay_env, monkeypatch):
    with new_database(postgres_server_url, "outbox_fleet_b", migrated=True) as url:
        monkeypatch.setenv("FLEET_B_OUTBOX_DATABASE_URL", url)
        yield url
    code_location_settings.cache_clear()


def run_fleet(defs: dg.Definitions, instance: dg.DagsterInstance, **follow) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def("follow_outbox_fleet").execute_in_process(
        instance=instance, run_config={"ops": {"follow_fleet": {"config": {**FAST, **follow}}}}, raise_on_error=False
    )


def delivery(clickhouse_url: str, table: str) -> tuple[int, int, float]:
    """count(), uniqExact(event_id) and the largest commit-to-visible delay (event_date_time to loaded_at) in seconds."""
    with event_log_store(clickhouse_url) as store:
        if not int(store.client.command(f"EXISTS TABLE {table}")):
            return 0, 0, 0.0
        rows, distinct, delay = store.client.query(
            f"SELECT count(), uniqExact(event_id), max(dateDiff('millisecond', event_date_time, loaded_at)) FROM {table}"
        ).result_rows[0]
    return int(rows), int(distinct), (delay or 0) / 1000


class Stream(threading.Thread):
    """Every relay's event type, ``per_round`` events each every ``pause`` seconds, for ``seconds``."""

    def __init__(self, urls: dict[str, str], *, seconds: float, per_round: int = 5, pause: float = 0.2):
        super().__init__(daemon=True)
        self.urls, self.seconds, self.per_round, self.pause = urls, seconds, per_round, pause
        self.published = dict.fromkeys(RELAYS, 0)
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            stop = time.monotonic() + self.seconds
            while time.monotonic() < stop:
                for name, (outbox, event_type, _) in RELAYS.items():
                    publish_raw(self.urls[outbox], self.per_round, event_type=event_type, start=self.published[name])
                    self.published[name] += self.per_round
                time.sleep(self.pause)
        except BaseException as exc:  # surfaced by the test
            self.failure = exc

    def finish(self) -> dict[str, int]:
        self.join(timeout=120)
        assert self.failure is None, self.failure
        return self.published


def test_one_run_follows_more_relays_than_the_run_limit_and_none_waits(relay_env, second_outbox):
    urls = {"a": relay_env["OUTBOX_DATABASE_URL"], "b": second_outbox}
    defs = fleet_location([component(name, *spec) for name, spec in RELAYS.items()])
    instance = dg.DagsterInstance.ephemeral()
    publish_raw(urls["a"], 40, event_type="page_viewed")  # only the default relay takes it

    # The one sensor asks for one run, whatever the number of relays with pending work.
    sensor = defs.resolve_sensor_def("outbox_pending_sensor")
    outboxes = {key: resource for key, resource in defs.resources.items() if key.startswith("outbox")}
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=outboxes) as context:
        requests = sensor(context)
    requests = [requests] if isinstance(requests, dg.RunRequest) else list(requests or [])
    assert [request.job_name for request in requests] == ["follow_outbox_fleet"]

    stream = Stream(urls, seconds=6.0)
    stream.start()
    result = run_fleet(defs, instance)
    published = stream.finish()
    assert result.success, [event.message for event in result.all_events if event.is_failure]

    clickhouse = relay_env["CLICKHOUSE_URL"]
    for name, (_, _, table) in RELAYS.items():
        rows, distinct, worst = delivery(clickhouse, table)
        assert (rows, distinct) == (published[name], published[name]), name
        # Delivered while the stream ran, each within a few looks of its commit: no relay waited for another.
        assert worst < 5.0, (name, worst)
    rows, distinct, _ = delivery(clickhouse, "event_log")
    # The default relay takes every type of its own outbox (a).
    assert rows == distinct == 40 + sum(count for name, count in published.items() if RELAYS[name][0] == "a")

    # Each relay keeps its own asset: materialized by this run, with its checks evaluated.
    for name, (_, _, table) in RELAYS.items():
        key = dg.AssetKey([name, table])
        records = instance.fetch_materializations(key, limit=100).records
        assert [record.run_id for record in records if record.run_id == result.run_id], name
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key([dg.AssetCheckKey(key, "freshness")])
        assert check, name


def test_a_failing_relay_fails_alone(relay_env, second_outbox, recorder):
    urls = {"a": relay_env["OUTBOX_DATABASE_URL"], "b": second_outbox}
    clickhouse = relay_env["CLICKHOUSE_URL"]
    # A table that ClickHouse rejects for this relay: it exists, with columns the relay's rows do not fit.
    with event_log_store(clickhouse) as store:
        store.client.command("CREATE TABLE broken_event_log (n UInt8) ENGINE = MergeTree ORDER BY n")
    defs = fleet_location([
        component("orders", "a", "order_paid", "orders_event_log"),
        component("billing", "b", "invoice_sent", "billing_event_log"),
        # Its outbox database is unreachable.
        {**component("lost", "a", "lost_*", "lost_event_log"), "outbox_database_url": "postgresql://nobody@127.0.0.1:1/none"},
        component("broken", "a", "order_paid", "broken_event_log"),
    ])
    publish_raw(urls["a"], 30, event_type="order_paid")
    publish_raw(urls["b"], 20, event_type="invoice_sent")

    # A failing relay's waiting events keep the fleet from ending quiet: it ends at follow_seconds.
    started = time.monotonic()
    instance = dg.DagsterInstance.ephemeral()
    result = run_fleet(defs, instance, follow_seconds=6.0)
    assert time.monotonic() - started >= 6.0

    assert result.success, [event.message for event in result.all_events if event.is_failure]
    assert delivery(clickhouse, "orders_event_log")[:2] == (30, 30)
    assert delivery(clickhouse, "billing_event_log")[:2] == (20, 20)
    assert delivery(clickhouse, "event_log")[:2] == (30, 30)  # the default relay reads outbox a
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("relay lost failed" in line for line in logged)
    assert any("relay broken failed" in line for line in logged)
    assert result.output_for_node("follow_fleet")["orders"]["events_loaded"] == 30
    # Its events stay in the outbox for that relay: nothing of the broken relay was marked delivered.
    assert result.output_for_node("follow_fleet")["broken"]["events_loaded"] == 0

    # Sentry: an issue per failing relay, grouped by relay, and each relay's own transaction and status.
    recorder.wait_for(lambda rec: len(transactions(rec)) >= 5)
    fingerprints = {tuple(event["fingerprint"][:2]) for event in errors(recorder)}
    assert {("outbox-relay-failure", "lost"), ("outbox-relay-failure", "broken")} <= fingerprints
    assert not {fp for fp in fingerprints if fp[1] in ("orders", "billing", "default")}
    status = {t["tags"]["outbox.relay"]: t["contexts"]["trace"]["status"] for t in transactions(recorder) if "outbox.relay" in t["tags"]}
    assert status == {"default": "ok", "orders": "ok", "billing": "ok", "lost": "internal_error", "broken": "internal_error"}
    assert {t["transaction"] for t in transactions(recorder)} == {"process_outbox_events"}


def test_checks_and_run_history_are_one_run_per_tick_for_the_whole_fleet(relay_env, second_outbox):
    defs = fleet_location([component(name, *spec) for name, spec in list(RELAYS.items())[:3]])
    schedules = {schedule.name: schedule.job_name for schedule in defs.schedules}
    assert schedules["check_event_log_schedule"] == "check_all_event_logs"
    assert schedules["prune_dagster_runs_schedule"] == "prune_all_dagster_runs"
    assert not [name for name in schedules if name.startswith(("check_event_log_schedule_", "prune_dagster_runs_schedule_"))]

    instance = dg.DagsterInstance.ephemeral()
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 10, event_type="order_paid")
    fleet_run = run_fleet(defs, instance, follow_seconds=0)
    assert fleet_run.success

    checks = defs.resolve_job_def("check_all_event_logs").execute_in_process(instance=instance, raise_on_error=False)
    assert checks.success
    evaluated = {(e.asset_key.to_user_string(), e.check_name) for e in checks.get_asset_check_evaluations()}
    assets = ["event_log", *(f"{name}/{table}" for name, (_, _, table) in list(RELAYS.items())[:3])]
    typed = ["order_paid", "order_shipped", "payment_refunded", "user_created"]  # the default relay's typed tables
    assert evaluated == {(asset, check) for asset in assets for check in ("freshness", "no_duplicates", "complete")} | {
        (table, check) for table in typed for check in ("parses", "matches_event_log")
    }

    # The fleet's runs are pruned with the default relay's history, all but each job's latest success.
    later_fleet_run = run_fleet(defs, instance, follow_seconds=0)
    later_checks = defs.resolve_job_def("check_all_event_logs").execute_in_process(instance=instance, raise_on_error=False)
    pruned = defs.resolve_job_def("prune_all_dagster_runs").execute_in_process(
        instance=instance, run_config={"ops": {"prune_run_histories": {"config": {"run_retention_hours": 1e-9}}}}, raise_on_error=False
    )
    assert pruned.success
    assert instance.get_run_by_id(fleet_run.run_id) is None
    assert instance.get_run_by_id(checks.run_id) is None
    assert all(instance.get_run_by_id(run.run_id) is not None for run in (later_fleet_run, later_checks, pruned))


def test_a_relay_added_while_the_fleet_follows_is_followed_within_seconds(relay_env, second_outbox):
    # On disk, not in memory: the run's thread writes while this one reads, and an in-memory SQLite
    # answers a reader with "database table is locked" instead of waiting.
    with dg.instance_for_test() as instance:
        follow_a_relay_added_while_the_fleet_follows(instance, relay_env, second_outbox)


def follow_a_relay_added_while_the_fleet_follows(instance: dg.DagsterInstance, relay_env: dict, second_outbox: str) -> None:
    before = fleet_location([component("orders", "a", "order_paid", "orders_event_log")])
    outcome = {}
    running = threading.Thread(target=lambda: outcome.update(result=run_fleet(before, instance, quiet_seconds=60.0)))
    running.start()
    try:
        deadline = time.monotonic() + 60
        # Following: its op has tagged the run with the relays it follows, which is what the sensor compares.
        started = dg.RunsFilter(job_name="follow_outbox_fleet", statuses=[dg.DagsterRunStatus.STARTED])
        while not any(FLEET_RELAYS_TAG in run.tags for run in instance.get_runs(started)):
            assert time.monotonic() < deadline, "the fleet's run never started following"
            time.sleep(0.1)
        # The code location reloads with one more relay; its sensor finds the running fleet following the old set.
        after = fleet_location([component("orders", "a", "order_paid", "orders_event_log"), component("billing", "b", "invoice_sent", "billing_event_log")])
        publish_raw(second_outbox, 10, event_type="invoice_sent")
        sensor = after.resolve_sensor_def("outbox_pending_sensor")
        outboxes = {key: resource for key, resource in after.resources.items() if key.startswith("outbox")}
        asked_at = time.monotonic()
        with dg.build_sensor_context(instance=instance, definitions=after, resources=outboxes) as context:
            skipped = sensor(context)
        assert isinstance(skipped, dg.SkipReason) and "asked it to end" in skipped.skip_message
        running.join(timeout=60)
        assert time.monotonic() - asked_at < 15  # not the 60 s it would have followed on
    finally:
        running.join(timeout=120)
    ended = outcome["result"]
    assert ended.success
    assert ended.output_for_node("follow_fleet") and "billing" not in ended.output_for_node("follow_fleet")
    # The next tick starts a fleet's run that follows the new relay too.
    with dg.build_sensor_context(instance=instance, definitions=after, resources=outboxes) as context:
        request = sensor(context)
    assert isinstance(request, dg.RunRequest) and request.job_name == "follow_outbox_fleet"
    assert run_fleet(after, instance, follow_seconds=0).success
    assert delivery(relay_env["CLICKHOUSE_URL"], "billing_event_log")[:2] == (10, 10)


def test_one_lag_sensor_keeps_an_incident_per_relay(relay_env, second_outbox, recorder, monkeypatch):
    monkeypatch.setenv("OUTBOX_QUEUE_WARNING_SIZE", "5")
    monkeypatch.setenv("OUTBOX_QUEUE_ERROR_SIZE", "1000")
    defs = fleet_location([component("billing", "b", "invoice_sent", "billing_event_log")])
    publish_raw(second_outbox, 8, event_type="invoice_sent")  # billing falls behind; the default relay has nothing
    sensor = defs.resolve_sensor_def("outbox_lag_sensor")
    outboxes = {key: resource for key, resource in defs.resources.items() if key.startswith("outbox")}
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), definitions=defs, resources=outboxes) as context:
        result = sensor(context)
    states = json.loads(result.cursor)
    assert (states["default"]["level"], states["billing"]["level"]) == ("ok", "warning")
    [warning] = recorder.wait_for(lambda rec: errors(rec))
    assert (warning["tags"]["outbox.relay"], warning["level"]) == ("billing", "warning")
