"""The relay itself: claim a batch, load it into ClickHouse, mark it processed.

Framework-free, so the Dagster ops, the low-latency loop, the command line and
the benchmark run exactly the same code.

Exactly once, in three steps:

1. *Claim* fixes the batch's membership in PostgreSQL (a key range, or a list of
   events due for a retry) before anything is inserted.
2. *Load* inserts the batch with a ClickHouse deduplication token derived from
   that membership. Whoever loads the batch again (a retry, a run that takes over
   an expired lease, a zombie) sends the same rows under the same token, and
   ClickHouse keeps one copy.
3. *Mark* flips one row: the batch is done. Events that ClickHouse rejected are
   recorded for a retry in the same transaction.

A rejected batch is bisected to isolate the bad events; each split is persisted
before its halves are inserted, so a retried run inserts the very same blocks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import psycopg

from outbox_pipeline.config.errors import LeaseLostError, OutboxPipelineError, one_line
from outbox_pipeline.config.settings import RelaySettings
from outbox_pipeline.relay.memory import return_large_buffers_to_the_system
from outbox_pipeline.relay.prefetch import BatchPrefetcher, InsertedAhead, ReadAhead
from outbox_pipeline.relay.retrying import BackoffPolicy, RetryCallback, RetryNotice, call_postgres_with_retries, call_with_retries
from outbox_pipeline.relay.second_sends import send_missing, sent_before
from outbox_pipeline.stores.batches import ends_backlog
from outbox_pipeline.stores.clickhouse_connection import ErrorKind, classify_clickhouse_error
from outbox_pipeline.stores.event_log_store import EventLogStore
from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxStore, RejectedEvent


class TooManyRejectedEventsError(OutboxPipelineError):
    """So many events of one batch were rejected that the cause is the table or server, not the events."""


@dataclasses.dataclass(frozen=True)
class RelayPolicy:
    batch_size: int = 100_000
    lease_seconds: float = 300.0
    max_event_attempts: int = 5
    event_retry_base_seconds: float = 30.0
    max_rejected_per_batch: int = 100
    retry: BackoffPolicy = BackoffPolicy()

    @classmethod
    def from_settings(cls, settings: RelaySettings, **overrides) -> RelayPolicy:
        values = {
            "batch_size": settings.batch_size,
            "lease_seconds": settings.lease_seconds,
            "max_event_attempts": settings.max_event_attempts,
            "event_retry_base_seconds": settings.event_retry_base_seconds,
            "retry": BackoffPolicy(settings.transient_retry_attempts, settings.transient_retry_base_seconds),
        }
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class LoadResult:
    batch_id: int
    kind: str
    row_count: int
    loaded_rows: int
    rejected: tuple[RejectedEvent, ...]
    inserts: int
    seconds: float
    lease_lost: bool = False
    # Wall-clock time (time.time()) when ClickHouse acknowledged the batch's last insert
    finished_at: float = 0.0


# What a run did ahead for a batch before its step loads it (see prefetch.py).
Ahead = InsertedAhead | ReadAhead | None

# Told of every batch a drain marked processed (the run's report counts them as they land).
BatchCallback = Callable[[LoadResult], None]
# Told of every batch a drain loaded, before it is marked (the run's report continues its events' traces).
LoadedCallback = Callable[[BatchHandle, LoadResult], None]


@dataclasses.dataclass
class RunTotals:
    batches: int = 0
    events_loaded: int = 0
    events_rejected: int = 0
    retries: int = 0
    seconds: float = 0.0

    def add(self, result: LoadResult) -> None:
        self.batches += 1
        self.events_loaded += result.loaded_rows
        self.events_rejected += len(result.rejected)


class Relay:
    def __init__(
        self,
        outbox: OutboxStore,
        event_log: EventLogStore | None,  # None for a relay that only claims and marks
        policy: RelayPolicy,
        *,
        claimed_by: str,
        on_retry: RetryCallback | None = None,
        prefetcher: BatchPrefetcher | None = None,
    ):
        self.outbox = outbox
        self.event_log = event_log
        self.policy = policy
        self.claimed_by = claimed_by
        self.retries = 0
        self._on_retry = on_retry
        self._prefetcher = prefetcher
        return_large_buffers_to_the_system()

    # -- the three steps ------------------------------------------------------------------

    def claim(self) -> BatchHandle | None:
        return self._postgres(
            "claiming a batch",
            lambda: self.outbox.claim_next_batch(
                claimed_by=self.claimed_by, batch_size=self.policy.batch_size, lease_seconds=self.policy.lease_seconds
            ),
        )

    def load(self, handle: BatchHandle) -> LoadResult:
        started = time.perf_counter()
        if not self._postgres("renewing the lease", lambda: self.outbox.renew_lease(handle, self.policy.lease_seconds)):
            return LoadResult(handle.batch_id, handle.kind, handle.row_count, 0, (), 0, 0.0, lease_lost=True)
        split_points = self._postgres("reading the batch's blocks", lambda: self.outbox.current_split_points(handle))
        bounds = [0, *[p for p in split_points if 0 < p < handle.row_count], handle.row_count]
        work = collections.deque(zip(bounds, bounds[1:]))
        ahead = self._prefetcher.take(handle) if self._prefetcher is not None else None
        try:
            result = self._load_blocks(handle, work, ahead, started)
        finally:
            if isinstance(ahead, ReadAhead):
                ahead.cancel()  # unused (a split batch): the reads behind it go on
        if self._prefetcher is not None:
            # Done with ClickHouse for this batch: the next one may be inserted ahead (not after a failure:
            # the run is ending, and the next step, if any, asks for its batch itself).
            self._prefetcher.done(handle)
        return result

    def _load_blocks(self, handle: BatchHandle, work: collections.deque, ahead: Ahead, started: float) -> LoadResult:
        rejected: list[RejectedEvent] = []
        inserts = 0
        while work:
            start, stop = work.popleft()
            if inserts and not self._postgres("renewing the lease", lambda: self.outbox.renew_lease(handle, self.policy.lease_seconds)):
                return LoadResult(handle.batch_id, handle.kind, handle.row_count, 0, (), inserts, time.perf_counter() - started, lease_lost=True)
            try:
                inserts += 1
                whole_batch = (start, stop) == (0, handle.row_count)
                self._insert_block(handle, start, stop, ahead if whole_batch else None)
            except LeaseLostError:
                return LoadResult(handle.batch_id, handle.kind, handle.row_count, 0, (), inserts, time.perf_counter() - started, lease_lost=True)
            except Exception as exc:
                if classify_clickhouse_error(exc) is not ErrorKind.REJECTED_DATA:
                    raise
                if stop - start > 1:
                    middle = (start + stop) // 2
                    self._postgres("recording a split", lambda: self.outbox.record_split(handle, middle))
                    work.extendleft([(middle, stop), (start, middle)])
                    continue
                [(outbox_id, event_id)] = self._postgres(
                    "identifying a rejected event", lambda: self.outbox.read_block_identities(handle, start, stop)
                )
                rejected.append(RejectedEvent(start, outbox_id, event_id, one_line(exc)))
                if len(rejected) > self.policy.max_rejected_per_batch:
                    raise TooManyRejectedEventsError(
                        f"ClickHouse rejected more than {self.policy.max_rejected_per_batch} events of batch {handle.batch_id} "
                        f"({one_line(exc)[:600]}); that points at the event_log table or the server, not the events: "
                        "fix it and rerun, every event is still pending"
                    ) from exc
        inserted_ahead = ahead.seconds if isinstance(ahead, InsertedAhead) else 0.0
        return LoadResult(
            handle.batch_id,
            handle.kind,
            handle.row_count,
            handle.row_count - len(rejected),
            tuple(rejected),
            inserts,
            time.perf_counter() - started + inserted_ahead,
            finished_at=time.time(),
        )

    def mark(self, result: LoadResult, handle: BatchHandle) -> bool:
        if result.lease_lost:
            return False
        return self._postgres(
            "marking the batch processed",
            lambda: self.outbox.complete_batch(
                handle,
                result.rejected,
                max_attempts=self.policy.max_event_attempts,
                retry_base_seconds=self.policy.event_retry_base_seconds,
            ),
        )

    def release(self, *handles: BatchHandle) -> None:
        self._postgres("releasing batches", lambda: self.outbox.release_batches(handles))

    def release_after_failure(self, *handles: BatchHandle) -> bool:
        """Give batches whose load failed back at once, not after their lease; False if that failed too."""
        try:
            self.release(*handles)
        except Exception:
            return False  # their leases free them
        return True

    def has_pending_work(self) -> bool:
        """Whether a claim would find something: one read-only query, retried like the others."""
        return self._postgres("looking for pending events", self.outbox.has_pending_work)

    # -- loops ------------------------------------------------------------------------------

    def drain(
        self,
        *,
        max_batches: int | None = None,
        deadline: float | None = None,
        on_batch: BatchCallback | None = None,
        on_loaded: LoadedCallback | None = None,
    ) -> RunTotals:
        """Claim, load and mark what is pending: until a claim finds no work or comes back short, or a limit is reached.

        A short batch is the tail of what was pending (``ends_backlog``): events
        committed while it was loaded are the next drain's.
        """
        totals = RunTotals()
        started = time.perf_counter()
        while max_batches is None or totals.batches < max_batches:
            if deadline is not None and time.monotonic() >= deadline:
                break
            handle = self.claim()
            if handle is None:
                break
            try:
                result = self.load(handle)
            except Exception:
                self.release_after_failure(handle)
                raise
            if on_loaded is not None and not result.lease_lost:
                on_loaded(handle, result)
            # A batch taken over by another run (our lease expired) is that run's to count.
            if self.mark(result, handle):
                totals.add(result)
                if on_batch is not None:
                    on_batch(result)
            if ends_backlog(handle, self.policy.batch_size):
                break
        totals.retries = self.retries
        totals.seconds = time.perf_counter() - started
        return totals

    # -- internals --------------------------------------------------------------------------

    def _insert_block(self, handle: BatchHandle, start: int, stop: int, ahead: Ahead = None) -> None:
        """Insert rows start:stop of the batch, streamed from PostgreSQL into ClickHouse.

        Each attempt sends the very same rows under the same token. The first attempt
        may have been made ahead (its outcome is taken as is) or may read a read-ahead;
        a retry streams a fresh COPY on the run's connection.
        """
        token = handle.deduplication_token(start, stop)
        firsts = [ahead] if ahead is not None else []
        source = _Source()
        # Only a first send goes blind; every other one sends what ClickHouse does not hold (second_sends.py).
        again = [sent_before(handle, start, stop)]
        attempts = [0]

        def attempt() -> None:
            source.failure = None
            first = firsts.pop() if firsts else None
            if isinstance(first, InsertedAhead):
                again[0] = True  # sent ahead: a retry may find its rows landed
                if first.error is not None:
                    raise first.error
                return
            if attempts[0] and not self._postgres("renewing the lease", lambda: self.outbox.renew_lease(handle, self.policy.lease_seconds)):
                # Taken over while this run waited to retry: the batch is another run's now, this one must not send.
                raise LeaseLostError(f"batch {handle.batch_id} was taken over by another run while this one waited to retry")
            attempts[0] += 1
            if again[0]:
                if isinstance(first, ReadAhead):
                    first.cancel()
                send_missing(self.outbox, self.event_log, handle, start, stop, source.watch)
                return
            again[0] = True  # whatever happens to this attempt, its rows may have landed
            pieces = first.pieces() if first is not None else self.outbox.stream_block_csv(handle, start, stop)
            with contextlib.closing(source.watch(pieces)) as watched:
                self.event_log.insert_csv(watched, deduplication_token=token)

        def before_retry(exc: BaseException) -> None:
            # A stream that broke on the run's own connection leaves it unusable: the retry reads on a new one.
            if isinstance(source.failure, psycopg.Error) and self.outbox.url is not None:
                self.outbox.reconnect()

        try:
            call_with_retries(
                "inserting into ClickHouse", attempt, self.policy.retry, on_retry=self._count_retry, before_retry=before_retry
            )
        finally:
            if isinstance(ahead, ReadAhead):
                ahead.cancel()

    def _postgres(self, what: str, fn):
        return call_postgres_with_retries(self.outbox, what, fn, self.policy.retry, on_retry=self._count_retry)

    def _with_retries(self, what: str, fn):
        return call_with_retries(what, fn, self.policy.retry, on_retry=self._count_retry)

    def _count_retry(self, notice: RetryNotice) -> None:
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(notice)


class _Source:
    """Remembers the error of the stream an insert consumed: the insert's own error may wrap or hide it."""

    failure: BaseException | None = None

    def watch(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from pieces
        except GeneratorExit:
            pieces.close()
            raise
        except BaseException as exc:
            self.failure = exc
            raise

