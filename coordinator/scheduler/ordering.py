"""In which order a pass considers pending jobs (the policies, fair-share usage), and how GPUs score."""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter

from coordinator.scheduler.types import _NO_USAGE, POLICIES, GpuView, JobRequest, RunningJob, SchedulerConfig

# --- ordering -----------------------------------------------------------------------------------------------


_by_submit = attrgetter("submit_time", "job_id")
_by_priority = attrgetter("priority")


def _by_priority_order(jobs: Sequence[JobRequest]) -> list[JobRequest]:
    """Higher priority first, then earlier submit_time, then job_id (stable sorts, C-speed keys)."""
    ordered = sorted(jobs, key=_by_submit)
    ordered.sort(key=_by_priority, reverse=True)  # reverse keeps equal elements in order
    return ordered


def _estimate_or_default(job: JobRequest, config: SchedulerConfig) -> float:
    if job.estimated_runtime_seconds > 0:
        return job.estimated_runtime_seconds
    return job.time_limit_seconds if job.time_limit_seconds > 0 else config.default_runtime_seconds


def _sjf_order(jobs: Sequence[JobRequest], config: SchedulerConfig) -> list[JobRequest]:
    """Shortest estimate first, aged: key = estimate + sjf_aging x submit_time (an unknown estimate counts as
    default_runtime_seconds). Ranking by `estimate - aging x waited` gives the same order at every instant,
    and a job's rank among later arrivals only improves, so no stream of short jobs holds it back forever."""
    ordered = sorted(jobs, key=_by_submit)
    aging = config.sjf_aging
    ordered.sort(key=lambda job: _estimate_or_default(job, config) + aging * job.submit_time)
    return ordered


def las_queue(attained_gpu_seconds: float, config: SchedulerConfig) -> int:
    """The las queue of a job that attained this much service: 0 below the first threshold, and so on."""
    return bisect_right(config.las_thresholds_gpu_seconds, attained_gpu_seconds)


def pending_las_queue(job: JobRequest, config: SchedulerConfig, now: float) -> int:
    """A pending job's las queue; one that waited (not running) las_starve_limit_seconds, and las_starve_factor
    times as long as it ran, is promoted to 0."""
    limit = config.las_starve_limit_seconds
    ran = job.attained_service_seconds / max(job.gpus, 1)
    if limit > 0 and now - job.submit_time - ran >= max(limit, config.las_starve_factor * ran):
        return 0
    return las_queue(job.attained_service_seconds, config)


def running_attained(job: RunningJob, now: float) -> float:
    """GPU-seconds a running job has attained: its earlier attempts' plus this attempt's so far."""
    return job.attained_service_seconds + job.gpus * max(0.0, now - job.start_time)


def pending_remaining(job: JobRequest, config: SchedulerConfig) -> float:
    """srtf: estimated seconds left = estimate - attained / gpus."""
    return _estimate_or_default(job, config) - job.attained_service_seconds / max(job.gpus, 1)


def running_remaining(job: RunningJob, now: float, config: SchedulerConfig) -> float:
    """srtf: a running job's estimated seconds left: its whole estimate less the service it attained, else
    its estimated end less now, else the default runtime less the service attained."""
    if job.estimated_runtime_seconds > 0:
        return job.estimated_runtime_seconds - running_attained(job, now) / max(job.gpus, 1)
    if job.estimated_end_time > 0:
        return job.estimated_end_time - now
    return config.default_runtime_seconds - running_attained(job, now) / max(job.gpus, 1)


def _las_order(jobs: Sequence[JobRequest], config: SchedulerConfig, now: float) -> list[JobRequest]:
    """Higher priority first, then the least attained service's queue, FIFO (submit_time) within a queue."""
    thresholds, limit, factor = config.las_thresholds_gpu_seconds, config.las_starve_limit_seconds, config.las_starve_factor

    def key(job: JobRequest) -> tuple:
        attained = job.attained_service_seconds
        queue = bisect_right(thresholds, attained) if attained > 0 else 0
        ran = attained / max(job.gpus, 1)
        if queue and limit > 0 and now - job.submit_time - ran >= max(limit, factor * ran):
            queue = 0  # pending_las_queue, inlined: this runs for every pending job each pass
        return (-job.priority, queue, job.submit_time, job.job_id)

    return sorted(jobs, key=key)


def _srtf_order(jobs: Sequence[JobRequest], config: SchedulerConfig) -> list[JobRequest]:
    ordered = sorted(jobs, key=_by_submit)
    ordered.sort(key=lambda job: pending_remaining(job, config))
    ordered.sort(key=_by_priority, reverse=True)
    return ordered


