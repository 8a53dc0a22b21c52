"""Reading a claimed batch's rows out of the outbox with COPY, as ClickHouse's CSV input.

The rows of a batch are its key range, filtered by the relay's event types; a block is a
slice of that range by position, as bisection splits it.
"""

from __future__ import annotations

import datetime as dt
import select
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import pq

from outbox_pipeline.stores.batches import BatchHandle
from outbox_pipeline.stores.event_columns import EVENT_COLUMNS

SELECT_EVENT_COLUMNS = ", ".join(f"o.{column}" for column in EVENT_COLUMNS)
# FORCE_QUOTE keeps leading/trailing blanks and empty strings exact through ClickHouse's CSV parser.
COPY_CSV = "TO STDOUT (FORMAT csv, FORCE_QUOTE *)"

def _batch_rows_query(handle: BatchHandle, columns: str, start: int, stop: int) -> tuple[str, tuple]:
    if handle.kind == "range":
        filtered = bool(handle.event_type_patterns)
        query = f"""
            SELECT {columns} FROM outbox o
            WHERE (o.txid, o.id) >= (%s::xid8, %s) AND (o.txid, o.id) <= (%s::xid8, %s)
            {"AND o.event_type LIKE ANY (%s)" if filtered else ""}
            ORDER BY o.txid, o.id OFFSET %s LIMIT %s
        """
        patterns = (list(handle.event_type_patterns),) if filtered else ()
        return query, (*handle.first_key, *handle.last_key, *patterns, start, stop - start)
    query = f"""
        SELECT {columns} FROM outbox o JOIN outbox_failure f ON f.outbox_id = o.id
        WHERE f.batch_id = %s ORDER BY o.id OFFSET %s LIMIT %s
    """
    return query, (handle.batch_id, start, stop - start)


def copy_csv(conn: psycopg.Connection, query: str, params) -> bytearray:
    """The rows of ``query`` as CSV in event_log column order, straight from COPY."""
    buffer = bytearray()
    with conn.cursor() as cur, cur.copy(f"COPY ({query}) {COPY_CSV}", params) as copy:
        for chunk in _copy_rows(conn.pgconn, copy):
            buffer += chunk
    return buffer  # not copied into bytes: a batch can be tens of megabytes


# COPY hands over pieces of a few kilobytes; a stream passes them on in pieces of about this size.
STREAM_CHUNK_BYTES = 1 << 20


def stream_csv(conn: psycopg.Connection, query: str, params, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The rows of ``query`` as CSV pieces, read from COPY as they are consumed: memory stays at one piece.

    Closing the generator before its end cancels the COPY, which leaves the connection usable.
    """
    chunk_bytes = chunk_bytes or STREAM_CHUNK_BYTES
    with conn.cursor() as cur, cur.copy(f"COPY ({query}) {COPY_CSV}", params) as copy:
        # Joined once per piece: a buffer grown chunk by chunk would leave the heap fragmented.
        # Each row is held as bytes, not as the memoryview libpq's copy comes in: a memoryview is
        # tracked by the garbage collector, and thousands held per piece set off collections of
        # the whole heap. In a run worker (Dagster's objects) that tripled the reader's CPU.
        chunks: list[bytes] = []
        size = 0
        for chunk in _copy_rows(conn.pgconn, copy):
            chunks.append(bytes(chunk))
            size += len(chunk)
            if size >= chunk_bytes:
                yield b"".join(chunks)
                chunks, size = [], 0
        if chunks:
            yield b"".join(chunks)


def _copy_rows(pgconn: pq.abc.PGconn, copy: psycopg.Copy) -> Iterator[memoryview]:
    """The rows of a running COPY TO, as ``Copy.read()`` returns them, at about two thirds of its CPU.

    libpq hands over one row per call. ``Copy.read()`` runs a generator and a wait for every
    row, which was most of a batch's read time; rows libpq has already received are taken
    from it directly, and ``Copy.read()`` is left to wait for the network (and to finish the
    COPY when the end arrives then). Cancelling (closing the generator) stays ``Copy``'s.
    """
    while True:
        nbytes, data = pgconn.get_copy_data(1)  # 1: returns at once, 0 when no whole row is buffered
        if nbytes > 0:
            yield data
        elif nbytes == 0:
            data = copy.read()
            if not data:
                return
            yield data
        else:  # the end was already buffered: its result is ours to collect
            _finish_copy_out(pgconn)
            return


def _finish_copy_out(pgconn: pq.abc.PGconn) -> None:
    """Collect a COPY TO's results once its data has ended, raising the server's error if it failed.

    Every result is read before raising: only then is the connection free for the next statement.
    """
    error: psycopg.Error | None = None
    while True:
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [])  # waits with the GIL released
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            message = (result.error_message or b"").decode(errors="replace").strip()
            try:
                error = psycopg.errors.lookup(sqlstate)(message)
            except KeyError:
                error = psycopg.DatabaseError(message)
    if error is not None:
        raise error


def read_block_csv(conn: psycopg.Connection, handle: BatchHandle, start: int, stop: int) -> bytearray:
    """Rows ``start:stop`` of the batch as CSV in event_log column order."""
    return copy_csv(conn, *_batch_rows_query(handle, SELECT_EVENT_COLUMNS, start, stop))


def stream_block_csv(
    conn: psycopg.Connection, handle: BatchHandle, start: int, stop: int, without: Sequence[int] = ()
) -> Iterator[bytes]:
    """``read_block_csv`` as a stream of pieces (see ``stream_csv``): the same bytes, never all in memory.

    ``without``: outbox ids of the block's rows to leave out (those ClickHouse holds already).
    """
    if not without:
        return stream_csv(conn, *_batch_rows_query(handle, SELECT_EVENT_COLUMNS, start, stop))
    inner, params = _batch_rows_query(handle, f"{SELECT_EVENT_COLUMNS}, o.id AS block_row_id", start, stop)
    query = f"SELECT {', '.join(EVENT_COLUMNS)} FROM ({inner}) block WHERE block_row_id <> ALL(%s)"
    return stream_csv(conn, query, (*params, list(without)))


def read_block_keys(conn: psycopg.Connection, handle: BatchHandle, start: int, stop: int) -> list[tuple[int, str, dt.datetime]]:
    """(outbox id, event_id, event_date_time) of rows ``start:stop``: what a second send looks up in ClickHouse."""
    query, params = _batch_rows_query(handle, "o.id, o.event_id::text, o.event_date_time", start, stop)
    return [(r[0], r[1], r[2]) for r in conn.execute(query, params).fetchall()]


def read_block_identities(conn: psycopg.Connection, handle: BatchHandle, start: int, stop: int) -> list[tuple[int, str]]:
    query, params = _batch_rows_query(handle, "o.id, o.event_id::text", start, stop)
    return [(r[0], r[1]) for r in conn.execute(query, params).fetchall()]


