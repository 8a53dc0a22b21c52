"""Reading and inserting a run's batches ahead of its Dagster steps, in bounded memory.

A run claims its batches first and then loads them one after another, several
per ``load_batch`` step. Every step costs Dagster some bookkeeping (events
written to its storage: tens of milliseconds each), during which the stores
would sit idle. So two worker threads work ahead, in batch order:

* the **reader** streams each batch out of PostgreSQL (COPY, on a connection of
  its own, in pieces of about 1 MiB) into a queue of a few pieces; the read of
  batch k+1 starts once batch k's rows have all been queued, and waits while its
  queue is full;
* the **inserter** (given ClickHouse) inserts each batch
  from that queue under the batch's deduplication token, exactly the insert the
  step would make, while the claims and Dagster's bookkeeping go on: at most a
  step's worth of batches beyond the last batch a step asked for (so a step's
  batches are inserted while the run still claims them), never past
  the run's time limit, and never while a step retries a failed insert itself (so
  one insert at a time goes to the connection). It never waits for a busy embedded
  ClickHouse directory (the step does, where an interrupt reaches it).

The ``load_batch`` step of batch k then finds its insert done (or failed: the
step takes that as its first attempt and goes on as usual: retries, bisection of
rejected events), and the next step marks the batch. Inserting a claimed batch early is the same
as inserting it late: the token names the batch's fixed rows, so a run that dies
meanwhile leaves batches that the next run inserts again under the same tokens,
and ClickHouse keeps one copy. Memory stays at a few pieces per batch in flight,
whatever the batch size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from outbox_pipeline.config.errors import StoreBusyError
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxStore

# Pieces of about 1 MiB the reader may hold per batch. An HTTP insert sends pieces as they come; chDB
# writes an insert's rows to a file before inserting them, so there the reader may hold a whole default
# batch (about 26 MiB at 100,000 events) and read it while the previous batch is being inserted.
STREAMED_INSERT_PIECES = 8
FILE_INSERT_PIECES = 32
_END = object()


class _Cancelled(Exception):
    """Raised inside the reader's COPY loop so that psycopg cancels the COPY."""


class ReadAhead:
    """One batch's CSV, read by the reader thread; consumed once with ``pieces()``, or cancelled."""

    def __init__(self, max_pieces: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pieces)
        self._cancelled = threading.Event()
        self._taken = False

    # -- the reader's side ---------------------------------------------------------------

    def fill(self, pieces: Iterator[bytes]) -> bool:
        """Read the pieces into the queue; False when reading failed (the consumer gets the error)."""
        try:
            for piece in pieces:
                self._put(piece)
        except _Cancelled:
            pieces.close()  # cancels the COPY: the connection stays usable for the next batch
            return True
        except BaseException as exc:
            self._put_final(exc)
            return False
        self._put_final(_END)
        return True

    def _put(self, item) -> None:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Cancelled

    def _put_final(self, item) -> None:
        try:
            self._put(item)
        except _Cancelled:
            pass

    # -- the consumer's side (an insert) ---------------------------------------------------

    def pieces(self) -> Iterator[bytes]:
        """The batch's CSV pieces; a failed read raises here, in the insert that consumes them."""
        if self._taken:
            raise RuntimeError("a read-ahead is consumed once")
        self._taken = True
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._cancelled.is_set():  # the run is closing: the insert that reads this stops
                    raise RuntimeError("reading the batch ahead was cancelled") from None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop reading (a no-op once fully consumed) and free what was buffered."""
        self._cancelled.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


@dataclasses.dataclass
class InsertedAhead:
    """The outcome of a batch's insert made ahead of its step: its first attempt."""

    error: BaseException | None
    seconds: float


class _Inserter:
    """The thread that inserts batches ahead, in order, one at a time (see the module's docstring)."""

    def __init__(
        self,
        prefetcher: BatchPrefetcher,
        event_log: Callable[[], EventLogStore],
        deadline: float,
        batches_ahead: int,
    ):
        self._prefetcher = prefetcher
        self._event_log = event_log
        self._deadline = deadline
        self._batches_ahead = batches_ahead
        self._condition = threading.Condition()
        self._taken = -1  # the last position whose step asked for its outcome
        self._failed: int | None = None  # a failed insert whose step may still use ClickHouse for it
        self._outcomes: dict[int, InsertedAhead | None] = {}  # position -> outcome (None: not inserted ahead)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="outbox-insert-ahead", daemon=True)
        self._thread.start()

    def outcome(self, position: int) -> InsertedAhead | None:
        """Wait until the batch at ``position`` was inserted ahead, or will not be (None)."""
        with self._condition:
            self._taken = max(self._taken, position)
            if self._failed is not None and self._failed < position:
                self._failed = None  # that step is over
            self._condition.notify_all()
            self._condition.wait_for(lambda: position in self._outcomes or self._closed)
            return self._outcomes.get(position)

    def done(self, position: int) -> None:
        """The step of ``position`` no longer uses ClickHouse."""
        with self._condition:
            if self._failed == position:
                self._failed = None
            self._condition.notify_all()

    def wake(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()

    def _may_insert(self, position: int) -> bool:
        # At most batches_ahead beyond the last one asked for, and never while a step retries
        # a failed insert itself: the connection serves one insert at a time.
        return position <= self._taken + self._batches_ahead and self._failed is None and self._prefetcher.planned(position)

    def _run(self) -> None:
        position = 0
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._closed or self._may_insert(position))
                if self._closed:
                    return
            handle, read = self._prefetcher.work_at(position)
            outcome = None
            if read is not None:
                if time.time() < self._deadline:
                    outcome = self._insert(handle, read)
                else:
                    read.cancel()  # past the run's time limit: its step releases the batch
            with self._condition:
                self._outcomes[position] = outcome
                if outcome is not None and outcome.error is not None:
                    self._failed = position
                self._condition.notify_all()
            position += 1

    def _insert(self, handle: BatchHandle, read: ReadAhead) -> InsertedAhead | None:
        started = time.perf_counter()
        try:
            try:
                event_log = self._event_log()
            except StoreBusyError:
                return None  # another process holds the embedded ClickHouse: the step waits for it itself
            event_log.insert_csv(read.pieces(), deduplication_token=handle.deduplication_token(0, handle.row_count))
        except Exception as exc:  # the step takes it as its first attempt
            return InsertedAhead(exc, time.perf_counter() - started)
        finally:
            read.cancel()  # a no-op once consumed; frees the reader otherwise
        return InsertedAhead(None, time.perf_counter() - started)


