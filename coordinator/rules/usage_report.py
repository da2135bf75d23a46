"""Usage accounting as pure functions: what each attempt's GPUs did, and the cost report that sums it.

An attempt's GPU-seconds are exact: its GPUs (its placement's world size) x the seconds between its start and
end (now, while it runs). Its utilisation and peak memory are sampled: every straggler window the coordinator
adds its GPUs' latest telemetry to the attempt's record (Attempt.usage, stored with the job). The report
clips each attempt to the range asked for and weighs its mean utilisation by the GPU-seconds it contributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpuorch.v1 import job_pb2


def sample(record: job_pb2.Attempt, utilizations: Sequence[float], memory_used: Sequence[int], seconds: float) -> None:
    """Adds one sample of the attempt's GPUs, covering `seconds`, to its record."""
    usage = record.usage
    if utilizations and seconds > 0:
        usage.utilization_percent_seconds += seconds * sum(utilizations) / len(utilizations)
        usage.sampled_seconds += seconds
    if memory_used:
        usage.peak_memory_bytes = max(usage.peak_memory_bytes, *memory_used)


def _seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


@dataclass
class _Sum:
    jobs: set[str] = field(default_factory=set)
    attempts: int = 0
    gpu_seconds: float = 0.0
    weighted_utilization: float = 0.0
    """Sum of each attempt's mean utilisation x its GPU-seconds here (attempts never sampled left out)."""
    weighed_gpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    owner: str = ""
    pool: str = ""

    def add(self, job: job_pb2.Job, record: job_pb2.Attempt, gpu_seconds: float) -> None:
        self.jobs.add(job.job_id)
        self.attempts += 1
        self.gpu_seconds += gpu_seconds
        usage = record.usage
        if usage.sampled_seconds > 0:
            self.weighted_utilization += gpu_seconds * usage.utilization_percent_seconds / usage.sampled_seconds
            self.weighed_gpu_seconds += gpu_seconds
        self.peak_memory_bytes = max(self.peak_memory_bytes, usage.peak_memory_bytes)

    def row(self, key: str) -> job_pb2.UsageRow:
        mean = self.weighted_utilization / self.weighed_gpu_seconds if self.weighed_gpu_seconds else 0.0
        return job_pb2.UsageRow(
            key=key, jobs=len(self.jobs), attempts=self.attempts, gpu_seconds=self.gpu_seconds,
            mean_gpu_utilization_percent=mean, peak_memory_bytes=self.peak_memory_bytes, owner=self.owner, pool=self.pool,
        )  # fmt: skip


def attempt_gpu_seconds(record: job_pb2.Attempt, since: float, until: float) -> float:
    """The attempt's GPUs x the seconds it ran inside [since, until); 0 for one never started."""
    if not record.HasField("start_time"):
        return 0.0
    start = max(_seconds(record.start_time), since)
    end = min(_seconds(record.end_time) if record.HasField("end_time") else until, until)
    return record.placement.world_size * max(0.0, end - start)


def report(jobs: Iterable[job_pb2.Job], group_by: int, since: float, until: float, owner: str = "") -> job_pb2.GetUsageResponse:
    """The usage of these jobs' attempts in [since, until), one row per owner, pool or job, most GPU-seconds first."""
    groups: dict[str, _Sum] = {}
    total = _Sum()
    by_job = group_by == job_pb2.USAGE_GROUP_BY_JOB
    for job in jobs:
        if owner and job.spec.owner != owner:
            continue
        pool = job.spec.pool or "default"
        key = job.job_id if by_job else pool if group_by == job_pb2.USAGE_GROUP_BY_POOL else job.spec.owner
        for record in job.attempts:
            gpu_seconds = attempt_gpu_seconds(record, since, until)
            if gpu_seconds <= 0:
                continue
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Sum(owner=job.spec.owner if by_job else "", pool=pool if by_job else "")
            group.add(job, record, gpu_seconds)
            total.add(job, record, gpu_seconds)
    response = job_pb2.GetUsageResponse(total=total.row("total"))
    response.rows.extend(groups[key].row(key) for key in sorted(groups, key=lambda k: (-groups[k].gpu_seconds, k)))
    response.since.FromNanoseconds(int(since * 1e9))
    response.until.FromNanoseconds(int(until * 1e9))
    return response
