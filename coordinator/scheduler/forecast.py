"""Start-time estimates: the scheduler run forward from the live state on estimated runtimes.

From the nodes as they are, the running jobs with their estimated ends and the pending jobs with their
estimated runtimes, `forecast_starts` calls the real `schedule` at `now`, then at each next estimated end
(the GPUs of every job estimated to have ended by then freed), and records when each pending job is first
placed. A job placed in the forecast holds its GPUs for its own estimate. Whatever has no estimate never
ends in the forecast, so the jobs that would need its GPUs stay unknown, as does a running job already past
its estimated end (its end is no longer known) -- unknown is honest where a guess would mislead.

The work is bounded: at most `max_steps` passes over at most `max_jobs` pending jobs (the first in the
policy's order); the rest are left unknown. Preemptions a pass asks for are not played out: a job that
would start only by preempting stays unknown until it is placed in a later step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from coordinator.scheduler.ordering import order_jobs
from coordinator.scheduler.placement import schedule
from coordinator.scheduler.types import GpuView, JobRequest, NodeView, RunningJob, SchedulerConfig

DEFAULT_MAX_STEPS = 32
DEFAULT_MAX_JOBS = 2000


@dataclass(frozen=True, slots=True)
class Forecast:
    starts: dict[str, float]
    """Pending job id -> estimated start (wall time) for the jobs the forecast placed; absent = unknown."""
    steps: int
    """Scheduling passes the forecast ran."""
    horizon: float
    """The latest simulated time reached (now, if nothing ever ended)."""


class _Gpus:
    """The simulated free/taken state of every GPU, with node views rebuilt only for nodes that changed."""

    def __init__(self, nodes: Sequence[NodeView]) -> None:
        self.views = list(nodes)
        self.gpus: list[list[GpuView]] = [list(node.gpus) for node in nodes]
        self.where: dict[str, tuple[int, int]] = {
            gpu.uuid: (n, g) for n, node in enumerate(nodes) for g, gpu in enumerate(node.gpus)
        }
        self.dirty: set[int] = set()

    def set_free(self, uuids: Sequence[str], free: bool) -> None:
        for uuid in uuids:
            found = self.where.get(uuid)
            if found is None:
                continue  # a GPU of a node no longer listed: nothing to free there
            n, g = found
            gpu = self.gpus[n][g]
            if gpu.free != free:
                self.gpus[n][g] = replace(gpu, free=free)
                self.dirty.add(n)

    def current(self) -> list[NodeView]:
        for n in self.dirty:
            self.views[n] = replace(self.views[n], gpus=tuple(self.gpus[n]))
        self.dirty.clear()
        return self.views


def forecast_starts(
    nodes: Sequence[NodeView],
    pending: Sequence[JobRequest],
    running: Sequence[RunningJob],
    config: SchedulerConfig,
    *,
    now: float,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_jobs: int = DEFAULT_MAX_JOBS,
) -> Forecast:
    """When each pending job is estimated to start (see the module docstring). Pure: plain data in and out."""
    ordered = list(pending) if config.policy == "fair_share" else order_jobs(pending, config)
    waiting = ordered[:max_jobs]
    gpus = _Gpus(nodes)
    ends: list[tuple[float, int, RunningJob]] = []
    live: dict[str, RunningJob] = {}
    for sequence, holder in enumerate(running):
        live[holder.job_id] = holder
        end = holder.estimated_end_time
        if end > now and math.isfinite(end):
            ends.append((end, sequence, holder))
    heapq.heapify(ends)
    sequence = len(ends)
    starts: dict[str, float] = {}
    t = now
    steps = 0
    while waiting and steps < max_steps:
        while ends and ends[0][0] <= t:
            _, _, done = heapq.heappop(ends)
            live.pop(done.job_id, None)
            gpus.set_free([uuid for share in done.nodes for uuid in share.gpu_uuids], True)
        result = schedule(gpus.current(), waiting, config, now=t, running=tuple(live.values()))
        steps += 1
        if result.placed:
            by_id = {job.job_id: job for job in waiting}
            for decision in result.placed:
                job = by_id[decision.job_id]
                starts[job.job_id] = t
                gpus.set_free([uuid for share in decision.nodes for uuid in share.gpu_uuids], False)
                runtime = job.estimated_runtime_seconds
                placed = RunningJob(
                    job_id=job.job_id,
                    nodes=decision.nodes,
                    start_time=t,
                    owner=job.owner,
                    group=job.group,
                    pool=job.pool,
                    priority=job.priority,
                    preemptible=job.preemptible,
                    estimated_end_time=t + runtime if runtime > 0 else 0.0,
                    attained_service_seconds=job.attained_service_seconds,
                )
                live[job.job_id] = placed
                if runtime > 0:
                    heapq.heappush(ends, (t + runtime, sequence, placed))
                    sequence += 1
            waiting = [job for job in waiting if job.job_id not in starts]
        if not ends:
            break  # nothing more is known to end: the rest of the queue stays unknown
        t = ends[0][0]
    return Forecast(starts, steps, t)
