"""Least-privilege PostgreSQL roles for the outbox: producers that can only add events, a relay with what it needs.

* **producer**: INSERT into ``outbox`` (and the ids' sequence) and nothing else. It can
  neither read the events of others nor change or delete any.
* **relay**: read ``outbox`` and delete from it (retention: dropping delivered partitions
  through the schema's two SECURITY DEFINER functions, deleting rows of ``outbox_default``), and keep its own bookkeeping
  (``outbox_relay_cursor``, ``outbox_batch``, ``outbox_failure``); read the schema version
  and the installation id. This covers the relay, replays, requeue, retention and the checks.
  Creating tables stays with the owner that runs ``outbox-pipeline init``.

Both are NOLOGIN group roles: grant them to your login users (``GRANT outbox_producer TO
orders_app``). ``outbox-pipeline init --roles`` creates them; ``outbox-pipeline grants`` prints
the statements for a DBA to run.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

PRODUCER_ROLE = "outbox_producer"
RELAY_ROLE = "outbox_relay"
RELAY_TABLES = ("outbox_relay_cursor", "outbox_batch", "outbox_failure")
RELAY_READS = ("outbox_installation", "outbox_schema_version", "outbox_partitioning")
PARTITION_FUNCTIONS = "outbox_create_partitions(date, date), outbox_drop_delivered_partitions(timestamptz)"


def grant_statements(conn: psycopg.Connection, producer: str = PRODUCER_ROLE, relay: str = RELAY_ROLE) -> list[str]:
    """The statements, as text, for the schema the connection sees the outbox in."""
    schema = conn.execute("SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass('outbox')").fetchone()
    if schema is None:
        raise psycopg.errors.UndefinedTable("the outbox tables do not exist: run `outbox-pipeline init` first")
    batch_sequence = conn.execute("SELECT pg_get_serial_sequence('outbox_batch', 'id')").fetchone()[0]

    def text(statement: sql.Composable) -> str:
        return statement.as_string(conn)

    p, r, s = sql.Identifier(producer), sql.Identifier(relay), sql.Identifier(schema[0])
    tables = sql.SQL(", ").join(sql.Identifier(t) for t in RELAY_TABLES)
    reads = sql.SQL(", ").join(sql.Identifier(t) for t in RELAY_READS)
    return [
        text(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, p, r)),
        text(sql.SQL("GRANT INSERT ON outbox TO {}").format(p)),
        text(sql.SQL("GRANT USAGE ON SEQUENCE outbox_id_seq TO {}").format(p)),
        text(sql.SQL("GRANT SELECT, DELETE ON outbox, outbox_default TO {}").format(r)),
        text(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(PARTITION_FUNCTIONS), r)),
        text(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(tables, r)),
        text(sql.SQL("GRANT SELECT ON {} TO {}").format(reads, r)),
        f"GRANT USAGE ON SEQUENCE {batch_sequence} TO {text(r)}",
    ]


def create_roles(conn: psycopg.Connection, producer: str = PRODUCER_ROLE, relay: str = RELAY_ROLE) -> list[str]:
    """Create both roles if missing and grant them their privileges; returns the statements run."""
    statements = []
    for role in (producer, relay):
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if not exists:
            statements.append(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)).as_string(conn))
    statements += grant_statements(conn, producer, relay)
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
    return statements
