"""EventLogStore loads the destination table it is given, named safely."""

from __future__ import annotations

import datetime as dt

import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.stores.event_columns import EVENT_COLUMNS
from outbox_pipeline.stores.event_log_store import DEFAULT_TABLE, EventLogStore

CSV_ROW = b'"5f0e8c1e-6a43-4c59-9a55-8f8d3c1b2a10","order_paid","2026-11-29 10:00:00.123456+00","test","{}","1"\n'


def tables(event_log: EventLogStore) -> set[tuple[str, str]]:
    rows = event_log.client.query("SELECT database, name FROM system.tables WHERE name LIKE '%event_log%'").result_rows
    return {(database, name) for database, name in rows}


@pytest.mark.parametrize(
    "table, database, name", [("orders_event_log", "default", "orders_event_log"), ("analytics.event_log", "analytics", "event_log")]
)
def test_every_statement_uses_the_configured_table(clickhouse_url, table, database, name):
    event_log = EventLogStore.connect(clickhouse_url, table=table)
    try:
        if database != "default":
            event_log.client.command(f"CREATE DATABASE {database}")
        event_log.migrate()
        event_log.migrate()
        assert tables(event_log) == {(database, name)}
        event_log.insert_csv(CSV_ROW, deduplication_token="t1")
        event_log.insert_csv(CSV_ROW, deduplication_token="t1")
        assert event_log.counts() == (1, 1)
        assert [row["event_type"] for row in event_log.rows_for(["5f0e8c1e-6a43-4c59-9a55-8f8d3c1b2a10"])] == ["order_paid"]
        assert event_log.present_event_ids(dt.date(2026, 11, 29), ["5f0e8c1e-6a43-4c59-9a55-8f8d3c1b2a10"]) == {
            "5f0e8c1e-6a43-4c59-9a55-8f8d3c1b2a10"
        }
        event_log.truncate()
        assert event_log.counts() == (0, 0)
    finally:
        event_log.close()


def test_the_default_table_is_event_log_with_the_shared_columns(clickhouse_url):
    assert DEFAULT_TABLE == "event_log"
    event_log = EventLogStore.connect(clickhouse_url)
    try:
        event_log.migrate()
        query = "SELECT name FROM system.columns WHERE table = 'event_log' ORDER BY position"
        columns = [row[0] for row in event_log.client.query(query).result_rows]
        assert tuple(columns[: len(EVENT_COLUMNS)]) == EVENT_COLUMNS
    finally:
        event_log.close()


@pytest.mark.parametrize("table", ["", "event log", "event_log; DROP TABLE x", "a.b.c", "`event_log`", "1table", "db."])
def test_a_table_name_that_is_not_a_plain_identifier_fails_in_one_line_before_connecting(table):
    with pytest.raises(ConfigurationError) as raised:
        EventLogStore.connect("chdb:///nonexistent/never-opened", table=table)
    message = str(raised.value)
    assert message.startswith(f"ClickHouse table name {table!r} is not valid") and "\n" not in message
