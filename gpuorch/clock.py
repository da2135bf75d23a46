"""The one clock of both daemons.

Every decision that depends on time (liveness deadlines, restart backoff, hang detection,
telemetry ages) reads it through a `Clock`, so that tests and the trace simulator can run the
production code on a fake one. Benchmarks time themselves with `time.perf_counter` directly.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall time (seconds since the epoch, for what is stored or shown) and monotonic time
    (seconds from an arbitrary origin, for deadlines and durations)."""

    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to: for tests and the simulator.

    Wall and monotonic time advance together, so a deadline computed from one and a stamp
    computed from the other stay consistent.
    """

    def __init__(self, wall: float = 1_800_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        self._wall += seconds
        self._monotonic += seconds


SYSTEM_CLOCK = SystemClock()
"""The shared real clock; the daemons' default."""
