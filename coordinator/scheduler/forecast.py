"""Start-time estimates: the scheduler run forward from the live state on estimated runtimes.

From the nodes as they are, the running jobs with their estimated ends and the pending jobs with their
estimated runtimes, `forecast_starts` calls the real `schedule` at `now`, then at each next estimated end
(the GPUs of every job estimated to have ended by then freed), and records when each pending job is first
placed. A job placed in the forecast holds its GPUs for its own estimate. Whatever has no estimate never
ends in the forecast, so the jobs that would need its GPUs stay unknown, as does a running job already past
its estimated end (its end is no longer known) -- unknown is honest where a guess would mislead. An attempt
being stopped (preempted, cancelled, failed) is taken to end at the forecast's first step.

The work is bounded: at most `max_steps` passes over at most `max_jobs` pending jobs (the first in the
policy's order); the rest are left unknown. Ends within `resolution_seconds` of the next one are taken
together, in one pass at the latest of them (as Slurm's bf_resolution), so a step covers at least that much
time and an estimate is at most that late. `forecast_steps` yields after every pass, so that a caller on an
event loop can let other work run between passes; `forecast_starts` runs it to the end. Preemptions a pass
asks for are not played out: a job that would start only by preempting stays unknown until it is placed in
a later step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace

from coordinator.scheduler.ordering import order_jobs
from coordinator.scheduler.placement import schedule
from coordinator.scheduler.types import GpuView, JobRequest, NodeView, RunningJob, SchedulerConfig

DEFAULT_MAX_STEPS = 64
DEFAULT_MAX_JOBS = 2000
DEFAULT_RESOLUTION_SECONDS = 60.0


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
        self.variants: dict[tuple[str, bool], GpuView] = {}
        """(uuid, free) -> the GPU's view in that state, built the first time it is needed (a GPU flips often)."""
        self.dirty: set[int] = set()

    def set_free(self, uuids: Sequence[str], free: bool) -> None:
        for uuid in uuids:
            found = self.where.get(uuid)
            if found is None:
                continue  # a GPU of a node no longer listed: nothing to free there
            n, g = found
            gpu = self.gpus[n][g]
            if gpu.free != free:
                view = self.variants.get((uuid, free))
                if view is None:
                    view = self.variants[(uuid, free)] = replace(gpu, free=free)
                self.gpus[n][g] = view
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
    resolution_seconds: float = DEFAULT_RESOLUTION_SECONDS,
) -> Forecast:
    """When each pending job is estimated to start (see the module docstring). Pure: plain data in and out."""
    steps = forecast_steps(
        nodes, pending, running, config, now=now, max_steps=max_steps, max_jobs=max_jobs, resolution_seconds=resolution_seconds
    )
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def forecast_steps(
    nodes: Sequence[NodeView],
    pending: Sequence[JobRequest],
    running: Sequence[RunningJob],
    config: SchedulerConfig,
    *,
    now: float,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_jobs: int = DEFAULT_MAX_JOBS,
    resolution_seconds: float = DEFAULT_RESOLUTION_SECONDS,
) -> Generator[int, None, Forecast]:
    """The forecast one pass at a time: yields the passes run so far after each, returns the Forecast."""
    ordered = list(pending) if config.policy == "fair_share" else order_jobs(pending, config, now=now)
    waiting = ordered[:max_jobs]
    gpus = _Gpus(nodes)
    ends: list[tuple[float, int, RunningJob]] = []
    live: dict[str, RunningJob] = {}
    for sequence, holder in enumerate(running):
        live[holder.job_id] = holder
        end = now if holder.stopping else holder.estimated_end_time  # a stopping attempt ends within its grace
        if (end > now or holder.stopping) and math.isfinite(end):
            ends.append((end, sequence, holder))
    heapq.heapify(ends)
    sequence = len(ends)
    starts: dict[str, float] = {}
    t = now
    steps = 0
    while waiting and steps < max_steps:
        if steps:  # after the pass at `now`: take every end up to `resolution_seconds` past the next one
            until = t + resolution_seconds
            while ends and ends[0][0] <= until:
                t, _, done = heapq.heappop(ends)
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
        yield steps
    return Forecast(starts, steps, t)
