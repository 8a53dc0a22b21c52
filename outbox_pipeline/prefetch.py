"""Reading the next batch out of PostgreSQL while the current one is inserted into ClickHouse.

A run claims its batches first and then loads them one after another. The two
stores are independent, so the COPY of batch k+1 (on a second connection, on a
worker thread) overlaps the ClickHouse insert of batch k. At most one batch is
read ahead, so memory stays bounded by two batches.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence

from outbox_pipeline.stores.outbox_store import BatchHandle, OutboxStore


class BatchPrefetcher:
    def __init__(self, outbox_url: str):
        self._url = outbox_url
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-prefetch")
        self._local = threading.local()
        self._stores: list[OutboxStore] = []
        self._order: list[int] = []
        self._handles: dict[int, BatchHandle] = {}
        self._reads: dict[int, concurrent.futures.Future] = {}

    def plan(self, handles: Sequence[BatchHandle]) -> None:
        """The batches this run will load, in order; starts reading the first."""
        for handle in handles:
            if handle.batch_id not in self._handles:
                self._order.append(handle.batch_id)
                self._handles[handle.batch_id] = handle
        if self._order:
            self._start(self._order[0])

    def take(self, handle: BatchHandle) -> bytes | None:
        """The batch's rows as CSV if they were read ahead; also starts reading the next batch."""
        position = self._order.index(handle.batch_id) if handle.batch_id in self._handles else -1
        if 0 <= position < len(self._order) - 1:
            self._start(self._order[position + 1])
        future = self._reads.pop(handle.batch_id, None)
        if future is None or self._handles.get(handle.batch_id) != handle:
            return None
        try:
            return future.result()
        except Exception:
            return None  # the caller reads it itself, with its retries and error reporting

    def _start(self, batch_id: int) -> None:
        handle = self._handles[batch_id]
        # Only a whole, never-split range batch is read ahead: that is the common case.
        if batch_id in self._reads or handle.split_points or handle.kind != "range":
            return
        self._reads[batch_id] = self._executor.submit(self._read, handle)

    def _read(self, handle: BatchHandle) -> bytes:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = OutboxStore.connect(self._url)
            self._stores.append(store)
        return store.read_block_csv(handle, 0, handle.row_count)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for store in self._stores:
            store.close()
