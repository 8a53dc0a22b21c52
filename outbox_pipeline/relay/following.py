"""Following a steady stream: one long-lived relay run instead of a Dagster run every few seconds.

A run that has drained its backlog keeps relaying while events keep arriving:
every ``interval_seconds`` it looks for pending work (one read-only query) and,
when there is some, drains it through the very same claim / load / mark as every
other run, so the exactly-once guarantee and the lease takeover of a dead run
are unchanged. Between two looks it may let go of its destination (``on_pause``)
and take it back before the next drain (``ready``), as the embedded ClickHouse
requires when another process waits for it. It ends by itself once no event arrived for ``quiet_seconds``,
after ``follow_seconds`` in all, or when ``should_stop`` says so; the sensor
starts the next run when work is pending again.

Framework-free: the Dagster op ``follow_outbox`` turns the updates into sparse
log lines, one event_log materialization per window and the checks' evaluations.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

from outbox_pipeline.relay.delivery import BatchCallback, Relay, RunTotals

# A log line (an update) at most this often, whatever the window.
UPDATE_SECONDS = 60.0

ENDED_QUIET = "quiet"
ENDED_MAXIMUM = "maximum"


@dataclasses.dataclass(frozen=True)
class FollowLimits:
    follow_seconds: float
    quiet_seconds: float
    interval_seconds: float
    window_seconds: float

    @property
    def follows(self) -> bool:
        return self.follow_seconds > 0


@dataclasses.dataclass
class Period:
    """What the relay did between two moments (wall-clock times)."""

    started_at: float
    ended_at: float = 0.0
    drains: int = 0
    batches: int = 0
    events_loaded: int = 0
    events_rejected: int = 0

    def add(self, totals: RunTotals) -> None:
        self.drains += 1
        self.batches += totals.batches
        self.events_loaded += totals.events_loaded
        self.events_rejected += totals.events_rejected

    @property
    def seconds(self) -> float:
        return max(self.ended_at - self.started_at, 0.0)


@dataclasses.dataclass(frozen=True)
class FollowUpdate:
    since_last: Period  # since the previous update: one log line
    window: Period | None  # a closed materialization window (always set with the last update)
    ended: str | None  # why following ended; None while it goes on


class Follower:
    """Relays a stream until it goes quiet or a limit is reached; yields an update about once a minute."""

    def __init__(
        self,
        relay: Relay,
        limits: FollowLimits,
        *,
        should_stop: Callable[[], str | None] = lambda: None,
        ready: Callable[[], bool] = lambda: True,
        on_pause: Callable[[], None] = lambda: None,
        on_batch: BatchCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.relay = relay
        self.limits = limits
        self.should_stop = should_stop
        self.ready = ready
        self.on_pause = on_pause
        self.on_batch = on_batch
        self.clock = clock
        self.wall_clock = wall_clock
        self.sleep = sleep
        self.total = Period(wall_clock())
        # The materialization window still open: what a failed run reports before it ends.
        self.open_window = Period(wall_clock())

    def updates(self) -> Iterator[FollowUpdate]:
        limits = self.limits
        started = self.clock()
        deadline = started + limits.follow_seconds
        update_every = min(UPDATE_SECONDS, limits.window_seconds)
        last_event = last_update = window_opened = started
        since_last = Period(self.wall_clock())
        self.open_window = Period(self.wall_clock())
        ended: str | None = None
        while ended is None:
            tick = self.clock()
            ended = self._why_end(tick, deadline, last_event)
            if ended is None and self.relay.has_pending_work():
                if self.ready():
                    drained = self.relay.drain(deadline=deadline, on_batch=self.on_batch)
                    for period in (since_last, self.open_window, self.total):
                        period.add(drained)
                    if drained.batches:
                        last_event = self.clock()
                else:
                    last_event = self.clock()  # events wait for the destination: the stream is not quiet
            now = self.clock()
            if ended is None and now - last_update < update_every:
                self.on_pause()
                # Sleep to the next look, never past the moment following would end anyway.
                wake = min(tick + limits.interval_seconds, deadline, last_event + limits.quiet_seconds)
                self.sleep(max(0.0, wake - now))
                continue
            closes = ended is not None or now - window_opened >= limits.window_seconds
            yield self._update(since_last, self.open_window if closes else None, ended)
            since_last, last_update = Period(self.wall_clock()), now
            if closes:
                self.open_window, window_opened = Period(self.wall_clock()), now

    def _why_end(self, now: float, deadline: float, last_event: float) -> str | None:
        if now >= deadline:
            return ENDED_MAXIMUM
        if now - last_event >= self.limits.quiet_seconds:
            return ENDED_QUIET
        return self.should_stop()

    def close(self, period: Period) -> Period:
        period.ended_at = self.wall_clock()
        return period

    def _update(self, since_last: Period, window: Period | None, ended: str | None) -> FollowUpdate:
        self.close(since_last)
        if window is not None:
            self.close(window)
        if ended is not None:
            self.close(self.total)
        return FollowUpdate(since_last, window, ended)
