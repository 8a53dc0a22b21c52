"""Sending a block again without a second copy, whatever ClickHouse remembers of insert tokens.

A block of a batch may already be in ClickHouse when it is sent: the batch was retaken after
its lease expired (its first owner may have inserted it before dying), an earlier attempt's
outcome is unknown (the connection broke after ClickHouse executed the insert), or it is a
half of a block that was split. ClickHouse's own insert deduplication covers that only while
the table still holds the block's token: not with ``non_replicated_deduplication_window = 0``,
not once a replicated table passed ``replicated_deduplication_window`` blocks or
``replicated_deduplication_window_seconds``, not for a table recreated without the setting.

So a block sent again first asks ClickHouse which of its event_ids it holds (its time range
bounds the read; the table's bloom filter on event_id skips the rest) and sends only the
others. When it holds none, the block goes under its own token; otherwise under a token
derived from what is sent. Either way two senders that saw the same rows send under one
token, and ClickHouse, while it remembers the token, keeps one copy. Then the block's events
are made to appear once in the typed tables too (``EventLogStore.refresh_typed_events``). A
first send costs what it always did: nothing is looked up.

What is left: two senders of the same block at the same moment, where neither sees the
other's rows yet (a zombie whose insert is still in flight when the batch is taken over),
on a table that no longer remembers the token. Live runs renew their lease before every
send and retry and stop once the batch was taken over; the completeness check counts every
day's events, and a replay repairs a day.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from outbox_pipeline.stores.batches import BatchHandle
from outbox_pipeline.stores.event_log_store import LOOKUP_CHUNK, EventLogStore
from outbox_pipeline.stores.outbox_store import OutboxStore


def sent_before(handle: BatchHandle, start: int, stop: int) -> bool:
    """Whether rows start:stop may be in ClickHouse before this send: a retaken batch, or a block of a split one."""
    return handle.claim_count > 1 or (start, stop) != (0, handle.row_count)


def send_missing(
    outbox: OutboxStore,
    event_log: EventLogStore,
    handle: BatchHandle,
    start: int,
    stop: int,
    watch: Callable[[Iterator[bytes]], Iterator[bytes]] = lambda pieces: pieces,
) -> int:
    """Insert the rows of start:stop that ClickHouse does not hold; returns how many were sent."""
    keys = outbox.read_block_keys(handle, start, stop)
    if not keys:
        return 0
    present: set[str] = set()
    # A few thousand at a time, each bounded by its own time range.
    for first in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[first : first + LOOKUP_CHUNK]
        present |= event_log.present_event_ids_between([k[1] for k in chunk], min(k[2] for k in chunk), max(k[2] for k in chunk))
    held = sorted(outbox_id for outbox_id, event_id, _ in keys if event_id in present)
    sent = sorted(outbox_id for outbox_id, event_id, _ in keys if event_id not in present)
    if sent:
        token = handle.deduplication_token(start, stop)
        if held:
            token += "-again-" + hashlib.sha256(",".join(map(str, sent)).encode()).hexdigest()[:24]
        pieces = watch(outbox.stream_block_csv(handle, start, stop, without=held))
        try:
            event_log.insert_csv(pieces, deduplication_token=token)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
    # An earlier send may have stored rows in event_log and not in the typed tables (or the reverse):
    # the views never see a block again, so the block's events are compared with event_log by event_id.
    event_log.refresh_typed_events([k[1] for k in keys], min(k[2] for k in keys), max(k[2] for k in keys))
    return len(sent)