class BatchPrefetcher:
    def __init__(self, outbox_url: str, *, embedded_clickhouse: bool = False):
        """``embedded_clickhouse``: chDB, which writes each insert to a file first (so more is read ahead)."""
        self._url = outbox_url
        self._max_pieces = FILE_INSERT_PIECES if embedded_clickhouse else STREAMED_INSERT_PIECES
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-prefetch")
        self._local = threading.local()
        self._stores: list[OutboxStore] = []
        self._lock = threading.Lock()
        self._order: list[int] = []
        self._handles: dict[int, BatchHandle] = {}
        self._reads: dict[int, ReadAhead] = {}
        self._inserter: _Inserter | None = None

    def plan(self, handles: Sequence[BatchHandle]) -> None:
        """The batches this run will load, in order: reading them starts now, and inserting them once started."""
        with self._lock:
            for handle in handles:
                if handle.batch_id not in self._handles:
                    self._order.append(handle.batch_id)
                    self._handles[handle.batch_id] = handle
                    self._start_read(handle)
        if self._inserter is not None:
            self._inserter.wake()

    def start_inserting(self, insert_into: Callable[[], EventLogStore], *, deadline: float, batches_ahead: int) -> None:
        """Insert the planned batches into ClickHouse as they come, at most ``batches_ahead`` beyond the last taken."""
        if self._inserter is None:
            self._inserter = _Inserter(self, insert_into, deadline, batches_ahead)

    def take(self, handle: BatchHandle) -> InsertedAhead | ReadAhead | None:
        """What was done ahead for the batch: its insert's outcome, or its read-ahead, or nothing.

        The caller consumes a read-ahead (``pieces()``) or cancels it, and calls ``done``
        once it no longer uses ClickHouse for this batch.
        """
        position = self._position(handle)
        if position < 0:
            return None
        if self._inserter is not None:
            return self._inserter.outcome(position)
        with self._lock:
            # Earlier batches nobody took (released at the run's time limit) free the reads behind them.
            for earlier in self._order[:position]:
                skipped = self._reads.pop(earlier, None)
                if skipped is not None:
                    skipped.cancel()
            return self._reads.pop(handle.batch_id, None)

    def done(self, handle: BatchHandle) -> None:
        """The step of this batch no longer uses ClickHouse: the next batch may be inserted."""
        position = self._position(handle)
        if self._inserter is not None and position >= 0:
            self._inserter.done(position)

    def _position(self, handle: BatchHandle) -> int:
        with self._lock:
            if self._handles.get(handle.batch_id) != handle:
                return -1
            return self._order.index(handle.batch_id)

    # -- for the inserter ----------------------------------------------------------------

    def planned(self, position: int) -> bool:
        with self._lock:
            return position < len(self._order)

    def work_at(self, position: int) -> tuple[BatchHandle, ReadAhead | None]:
        with self._lock:
            batch_id = self._order[position]
            return self._handles[batch_id], self._reads.pop(batch_id, None)

    # -- the reader ----------------------------------------------------------------------

    def _start_read(self, handle: BatchHandle) -> None:
        # Only a whole, never-split range batch claimed for the first time is read ahead: the common case.
        # Any other may be in ClickHouse already, and its step sends only what is missing (second_sends.py).
        if handle.split_points or handle.kind != "range" or handle.claim_count > 1:
            return
        read = ReadAhead(self._max_pieces)
        self._reads[handle.batch_id] = read
        self._executor.submit(self._read, handle, read)

    def _read(self, handle: BatchHandle, read: ReadAhead) -> None:
        store = getattr(self._local, "store", None)
        try:
            if store is None:
                store = self._local.store = OutboxStore.connect(self._url)
                self._stores.append(store)
            pieces = store.stream_block_csv(handle, 0, handle.row_count)
        except BaseException as exc:  # reported by the insert that consumes this read
            pieces = _raising(exc)
        if not read.fill(pieces) and store is not None:
            # The connection may be what failed: the next batch's read opens a fresh one.
            self._local.store = None
            self._stores.remove(store)
            store.close()

    def close(self) -> None:
        with self._lock:
            reads = list(self._reads.values())
            self._reads.clear()
        for read in reads:
            read.cancel()
        if self._inserter is not None:
            self._inserter.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for store in self._stores:
            store.close()


def _raising(exc: BaseException) -> Iterator[bytes]:
    raise exc
    yield b""  # a generator
