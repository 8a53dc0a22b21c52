"""Every statement the relay runs against its ClickHouse table (``event_log`` unless configured).

Engine choices, for time-range queries by event type and deduplication by event_id:

* ``ORDER BY (event_type, event_date_time, event_id)``: a query for one type over a
  time range reads one contiguous key range; the same event always has the same
  sorting key, so ReplacingMergeTree collapses copies of an event_id at merge time.
  That is a backstop only: exactly-once for a plain ``count()`` comes from the
  relay's deduplicated inserts.
* ``PARTITION BY toYYYYMM(event_date_time)``: few, large partitions; a batch of
  recent events lands in one part.
* ``non_replicated_deduplication_window``: a plain MergeTree forgets insert
  deduplication tokens unless told to keep them. 10,000 blocks covers days of
  one insert per second; replicated tables use ``replicated_deduplication_window``.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Sequence

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.stores.clickhouse_connection import close_clickhouse_client, known_settings, open_clickhouse_client
from outbox_pipeline.stores.event_columns import DEFAULT_TABLE, EVENT_COLUMNS
from outbox_pipeline.stores.typed_columns import typed_tables
from outbox_pipeline.stores.typed_tables import Refreshed, TypedTablesStore

DEDUPLICATION_WINDOW = 10_000
# event_ids per presence query: about 160 KiB of query text.
LOOKUP_CHUNK = 4_000
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_TABLE_NAME = re.compile(rf"({_IDENTIFIER})(?:\.({_IDENTIFIER}))?")


def quoted_table_name(table: str) -> str:
    """``table`` or ``database.table`` as a quoted ClickHouse identifier; anything else is refused.

    Only plain identifiers are accepted, so the name can never carry SQL, and the
    backquotes keep names that happen to be keywords working.
    """
    match = _TABLE_NAME.fullmatch(table) if isinstance(table, str) else None
    if match is None:
        raise ConfigurationError(
            f"ClickHouse table name {table!r} is not valid: use letters, digits and underscores "
            "(not starting with a digit), optionally as database.table"
        )
    return ".".join(f"`{part}`" for part in match.groups() if part is not None)


def create_table_sql(table: str = DEFAULT_TABLE) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {quoted_table_name(table)}
(
    event_id          UUID,
    event_type        LowCardinality(String),
    event_date_time   DateTime64(6, 'UTC'),
    environment       LowCardinality(String),
    event_context     String,
    metadata_version  UInt32 DEFAULT 1,
    -- when the relay's insert became visible: commit-to-ClickHouse lag is measured from it
    loaded_at         DateTime64(6, 'UTC') DEFAULT now64(6),
    INDEX event_id_bloom event_id TYPE bloom_filter(0.001) GRANULARITY 4,
    -- lets a relay run's duplicate check find what it just loaded without reading the whole column
    INDEX loaded_at_minmax loaded_at TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}
"""


# The outbox hands over CSV from PostgreSQL's COPY: timestamps as "2026-11-29 10:00:00.123456+00".
# Everything that decides what an insert keeps is set here, not left to the user's settings profile:
# a profile that skips a line or tolerates broken rows would lose events the relay then marks delivered.
_CSV_INSERT_SETTINGS = {
    "date_time_input_format": "best_effort",
    "format_csv_delimiter": ",",
    "format_csv_allow_double_quotes": 1,
    "format_csv_allow_single_quotes": 0,
    "input_format_csv_empty_as_default": 0,
    "input_format_csv_skip_first_lines": 0,
    "input_format_csv_detect_header": 0,
    "input_format_csv_allow_variable_number_of_columns": 0,
    "input_format_csv_use_default_on_bad_values": 0,
    "input_format_allow_errors_num": 0,
    "input_format_allow_errors_ratio": 0,
    "insert_deduplicate": 1,
    # The typed tables' views drop a repeated block too (typed_tables.py); set here, not left to a profile.
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    # A typed table's view that fails fails the insert, which is sent again: never a row missing there alone.
    "materialized_views_ignore_errors": 0,
    "async_insert": 0,
}


