"""The outbox's daily partitions: making them ahead of time and dropping the delivered ones (schema version 6).

The work is done by two SECURITY DEFINER functions of the schema
(``sql/0006_partitioned_outbox.sql``), so a relay role that may not create or drop
tables can still keep the partitions; each takes its locks with a 100 ms timeout.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import psycopg

# Days made ahead of today: retention runs daily, so a week of missed runs still finds
# every day's partition there (a day without one goes to outbox_default, never refused).
DAYS_AHEAD = 7


@dataclasses.dataclass(frozen=True)
class PartitionOutcome:
    name: str
    ends: dt.datetime
    estimated_rows: int
    outcome: str  # "dropped", or "kept: <why>"

    @property
    def dropped(self) -> bool:
        return self.outcome == "dropped"

    @property
    def busy(self) -> bool:
        return self.outcome.startswith("kept: busy")


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    bounds: str
    estimated_rows: int
    total_bytes: int


def create_partitions(conn: psycopg.Connection, first_day: dt.date, last_day: dt.date) -> int:
    """Make the missing daily partitions of these UTC days; returns how many were made."""
    with conn.transaction():
        return conn.execute("SELECT outbox_create_partitions(%s, %s)", (first_day, last_day)).fetchone()[0]


def drop_delivered_partitions(conn: psycopg.Connection, older_than: dt.datetime) -> list[PartitionOutcome]:
    """Drop the partitions that end at or before ``older_than`` and hold nothing a relay still needs.

    One transaction: a partition found busy is rolled back alone, inside the function.
    """
    with conn.transaction():
        rows = conn.execute(
            "SELECT partition_name, ends, estimated_rows, outcome FROM outbox_drop_delivered_partitions(%s)", (older_than,)
        ).fetchall()
    return [PartitionOutcome(*row) for row in rows]


def list_partitions(conn: psycopg.Connection) -> list[Partition]:
    """The outbox's partitions with their bounds, estimated rows (as of the last ANALYZE) and size, oldest first."""
    rows = conn.execute(
        """
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = to_regclass('outbox')
        ORDER BY c.relname = 'outbox_default', c.relname <> 'outbox_legacy', c.relname
        """
    ).fetchall()
    return [Partition(*row) for row in rows]


def default_partition_holds_events(conn: psycopg.Connection) -> bool:
    """Whether events went to outbox_default: days nobody made a partition for in time."""
    return conn.execute("SELECT EXISTS (SELECT 1 FROM outbox_default)").fetchone()[0]
