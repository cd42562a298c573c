"""The coordinator's time: a ``Clock`` it is given, never ``time.monotonic()`` read in place.

Deadlines (``deadlines.py``), secure aggregation's phase timeouts (``secagg.py``) and the open
round's saved clock (``open_round.py``) read the one clock of their coordinator. A server runs
on ``RealClock``; a test of the deadline policy runs the same coordinator on a ``FakeClock``
and moves it on by hand, so a round's deadline passes in a millisecond instead of seconds and a
test waits for nothing but the code under test. Transport clocks (gRPC long-polls, the upload
gate's idle and total limits, the relay) stay on the event loop's own clock: they bound real
sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable
from typing import Protocol


class Clock(Protocol):
    """What the round logic asks of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (a deadline is a value of it)."""

    def wall(self) -> float:
        """Seconds since the epoch: what a deadline is told to a client as."""

    async def wait(self, awaitable: Awaitable, timeout: float) -> bool:
        """Await ``awaitable`` for at most ``timeout`` seconds of this clock; False when the
        time ran out first (the awaitable is then cancelled)."""


class RealClock:
    """The host's clocks."""

    def monotonic(self) -> float:
        """The host's monotonic clock, in seconds."""
        return time.monotonic()

    def wall(self) -> float:
        """The host's wall clock (Unix seconds)."""
        return time.time()

    async def wait(self, awaitable: Awaitable, timeout: float) -> bool:
        """Wait for ``awaitable`` at most ``timeout`` seconds; True when it finished in time."""
        try:
            await asyncio.wait_for(awaitable, max(timeout, 0.0))
            return True
        except TimeoutError:
            return False


class FakeClock:
    """A clock that moves only when told to (``advance``), on one event loop: every wait whose
    time has come by then ends, in due order. Its wall clock is the monotonic one plus a fixed
    offset."""

    def __init__(self, start: float = 1000.0, epoch: float = 1.7e9):
        self.now = start
        self.epoch = epoch
        self._due: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        """The fake time: moved only by ``advance``."""
        return self.now

    def wall(self) -> float:
        """The fake time plus the fixed epoch offset."""
        return self.epoch + self.now

    async def wait(self, awaitable: Awaitable, timeout: float) -> bool:
        """Wait for ``awaitable`` until it finishes (True) or ``advance`` moves the fake time past
        ``timeout`` (False)."""
        timer = asyncio.get_running_loop().create_future()
        heapq.heappush(self._due, (self.now + max(timeout, 0.0), next(self._order), timer))
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            finished = task.done()
            if not finished:  # awaited once cancelled: a Condition's wait takes its lock back first
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if finished:
            task.result()
        return finished

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``; the waits due by then end (call it on the loop)."""
        self.now += seconds
        while self._due and self._due[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._due)
            if not timer.done():
                timer.set_result(None)