class EventLogStore:
    """``event_classes``: the registered event classes, whose typed tables (typed_tables.py) follow this table."""

    def __init__(self, client, url: str | None = None, *, table: str = DEFAULT_TABLE, event_classes: Sequence[type] = ()):
        self.client = client
        self.url = url
        self.table = table
        self._table_sql = quoted_table_name(table)
        self._insert_settings = known_settings(client, _CSV_INSERT_SETTINGS)
        self.typed = TypedTablesStore(client, typed_tables(event_classes, table))

    @classmethod
    def connect(
        cls, url: str, *, table: str = DEFAULT_TABLE, busy_wait_seconds: float = 0.0, event_classes: Sequence[type] = ()
    ) -> EventLogStore:
        quoted_table_name(table)  # a bad name fails before anything is opened, and so does a class without a mapping
        typed_tables(event_classes, table)
        return cls(open_clickhouse_client(url, busy_wait_seconds=busy_wait_seconds), url, table=table, event_classes=event_classes)

    def close(self) -> None:
        if self.url is not None:
            close_clickhouse_client(self.client, self.url)
        else:
            self.client.close()

    def migrate(self) -> None:
        # Asked first: a user with INSERT and SELECT on an existing table only may not run CREATE, even IF NOT EXISTS.
        if not int(self.client.command(f"EXISTS TABLE {self._table_sql}")):
            self.client.command(create_table_sql(self.table))
        self.typed.migrate()

    def insert_csv(self, csv_block: bytes | Iterable[bytes], *, deduplication_token: str) -> None:
        """Insert rows in EVENT_COLUMNS order; a retry with the same token and rows inserts nothing.

        ``csv_block`` is the CSV, or an iterable of its pieces: the insert streams them
        (HTTP: a chunked request body; chDB: the file it inserts from) without joining them.
        """
        if isinstance(csv_block, (bytes, bytearray)):
            if not csv_block:
                return
            # Handed over as a stream, never as bytes: the HTTP driver sends a bytes body again by itself when
            # the connection closes after the request, a blind second send. The relay decides on second sends.
            csv_block = iter((bytes(csv_block),))
        self.client.raw_insert(
            self._table_sql,
            list(EVENT_COLUMNS),
            csv_block,
            fmt="CSV",
            settings={**self._insert_settings, "insert_deduplication_token": deduplication_token},
        )

    def counts(self) -> tuple[int, int]:
        """(rows, distinct event_ids), both with a plain read: no FINAL."""
        rows, distinct = self.client.query(f"SELECT count(), uniqExact(event_id) FROM {self._table_sql}").result_rows[0]
        return int(rows), int(distinct)

    def counts_loaded_since(self, since: dt.datetime) -> tuple[int, int]:
        """(rows, distinct event_ids) over every copy of the events loaded at or after ``since``.

        Equal when none of those events is in the table twice, whenever its other
        copy was loaded. Both copies of an event share its event_date_time (part of
        the sorting key), so only the time range of the new rows is read, not the
        whole table: what a relay run can afford after every window it records.
        """
        rows, distinct = self.client.query(
            f"WITH recent AS (SELECT event_id, event_date_time FROM {self._table_sql} "
            "WHERE loaded_at >= toDateTime64({since:String}, 6, 'UTC')) "
            f"SELECT count(), uniqExact(event_id) FROM {self._table_sql} "
            "WHERE event_date_time >= (SELECT min(event_date_time) FROM recent) "
            "AND event_date_time <= (SELECT max(event_date_time) FROM recent) "
            "AND event_id IN (SELECT event_id FROM recent)",
            parameters={"since": since.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")},
        ).result_rows[0]
        return int(rows), int(distinct)

    def present_event_ids(self, day: dt.date, event_ids: list[str]) -> set[str]:
        """Which of these event_ids of one UTC day are in the table."""
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        return self.present_event_ids_between(event_ids, start, start + dt.timedelta(days=1), end_inclusive=False)

    def present_event_ids_between(
        self, event_ids: list[str], start: dt.datetime, end: dt.datetime, *, end_inclusive: bool = True
    ) -> set[str]:
        """Which of these event_ids, all with an event_date_time in [start, end], are in the table.

        The time range (the sorting key's second column) and the bloom filter on event_id keep
        the read to the granules that can hold them.
        """
        found: set[str] = set()
        # The ids go in the query body, not in URL parameters (thousands would pass URL limits), a few
        # thousand at a time: a query's text stays within the server's max_query_size (256 KiB by default).
        for first in range(0, len(event_ids), LOOKUP_CHUNK):
            found |= self._present(event_ids[first : first + LOOKUP_CHUNK], start, end, end_inclusive)
        return found

    def _present(self, event_ids: list[str], start: dt.datetime, end: dt.datetime, end_inclusive: bool) -> set[str]:
        id_list = ",".join(f"'{uuid.UUID(event_id)}'" for event_id in event_ids)
        result = self.client.query(
            f"SELECT DISTINCT toString(event_id) FROM {self._table_sql} "
            "WHERE event_date_time >= toDateTime64({start:String}, 6, 'UTC') "
            f"AND event_date_time {'<=' if end_inclusive else '<'} toDateTime64({{end:String}}, 6, 'UTC') "
            f"AND event_id IN ({id_list})",
            parameters={"start": _utc_text(start), "end": _utc_text(end)},
        )
        return {row[0] for row in result.result_rows}

    def distinct_per_day(
        self, since: dt.date, like_patterns: tuple[str, ...] = (), days: list[dt.date] | None = None
    ) -> dict[dt.date, int]:
        """Per UTC day of event_date_time from ``since`` on (only ``days``, if given): distinct event_ids of the
        types matching the LIKE patterns."""
        parameters: dict = {"since": since.isoformat()}
        type_filter = ""
        if days is not None:
            parameters["days"] = [day.isoformat() for day in days]
            type_filter += " AND toDate(event_date_time, 'UTC') IN {days:Array(Date)}"
        if like_patterns:
            parameters.update({f"p{n}": pattern for n, pattern in enumerate(like_patterns)})
            type_filter += " AND (" + " OR ".join(f"event_type LIKE {{p{n}:String}}" for n in range(len(like_patterns))) + ")"
        result = self.client.query(
            f"SELECT toDate(event_date_time, 'UTC') AS day, uniqExact(event_id) FROM {self._table_sql} "
            "WHERE event_date_time >= toDateTime64({since:String}, 6, 'UTC')" + type_filter + " GROUP BY day",
            parameters=parameters,
        )
        return {day: int(count) for day, count in result.result_rows}

    def rows_for(self, event_ids: list[str]) -> list[dict]:
        result = self.client.query(
            f"SELECT toString(event_id), event_type, event_date_time, environment, event_context, metadata_version "
            f"FROM {self._table_sql} WHERE event_id IN {{ids:Array(UUID)}}",
            parameters={"ids": event_ids},
        )
        return [dict(zip(EVENT_COLUMNS, row)) for row in result.result_rows]

    def refresh_typed_events(self, event_ids: list[str], start: dt.datetime, end: dt.datetime) -> list[Refreshed]:
        """After a second send: the typed tables hold each of these events once (see typed_tables.py)."""
        return self.typed.refresh_events(event_ids, start, end) if self.typed.tables and event_ids else []

    def refresh_typed_day(self, day: dt.date) -> list[Refreshed]:
        return self.typed.refresh_day(day)

    def truncate(self) -> None:
        self.client.command(f"TRUNCATE TABLE IF EXISTS {self._table_sql}")
        self.typed.truncate()


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
