"""Following many relays in one process: one resident run for a fleet, not one per relay.

A following run per relay costs a run slot and a resident process each (about 140 MB,
410 MB with chDB), and run limits make the fifth or eleventh relay wait behind the others.
A fleet follows every member relay in a thread of its own instead. Each member keeps what a
run of its own would have: its connections, its claims under the run's id, its cursor,
batches and failures in the outbox, its ClickHouse table. Nothing is shared but the process.

* **Quiet** is the fleet's: it ends once no member delivered an event for ``quiet_seconds``
  (or at ``follow_seconds``, or when ``should_stop`` says so), so a quiet member never
  makes its events wait for the next run while the others stream.
* **Failures stay with their member.** A member whose outbox or table fails is reported
  (``on_failure``) and started again after a backoff, up to ``MAX_BACKOFF_SECONDS``; the
  others keep delivering. Its pending work keeps the fleet from ending quiet, so a broken
  relay does not turn into a run start every minute.

Framework-free: the Dagster op ``follow_fleet`` builds the members and turns what they
yield into log lines and each relay's asset events, on the op's own thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from outbox_pipeline.relay.following import ENDED_MAXIMUM, ENDED_QUIET

MAX_BACKOFF_SECONDS = 300.0
ENDED_STOPPED = "stopped"
# How often the coordinator looks at the clock and ``should_stop`` while no member speaks.
TICK_SECONDS = 0.5
_NOTHING = object()


@dataclasses.dataclass(frozen=True)
class FleetMember:
    """One relay of the fleet.

    ``follow(stop, touch)`` relays until ``stop`` is set or its own deadline, yielding what the
    coordinator should hand on (log lines, asset events); it calls ``touch()`` whenever it
    delivered events, which keeps the fleet from going quiet.
    """

    name: str
    follow: Callable[[threading.Event, Callable[[], None]], Iterator[Any]]


@dataclasses.dataclass(frozen=True)
class FleetMessage:
    member: str
    item: Any = None  # something the member yielded
    error: BaseException | None = None  # the member failed; it starts again after ``retry_in`` seconds
    failures: int = 0  # consecutive failures of the member
    retry_in: float = 0.0


class Fleet:
    """Runs the members' ``follow`` in threads and yields their messages on the caller's thread."""

    def __init__(
        self,
        members: Sequence[FleetMember],
        *,
        follow_seconds: float,
        quiet_seconds: float,
        retry_base_seconds: float,
        should_stop: Callable[[], str | None] = lambda: None,
        stop_check_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        names = [member.name for member in members]
        if len(set(names)) != len(names):
            raise ValueError(f"fleet members must have distinct names, got {names}")
        self.members = list(members)
        self.follow_seconds = follow_seconds
        self.quiet_seconds = quiet_seconds
        self.retry_base_seconds = retry_base_seconds
        self.should_stop = should_stop
        self.stop_check_seconds = stop_check_seconds
        self.clock = clock
        self.stop = threading.Event()
        self.ended: str | None = None
        self._messages: queue.Queue[FleetMessage | None] = queue.Queue()
        self._last_activity = clock()

    def touch(self) -> None:
        """A member delivered (or has work it could not deliver): the fleet is not quiet."""
        self._last_activity = self.clock()

    def messages(self) -> Iterator[FleetMessage]:
        """Every member's messages until the fleet ends; returns once every member's thread has stopped."""
        started = self.clock()
        deadline = started + self.follow_seconds
        self._last_activity = started
        threads = [
            threading.Thread(target=self._run_member, args=(member,), name=f"fleet-{member.name}", daemon=True)
            for member in self.members
        ]
        for thread in threads:
            thread.start()
        running = len(threads)
        next_stop_check = started
        try:
            while running:
                try:
                    message = self._messages.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    message = _NOTHING  # only look at the clock
                if message is None:
                    running -= 1  # a member's thread has ended
                elif isinstance(message, FleetMessage):
                    yield message
                now = self.clock()
                if self.ended is None:
                    self.ended = self._why_end(now, deadline, next_stop_check <= now)
                    if next_stop_check <= now:
                        next_stop_check = now + self.stop_check_seconds
                    if self.ended is not None:
                        self.stop.set()
        finally:
            # A failing consumer (or a closed generator) still stops every member before the op ends.
            self.stop.set()
            for thread in threads:
                thread.join()

    def _why_end(self, now: float, deadline: float, check_stop: bool) -> str | None:
        if now >= deadline:
            return ENDED_MAXIMUM
        if now - self._last_activity >= self.quiet_seconds:
            return ENDED_QUIET
        return self.should_stop() if check_stop else None

    def _wait_to_start_again(self, seconds: float) -> None:
        """A member's backoff (real time, however long): its events still wait, so it keeps the fleet from ending quiet."""
        end = time.monotonic() + seconds
        while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
            self.touch()
            self.stop.wait(min(left, TICK_SECONDS))

    def _run_member(self, member: FleetMember) -> None:
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    for item in member.follow(self.stop, self.touch):
                        failures = 0
                        self._messages.put(FleetMessage(member.name, item=item))
                    return  # stopped, or its deadline
                except Exception as exc:
                    failures += 1
                    self.touch()  # its events wait: the fleet must not end quiet and restart every minute
                    retry_in = min(MAX_BACKOFF_SECONDS, self.retry_base_seconds * 2 ** (failures - 1))
                    self._messages.put(FleetMessage(member.name, error=exc, failures=failures, retry_in=retry_in))
                    self._wait_to_start_again(retry_in)
        finally:
            self._messages.put(None)
