"""What the ranks of one running attempt report about their steps, and how busy its GPUs are: plain data.

The agents send each rank's step, samples, step time and (rank 0's) scalars in their heartbeats; the
coordinator keeps them per attempt, in memory only (a restarted coordinator starts afresh from the next
reports). The decisions over them — stragglers, idleness — are in coordinator/rules/job_telemetry.py.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of gpuorch_job_step_seconds, in seconds (a step of a small model to a step of a large one)."""


@dataclass(slots=True)
class StepHistogram:
    """Step times of every rank's steps: each report adds its mean step time once per step it covers."""

    counts: list[int] = field(default_factory=lambda: [0] * len(STEP_SECONDS_BUCKETS))
    """Steps per bucket (not cumulative); a step over the last bound is counted in `count` only."""
    count: int = 0
    total_seconds: float = 0.0

    def observe(self, seconds: float, steps: int) -> None:
        # The first bound at or above `seconds` (NaN and anything over the last bound: none).
        index = bisect_left(STEP_SECONDS_BUCKETS, seconds)
        if index < len(STEP_SECONDS_BUCKETS) and seconds <= STEP_SECONDS_BUCKETS[index]:
            self.counts[index] += steps
        self.count += steps
        self.total_seconds += seconds * steps


@dataclass(slots=True)
class RankSteps:
    """One rank's latest report, and its run of slow windows."""

    step: int = 0
    samples: int = 0
    step_seconds: float = 0.0
    """Its mean step time over its latest window; 0 = not yet known."""
    reported_wall: float = 0.0
    """When it wrote its latest report (its progress stamp), wall clock."""
    steps_per_second: float = 0.0
    samples_per_second: float = 0.0
    judged_step: int = 0
    """The step it had reached when a straggler window last judged it: a window judges only fresh reports."""
    slow_windows: int = 0
    """Windows in a row its step time was above straggler_ratio x the job's median."""


@dataclass(eq=False)
class AttemptTelemetry:
    """The step telemetry and idleness of one attempt."""

    job_id: str
    attempt: int
    ranks: dict[int, RankSteps] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    """Rank 0's latest scalars."""
    histogram: StepHistogram = field(default_factory=StepHistogram)
    flagged: set[int] = field(default_factory=set)
    """Ranks already flagged as stragglers in this attempt (each is flagged once)."""
    low_utilization_since: float | None = None
    """Wall time since which every GPU of the attempt has been under the idle threshold; None while one is busy."""
    idle: bool = False
    utilization_percent: float = 0.0
    """Mean utilisation of the attempt's GPUs in the latest sample."""
    last_sample_wall: float = 0.0
    """When its GPUs were last sampled for usage accounting (0: not yet)."""

    @property
    def step(self) -> int:
        return max((rank.step for rank in self.ranks.values()), default=0)

    @property
    def steps_per_second(self) -> float:
        """Rank 0's rate, else the slowest rank's (a gang goes as fast as its slowest rank)."""
        first = self.ranks.get(0)
        if first is not None and first.steps_per_second:
            return first.steps_per_second
        rates = [rank.steps_per_second for rank in self.ranks.values() if rank.steps_per_second]
        return min(rates, default=0.0)

    @property
    def samples_per_second(self) -> float:
        return sum(rank.samples_per_second for rank in self.ranks.values())
