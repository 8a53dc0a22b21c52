"""Typed tables beside a relay's table: created, evolved, repaired and counted (all of their SQL).

Each registered event class gets a table (``order_paid``) and a materialized view
(``order_paid_mv``) on the relay's table. ClickHouse runs the view inside the
relay's own insert, so a typed table is current the moment ``event_log`` is, with
no job of its own. The view takes the rows of its event type that parse into the
class's columns (see typed_columns.py); the others stay in ``event_log`` only and
are counted by ``parse_failures``.

Exactly once. A block sent again under its token is pushed to the views even
though ``event_log`` drops it; each typed table drops it in turn under a token
derived from the block's (``deduplicate_blocks_in_dependent_materialized_views``,
set by every insert of the relay, and the table's own deduplication window). Second
sends insert only what ``event_log`` lacks, so ordinary retries add nothing. What the view cannot see: an insert that stored the
block in ``event_log`` but failed (or was killed) before the typed table got it,
or the reverse, and a replay that puts back rows the typed table kept. So:

* typed tables are ReplacingMergeTree ordered by ``(event_date_time, event_id)``;
* ``refresh`` compares a range of a typed table with ``event_log`` by event_id,
  inserts what is missing and, when an event_id is there twice, merges the range's
  partitions (``OPTIMIZE … FINAL``), so ``count()`` holds each event once;
* the relay refreshes the event_ids of every block it sends a second time, and a
  replay refreshes its whole day.

Schema evolution. ``migrate`` compares each table with ``system.columns``: a new
field that is Optional or has a default is added (older rows read NULL or the
default) and the view's query replaced in place; a changed type or a removed
required field stops with one line saying what to do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.stores.typed_columns import TypedTable

_NO_DEDUPLICATION = {"insert_deduplicate": 0}
# As event_log's. ClickHouse pushes a block to the views even when event_log drops it as a repeat, and the
# typed table drops it in turn under a token derived from the block's (deduplicate_blocks_in_dependent_
# materialized_views, which every insert of the relay sets): only a table that keeps tokens can.
DEDUPLICATION_WINDOW = 10_000
# event_ids per refresh: the list appears twice in its INSERT, about 160 KiB of query text in all
# (within the server's max_query_size, 256 KiB by default).
LOOKUP_CHUNK = 2_000


def _quoted(name: str) -> str:
    return ".".join(f"`{part}`" for part in name.split("."))


def create_typed_table_sql(table: TypedTable) -> str:
    columns = ",\n    ".join(f"`{name}` {clickhouse_type}" for name, clickhouse_type in table.all_columns)
    return f"""
CREATE TABLE IF NOT EXISTS {_quoted(table.name)}
(
    {columns},
    INDEX event_id_bloom event_id TYPE bloom_filter(0.001) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}
