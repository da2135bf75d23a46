"""The cluster's usage over time: downsampled totals and GPU-seconds by owner and by pool.

Plain data, no I/O, no clock of its own: the sampler (coordinator/observe/usage_sampler.py) hands
every sample its wall time. Two tiers of fixed-width intervals are filled from the same samples,
one a minute kept for 7 days and one an hour kept for 90 days; each holds at most its retention's
worth of intervals, so memory stays bounded whatever the uptime. The history lives in memory: a
restarted coordinator starts an empty one.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MINUTE = 60
HOUR = 3600
DAY = 86400


@dataclass(frozen=True, slots=True)
class UsageSample:
    """What the cluster looked like at one instant."""

    gpus_total: int
    gpus_allocated: int
    mean_gpu_utilization_percent: float
    owner_gpus: Mapping[str, int] = field(default_factory=dict)
    """GPUs held, by job owner."""
    pool_gpus: Mapping[str, int] = field(default_factory=dict)
    """GPUs held, by node pool."""


@dataclass(slots=True)
class UsageInterval:
    """One interval of a tier: sums weighted by the seconds the samples covered."""

    start: float
    covered_seconds: float = 0.0
    gpu_seconds_total: float = 0.0
    gpu_seconds_allocated: float = 0.0
    utilization_seconds: float = 0.0
    owner_gpu_seconds: dict[str, float] = field(default_factory=dict)
    pool_gpu_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, sample: UsageSample, seconds: float) -> None:
        self.covered_seconds += seconds
        self.gpu_seconds_total += sample.gpus_total * seconds
        self.gpu_seconds_allocated += sample.gpus_allocated * seconds
        self.utilization_seconds += sample.mean_gpu_utilization_percent * seconds
        for name, gpus in sample.owner_gpus.items():
            self.owner_gpu_seconds[name] = self.owner_gpu_seconds.get(name, 0.0) + gpus * seconds
        for name, gpus in sample.pool_gpus.items():
            self.pool_gpu_seconds[name] = self.pool_gpu_seconds.get(name, 0.0) + gpus * seconds

    @property
    def gpus_total(self) -> float:
        return self.gpu_seconds_total / self.covered_seconds if self.covered_seconds else 0.0

    @property
    def gpus_allocated(self) -> float:
        return self.gpu_seconds_allocated / self.covered_seconds if self.covered_seconds else 0.0

    @property
    def mean_gpu_utilization_percent(self) -> float:
        return self.utilization_seconds / self.covered_seconds if self.covered_seconds else 0.0


class UsageTier:
    """Intervals of `width` seconds for the last `retention` seconds, oldest first."""

    def __init__(self, width: int, retention: int) -> None:
        if width <= 0 or retention < width:
            raise ValueError(f"a usage tier needs width > 0 and retention >= width, got {width} and {retention}")
        self.width = width
        self.retention = retention
        self.intervals: collections.deque[UsageInterval] = collections.deque(maxlen=retention // width)

    def add(self, wall: float, sample: UsageSample, seconds: float) -> None:
        """Counts `seconds` of `sample` in the interval that holds `wall`. A sample older than the newest
        interval (the wall clock stepped back) goes into the newest one, so intervals stay in order."""
        start = wall - wall % self.width
        if not self.intervals or start > self.intervals[-1].start:
            self.intervals.append(UsageInterval(start))
        self.intervals[-1].add(sample, seconds)
        self.expire(wall)

    def expire(self, now: float) -> None:
        while self.intervals and self.intervals[0].start + self.width <= now - self.retention:
            self.intervals.popleft()

    def between(self, start: float, end: float) -> list[UsageInterval]:
        """The intervals that start in [start, end)."""
        return [interval for interval in self.intervals if start <= interval.start < end]


def totals(intervals: Iterable[UsageInterval]) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(owners, pools): GPU-seconds summed over the intervals, most first (names break ties)."""
    owners: dict[str, float] = {}
    pools: dict[str, float] = {}
    for interval in intervals:
        for name, seconds in interval.owner_gpu_seconds.items():
            owners[name] = owners.get(name, 0.0) + seconds
        for name, seconds in interval.pool_gpu_seconds.items():
            pools[name] = pools.get(name, 0.0) + seconds

    def ranked(table: dict[str, float]) -> list[tuple[str, float]]:
        return sorted(table.items(), key=lambda item: (-item[1], item[0]))

    return ranked(owners), ranked(pools)


class UsageHistory:
    """Both tiers, fed by `record` at each sample.

    A sample counts for the seconds since the one before, capped at `max_gap` so that a stall or a
    suspended machine does not credit the time it was away to whatever held GPUs at its end."""

    def __init__(self, sample_interval: float, started_wall: float) -> None:
        if sample_interval <= 0:
            raise ValueError(f"sample_interval must be > 0, got {sample_interval}")
        self.sample_interval = sample_interval
        self.max_gap = 2 * sample_interval
        self.started_wall = started_wall
        self.minutes = UsageTier(MINUTE, 7 * DAY)
        self.hours = UsageTier(HOUR, 90 * DAY)
        self._last_wall: float | None = None

    def record(self, wall: float, sample: UsageSample) -> None:
        """Counts a sample taken at `wall` for the time since the previous one (the first counts one interval)."""
        seconds = self.sample_interval if self._last_wall is None else wall - self._last_wall
        self._last_wall = wall if self._last_wall is None else max(wall, self._last_wall)
        seconds = min(max(seconds, 0.0), self.max_gap)
        if seconds <= 0:
            return
        self.minutes.add(wall, sample, seconds)
        self.hours.add(wall, sample, seconds)

    def tier(self, width: int) -> UsageTier:
        if width == MINUTE:
            return self.minutes
        if width == HOUR:
            return self.hours
        raise ValueError(f"no usage tier of {width} seconds: use {MINUTE} or {HOUR}")