class _FairShare:
    """Owners by usage, least first; each owner's jobs by priority, then submit time.

    Iterating yields one job at a time; `charge` a yielded job before asking for the next
    to add its cost to its owner's tally, so that owners interleave within one pass.
    """

    def __init__(self, jobs: Sequence[JobRequest], config: SchedulerConfig, usage: Mapping[str, float]) -> None:
        self._default_runtime = config.fair_share_default_runtime_seconds
        self._queues: dict[str, list[JobRequest]] = {}
        for job in jobs:
            self._queues.setdefault(job.owner, []).append(job)
        self.tally = {owner: float(usage.get(owner, 0.0)) for owner in self._queues}
        for owner, queue in list(self._queues.items()):
            self._queues[owner] = _by_priority_order(queue)[::-1]  # next job at the end
        self._heap = [self._entry(owner) for owner in self._queues]
        heapq.heapify(self._heap)

    def _entry(self, owner: str) -> tuple:
        head = self._queues[owner][-1]
        return (self.tally[owner], -head.priority, head.submit_time, head.job_id, owner)

    def charge(self, job: JobRequest) -> None:
        runtime = job.estimated_runtime_seconds if job.estimated_runtime_seconds > 0 else self._default_runtime
        self.tally[job.owner] += job.gpus * max(runtime, 1.0)

    def __iter__(self) -> Iterator[JobRequest]:
        heap, queues, tally = self._heap, self._queues, self.tally
        while heap:
            owner = heapq.heappop(heap)[-1]
            queue = queues[owner]
            while True:
                yield queue.pop()
                if not queue:
                    break
                head = queue[-1]
                entry = (tally[owner], -head.priority, head.submit_time, head.job_id, owner)
                if heap and heap[0] < entry:
                    heapq.heappush(heap, entry)
                    break


def order_jobs(
    jobs: Sequence[JobRequest], config: SchedulerConfig, usage_by_owner: Mapping[str, float] = _NO_USAGE, now: float = 0.0
) -> list[JobRequest]:
    """The order in which a pass considers `jobs`.

    priority: higher first, then earlier submit_time, then job_id. fcfs: submit_time.
    sjf: shortest estimate first, aged by submit time (see _sjf_order). las: priority, then the
    attained-service queue (a job starved for las_starve_limit_seconds goes to queue 0), then FIFO.
    srtf (simulator only): priority, then least estimated remaining time. fair_share: the
    owner with the least usage (GPU-seconds) first, each job charged to its owner as it
    is taken so that owners interleave; within an owner by priority then submit_time.
    For fair_share this is the order if every job were placed; `schedule` charges only
    the jobs it actually places.
    """
    if config.policy == "priority":
        return _by_priority_order(jobs)
    if config.policy == "fcfs":
        return sorted(jobs, key=_by_submit)
    if config.policy == "sjf":
        return _sjf_order(jobs, config)
    if config.policy == "las":
        return _las_order(jobs, config, now)
    if config.policy == "srtf":
        return _srtf_order(jobs, config)
    if config.policy == "fair_share":
        queue = _FairShare(jobs, config, usage_by_owner)
        ordered = []
        for job in queue:
            queue.charge(job)
            ordered.append(job)
        return ordered
    raise ValueError(f"unknown scheduling policy {config.policy!r}; known: {', '.join(POLICIES)}")


# --- device scoring -----------------------------------------------------------------------------------------


def score_gpu(gpu: GpuView, config: SchedulerConfig) -> float:
    """Higher is better: free memory and idleness, less a penalty per degree above the threshold."""
    total = gpu.memory_total_bytes
    free_fraction = min(1.0, max(0.0, (total - gpu.memory_used_bytes) / total)) if total > 0 else 0.0
    idle_fraction = 1.0 - min(100.0, max(0.0, gpu.utilization_percent)) / 100.0
    over = gpu.temperature_celsius - config.temperature_threshold_celsius
    penalty = config.temperature_penalty_per_degree * over if over > 0 else 0.0
    return config.memory_weight * free_fraction + config.utilization_weight * idle_fraction - penalty


def decayed_usage(intervals: Iterable[tuple[str, int, float, float]], now: float, half_life_seconds: float) -> dict[str, float]:
    """Each owner's GPU-seconds from (owner, GPUs, start, end) intervals, each weighted down by how long
    ago it ended (halved every `half_life_seconds`): fair_share's `usage_by_owner`."""
    usage: dict[str, float] = {}
    for owner, gpus, start, end in intervals:
        weight = 0.5 ** (max(0.0, now - end) / half_life_seconds)
        usage[owner] = usage.get(owner, 0.0) + gpus * max(0.0, end - start) * weight
    return usage