COMMENT 'Typed {table.event_type} events ({table.class_name}) from {table.source}, fed by {table.view_name}'
"""


def create_view_sql(table: TypedTable) -> str:
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {_quoted(table.view_name)} TO {_quoted(table.name)} "
        f"AS {table.select_sql(_quoted(table.source))} COMMENT '{table.fingerprint}'"
    )


@dataclasses.dataclass(frozen=True)
class Refreshed:
    table: str
    inserted: int  # event_ids the typed table lacked
    duplicates_removed: int  # extra copies merged away


@dataclasses.dataclass(frozen=True)
class ParseCounts:
    table: str
    event_type: str
    source_rows: int  # distinct events of the type in the relay's table
    failures: int  # of those, events that do not parse into the class's columns
    example_event_id: str | None
    typed_rows: int
    typed_distinct: int

    @property
    def missing(self) -> int:
        return max(self.source_rows - self.failures - self.typed_distinct, 0)


class TypedTablesStore:
    def __init__(self, client, tables: tuple[TypedTable, ...]):
        self.client = client
        self.tables = tables

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> None:
        for table in self.tables:
            self._migrate(table)

    def _exists(self, name: str) -> bool:
        return bool(int(self.client.command(f"EXISTS TABLE {_quoted(name)}")))

    def _migrate(self, table: TypedTable) -> None:
        created = not self._exists(table.name)
        if created:
            self.client.command(create_typed_table_sql(table))
        else:
            self._evolve(table)
        if not self._exists(table.view_name):
            self.client.command(create_view_sql(table))
            created = True
        elif self._view_comment(table) != table.fingerprint:
            # Replaced in place: no insert passes between an old view and a new one.
            self.client.command(f"ALTER TABLE {_quoted(table.view_name)} MODIFY QUERY {table.select_sql(_quoted(table.source))}")
            self.client.command(f"ALTER TABLE {_quoted(table.view_name)} MODIFY COMMENT '{table.fingerprint}'")
        if created and self._source_holds(table):
            # The events that reached the relay's table before the table or its view existed.
            self.refresh(table, "1")

    def _source_holds(self, table: TypedTable) -> bool:
        # event_type leads event_log's sorting key: a short read, and no statement at all to fill an empty table.
        return bool(int(self.client.command(
            f"SELECT count() > 0 FROM {_quoted(table.source)} WHERE event_type = {{event_type:String}}",
            parameters={"event_type": table.event_type},
        )))

    def _view_comment(self, table: TypedTable) -> str:
        database, name = self._database_and_name(table.view_name)
        rows = self.client.query(
            "SELECT comment FROM system.tables WHERE database = {database:String} AND name = {name:String}",
            parameters={"database": database, "name": name},
        ).result_rows
        return rows[0][0] if rows else ""

    def _database_and_name(self, name: str) -> tuple[str, str]:
        database, _, table = name.rpartition(".")
        return database or self.client.command("SELECT currentDatabase()"), table

    def existing_columns(self, name: str) -> dict[str, str]:
        database, table = self._database_and_name(name)
        result = self.client.query(
            "SELECT name, type FROM system.columns WHERE database = {database:String} AND table = {table:String} ORDER BY position",
            parameters={"database": database, "table": table},
        )
        return dict(result.result_rows)

    def _evolve(self, table: TypedTable) -> None:
        existing = self.existing_columns(table.name)
        wanted = dict(table.all_columns)
        problems, added = [], []
        for column in table.columns:
            current = existing.get(column.name)
            if current is None:
                if column.default_sql is None:
                    problems.append(f"new field {column.name} is required, and the events already stored lack it (make it Optional or give it a default)")
                else:
                    added.append(column)
            elif current != column.clickhouse_type:
                problems.append(f"{column.name} is {current} in ClickHouse but the class now maps it to {column.clickhouse_type}")
        for name, current in existing.items():
            if name not in wanted and not current.startswith("Nullable("):
                problems.append(f"column {name} ({current}) is no longer a field of the class")
        if problems:
            raise ConfigurationError(
                f"typed table {table.name} no longer matches {table.class_name} (event type {table.event_type}): "
                + "; ".join(problems)
                + f". Publish the changed class under a new event_type (set event_type = '{table.event_type}_v2'), "
                f"or drop the typed table to rebuild it from {table.source}: DROP TABLE {table.view_name}; DROP TABLE {table.name}"
            )
        for column in added:
            self.client.command(
                f"ALTER TABLE {_quoted(table.name)} ADD COLUMN IF NOT EXISTS `{column.name}` {column.clickhouse_type} DEFAULT {column.default_sql}"
            )

    # -- repair -----------------------------------------------------------------------------

    def refresh(self, table: TypedTable, where: str, parameters: dict | None = None) -> Refreshed:
        """Make the rows of ``where`` (a condition on the envelope columns) hold each parsing event of the range once."""
        parameters = parameters or {}
        typed = _quoted(table.name)
        before = self._distinct(typed, where, parameters)
        columns = ", ".join(f"`{name}`" for name, _ in table.all_columns)
        missing = f"({where}) AND event_id NOT IN (SELECT event_id FROM {typed} WHERE {where})"
        self.client.command(
            f"INSERT INTO {typed} ({columns}) {table.select_sql(_quoted(table.source), missing)}",
            parameters=parameters, settings=_NO_DEDUPLICATION,
        )
        rows, distinct = self._counts(typed, where, parameters)
        removed = rows - distinct
        if removed:
            months = self.client.query(
                f"SELECT DISTINCT _partition_id FROM {typed} WHERE {where}", parameters=parameters
            ).result_rows
            for (month,) in months:
                self.client.command(f"OPTIMIZE TABLE {typed} PARTITION ID '{month}' FINAL")
        return Refreshed(table.name, distinct - before, removed)

    def _counts(self, typed: str, where: str, parameters: dict) -> tuple[int, int]:
        rows, distinct = self.client.query(f"SELECT count(), uniqExact(event_id) FROM {typed} WHERE {where}", parameters=parameters).result_rows[0]
        return int(rows), int(distinct)

    def _distinct(self, typed: str, where: str, parameters: dict) -> int:
        return self._counts(typed, where, parameters)[1]

    def refresh_events(self, event_ids: list[str], start: dt.datetime, end: dt.datetime) -> list[Refreshed]:
        """Refresh these event_ids (all with an event_date_time in [start, end]) in every typed table."""
        parameters = {"start": _utc_text(start), "end": _utc_text(end)}
        done: list[Refreshed] = []
        # The ids go in the query body a few thousand at a time, as event_log's presence queries do.
        for first in range(0, len(event_ids), LOOKUP_CHUNK):
            id_list = ",".join(f"'{uuid.UUID(str(event_id))}'" for event_id in event_ids[first : first + LOOKUP_CHUNK])
            where = (
                "event_date_time >= toDateTime64({start:String}, 6, 'UTC') "
                f"AND event_date_time <= toDateTime64({{end:String}}, 6, 'UTC') AND event_id IN ({id_list})"
            )
            done += [self.refresh(table, where, parameters) for table in self.tables]
        return done

    def refresh_day(self, day: dt.date) -> list[Refreshed]:
        """Refresh one UTC day of event_date_time in every typed table (a replay of the day)."""
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        where = "event_date_time >= toDateTime64({start:String}, 6, 'UTC') AND event_date_time < toDateTime64({end:String}, 6, 'UTC')"
        parameters = {"start": _utc_text(start), "end": _utc_text(start + dt.timedelta(days=1))}
        return [self.refresh(table, where, parameters) for table in self.tables]

    # -- counts -----------------------------------------------------------------------------

    def parse_counts(self, table: TypedTable) -> ParseCounts:
        """How many events of the type the relay's table holds, how many do not parse (one example), and the typed rows."""
        parses = f"({table.parses_sql})"
        source_rows, failures, example = self.client.query(
            f"SELECT uniqExact(event_id), uniqExactIf(event_id, NOT {parses}), toString(anyIf(event_id, NOT {parses})) "
            f"FROM {table.rows_sql(_quoted(table.source))}"
        ).result_rows[0]
        typed_rows, typed_distinct = self._counts(_quoted(table.name), "1", {})
        return ParseCounts(
            table.name, table.event_type, int(source_rows), int(failures), example if int(failures) else None,
            typed_rows, typed_distinct,
        )

    def truncate(self) -> None:
        for table in self.tables:
            self.client.command(f"TRUNCATE TABLE IF EXISTS {_quoted(table.name)}")


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
