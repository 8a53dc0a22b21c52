"""Exactly once holds whatever settings profile the relay's ClickHouse user has.

A server's users.xml can give the relay's user defaults that change what an insert keeps or what a
read returns: CSV parsing that skips a line or tolerates broken rows, inserts that are asynchronous or
never deduplicated, reads cut at a row limit. ClickHouse here is the test suite's chDB HTTP server
with such a profile on every query, shared by the test and the relay as a server would be; its faults
really drop the connections after the inserts ran, so the relay sends blocks a second time.
"""

import clickhouse_connect
import pytest

from outbox_pipeline.producer.demo_events import sample_events
from outbox_pipeline.stores.outbox_store import OutboxStore
from outbox_pipeline_tests.conftest import event_log_store, prepare_relay
from outbox_pipeline_tests.support.clickhouse_http_server import get_faults, running_clickhouse_http_server, set_faults
from outbox_pipeline_tests.support.relay_runs import run_relay
from outbox_pipeline_tests.support.typed_events import csv_of, expected_counts, publish_demo, typed_counts, typed_store

EVENTS = 2_000
BATCH = 500

# Each would lose, add or mangle events if the relay left it to the profile.
PROFILES = {
    "csv_parsing": {
        "input_format_csv_skip_first_lines": 1,  # the first event of every block
        "input_format_allow_errors_num": 1_000,  # a row that does not parse, skipped instead of rejected
        "input_format_allow_errors_ratio": 1,
        "input_format_csv_use_default_on_bad_values": 1,
        "input_format_csv_allow_variable_number_of_columns": 1,
        "format_csv_delimiter": ";",  # every row one broken column
        "format_csv_allow_double_quotes": 0,
        "date_time_input_format": "basic",  # the outbox's "+00" offsets unread
    },
    "inserts": {
        "insert_deduplicate": 0,
        "async_insert": 1,
        "wait_for_async_insert": 0,  # acknowledged before it is written
        "deduplicate_blocks_in_dependent_materialized_views": 0,
        "materialized_views_ignore_errors": 1,
    },
    "row_limits": {
        "limit": 1,  # every read cut at one row, the second send's lookup of what ClickHouse holds included
        "max_result_rows": 1,
        "result_overflow_mode": "break",
    },
}
PROFILES["all_at_once"] = {name: value for profile in PROFILES.values() for name, value in profile.items()}


@pytest.fixture(params=sorted(PROFILES))
def hostile(request, monkeypatch, tmp_path, outbox_database_url):
    with running_clickhouse_http_server(tmp_path / "clickhouse", profile=PROFILES[request.param]) as url:
        env = prepare_relay(monkeypatch, outbox_database_url, url, tmp_path / "state")
        with event_log_store(url) as event_log:
            # As in second_sends_tests: no token remembered, no merge to hide a copy; a block sent again
            # must ask ClickHouse which of its rows it holds.
            event_log.client.command("ALTER TABLE event_log MODIFY SETTING non_replicated_deduplication_window = 0")
            event_log.client.command("SYSTEM STOP MERGES event_log")
        yield env


@pytest.mark.parametrize("hostile", ["row_limits"], indirect=True)
def test_the_profile_cuts_a_plain_clients_reads_but_not_the_relays(hostile):
    plain = clickhouse_connect.get_client(dsn=hostile["CLICKHOUSE_URL"])
    try:
        assert plain.raw_query("SELECT number FROM system.numbers LIMIT 5").splitlines() == [b"0"]
    finally:
        plain.close()
    with event_log_store(hostile["CLICKHOUSE_URL"]) as event_log:
        assert len(event_log.client.raw_query("SELECT number FROM system.numbers LIMIT 5").splitlines()) == 5


def test_every_event_once_in_event_log_and_its_typed_table_through_second_sends(hostile):
    published = publish_demo(hostile["OUTBOX_DATABASE_URL"], EVENTS)
    # ClickHouse runs the first three inserts, then drops their connections: the relay cannot know they
    # landed and sends those blocks again, first asking ClickHouse which of their rows it holds.
    set_faults(hostile["CLICKHOUSE_URL"], reset_next_n=3, reset_after_execute=True, match=r"INSERT INTO .*event_log")

    result = run_relay(run_config={"batch_size": BATCH})

    assert result.success
    assert get_faults(hostile["CLICKHOUSE_URL"])["injected"]["reset"] == 3
    with event_log_store(hostile["CLICKHOUSE_URL"]) as event_log:
        assert event_log.counts() == (EVENTS, EVENTS)
        [(mangled,)] = event_log.client.query(
            "SELECT countIf(environment = '' OR toYear(event_date_time) < 2000) FROM event_log", settings={"limit": 0}
        ).result_rows
    assert mangled == 0
    assert typed_counts(hostile["CLICKHOUSE_URL"]) == expected_counts(published)
    outbox = OutboxStore.connect(hostile["OUTBOX_DATABASE_URL"])
    try:
        assert outbox.counts().processed == EVENTS
    finally:
        outbox.close()


@pytest.mark.parametrize("hostile", ["inserts"], indirect=True)
def test_a_typed_table_refusing_a_block_fails_the_insert_despite_materialized_views_ignore_errors(hostile):
    store = typed_store(hostile["CLICKHOUSE_URL"])
    try:
        store.migrate()
        store.client.command("ALTER TABLE order_paid ADD CONSTRAINT refuse CHECK order_id < 0")
        # The relay must hear of it and send the block again, or order_paid would miss rows that event_log holds.
        with pytest.raises(Exception, match="refuse"):
            store.insert_csv(csv_of(sample_events(100, seed=3)), deduplication_token="refused-block")
    finally:
        store.close()
