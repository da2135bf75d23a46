"""The one clock of both daemons.

Every decision that depends on time (liveness deadlines, restart backoff, hang detection,
telemetry ages) reads it through a `Clock`, so that tests and the trace simulator can run the
production code on a fake one. Benchmarks time themselves with `time.perf_counter` directly.
"""

from __future__ import annotations

import time
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp


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


_STAMP_SECONDS_MIN, _STAMP_SECONDS_MAX = -62135596800, 253402300799
"""The range of a valid google.protobuf.Timestamp (0001-01-01 to 9999-12-31)."""


def stamp_seconds(stamp: Timestamp) -> float:
    """`stamp.ToNanoseconds() / 1e9`, the same float, without its Python-level checks: it is read on hot paths (every
    heartbeat, every rank's report, every job written and every pass's new requests). An invalid stamp still raises."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if _STAMP_SECONDS_MIN <= seconds <= _STAMP_SECONDS_MAX and 0 <= nanos < 1_000_000_000:
        return (seconds * 1_000_000_000 + nanos) / 1e9
    return stamp.ToNanoseconds() / 1e9
