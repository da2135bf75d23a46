"""When GPUs come free: running jobs' estimated ends per node, and the reservation of a blocked job (which
nodes, and when it is estimated to start there) for EASY backfill."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from coordinator.scheduler.capacity import _Pass, _Pool
from coordinator.scheduler.types import JobRequest, NodeView, RunningJob, SchedulerConfig


def job_estimate(job: JobRequest) -> float:
    """The job's runtime estimate in seconds: the estimate, else its time limit (an upper bound); 0 = unknown."""
    if job.estimated_runtime_seconds > 0:
        return job.estimated_runtime_seconds
    return job.time_limit_seconds if job.time_limit_seconds > 0 else 0.0


def running_end(job: RunningJob, now: float, config: SchedulerConfig) -> float:
    """When a running job is estimated to end, never before now.

    A stopping (preempted) job ends now, as far as planning goes; an unknown end is start_time plus the
    default runtime; an end already past (the job overran its estimate) is now: it may end any moment.
    """
    if job.stopping:
        return now
    end = job.estimated_end_time if job.estimated_end_time > 0 else job.start_time + config.default_runtime_seconds
    return end if end > now else now


class _Timeline:
    """Estimated end times of the GPUs held on each node of the pass (by the pass's node index)."""

    __slots__ = ("ends", "now")

    def __init__(
        self,
        node_index: dict[str, int],
        running: Iterable[RunningJob],
        now: float,
        config: SchedulerConfig,
    ) -> None:
        self.now = now
        ends: dict[int, list[float]] = {}
        default = config.default_runtime_seconds
        for job in running:
            # running_end, inlined: this runs for every running job each pass that needs a reservation.
            if job.stopping:
                end = now
            else:
                end = job.estimated_end_time if job.estimated_end_time > 0 else job.start_time + default
                if end < now:
                    end = now
            for share in job.nodes:
                i = node_index.get(share.node_id)
                if i is not None:
                    on_node = ends.get(i)
                    if on_node is None:
                        ends[i] = [end] * len(share.gpu_uuids)
                    else:
                        on_node += [end] * len(share.gpu_uuids)
        for on_node in ends.values():
            on_node.sort()
        self.ends = ends

    def add(self, i: int, gpus: int, end: float) -> None:
        """GPUs taken on node i this pass, until `end`."""
        ends = self.ends.setdefault(i, [])
        ends.extend([end] * gpus)
        ends.sort()

    def end_now(self, i: int, gpus: int, old_end: float) -> None:
        """GPUs on node i that were to come free at old_end now come free at once (their job is preempted)."""
        ends = self.ends.get(i)
        if not ends:
            return
        for _ in range(gpus):
            if old_end in ends:
                ends.remove(old_end)
                ends.append(self.now)
        ends.sort()

    def free_times(self, i: int, pool: _Pool) -> list[float]:
        """When each of node i's eligible GPUs is free: now for the free ones, then the held ones' estimated
        ends, earliest first (math.inf for a GPU held by no job the scheduler knows of)."""
        free, busy = len(pool.free[i]), pool.exist[i] - len(pool.free[i])
        times = [self.now] * free
        if busy > 0:
            ends = self.ends.get(i, ())
            times.extend(ends[:busy])
            times.extend([math.inf] * (busy - min(busy, len(ends))))
        return times

    def reservation(
        self, job: JobRequest, pool: _Pool, candidates: Sequence[int], previous: Sequence[int] | None
    ) -> tuple[list[int], float]:
        """The nodes (among `candidates`) on which `job` is estimated to start soonest, and that time.

        `previous` (the nodes it held last pass) is kept unless another choice is strictly earlier, so
        that a reservation does not wander from pass to pass and sweep up every node that frees.
        """
        times = {i: self.free_times(i, pool) for i in candidates if pool.exist[i]}
        chosen, start = self._best(job, pool, times)
        if previous:
            kept = [i for i in previous if i in times]
            if len(kept) == len(previous):
                kept_start = self._start_on(job, kept, times)
                if kept_start <= start:
                    return kept, kept_start
        return chosen, start

    def _start_on(self, job: JobRequest, nodes: Sequence[int], times: dict[int, list[float]]) -> float:
        k, g = job.gpus_per_node, job.gpus
        if k:
            if len(nodes) < g // k or any(len(times[i]) < k for i in nodes):
                return math.inf
            return max(sorted(times[i][k - 1] for i in nodes)[: g // k] or [math.inf])
        merged = sorted(t for i in nodes for t in times[i])
        return merged[g - 1] if len(merged) >= g else math.inf

    def _best(self, job: JobRequest, pool: _Pool, times: dict[int, list[float]]) -> tuple[list[int], float]:
        k, g, free = job.gpus_per_node, job.gpus, pool.free
        if k:
            n = g // k
            wide = [i for i, t in times.items() if len(t) >= k]
            # Soonest first; among equals the most free now (the old "most free" choice), then node order.
            wide.sort(key=lambda i: (times[i][k - 1], -min(len(free[i]), k), -len(free[i]), i))
            chosen = wide[:n]
            return chosen, (times[chosen[-1]][k - 1] if len(chosen) == n else math.inf)
        merged = sorted(t for in_node in times.values() for t in in_node)
        start = merged[g - 1] if len(merged) >= g else math.inf
        by_then = {i: sum(1 for t in in_node if t <= start) for i, in_node in times.items()}
        # Fewest nodes: those with the most GPUs free by the start first.
        order = sorted(times, key=lambda i: (-by_then[i], -len(free[i]), -pool.exist[i], i))
        chosen, total = [], 0
        for i in order:
            chosen.append(i)
            total += by_then[i] if start < math.inf else pool.exist[i]
            if total >= g:
                break
        return chosen, start


def _estimated_start(job: JobRequest, pool: _Pool, timeline: _Timeline, closed: frozenset[int] = frozenset()) -> float:
    """The earliest time `job` is estimated to fit, given the GPUs' estimated free times (math.inf: never known)."""
    candidates = [i for i in range(len(pool.exist)) if i not in closed]
    return timeline.reservation(job, pool, candidates, None)[1]


def estimated_start(
    job: JobRequest,
    nodes: Sequence[NodeView],
    running: Sequence[RunningJob],
    config: SchedulerConfig,
    *,
    now: float,
    on_nodes: Sequence[str] | None = None,
) -> float:
    """When `job` is estimated to fit (on `on_nodes` only, if given), from running jobs' estimated ends alone:
    what a reservation's start time means, for checking and for start-time estimates."""
    state = _Pass(nodes, config)
    pool = state.pool_for(job)
    node_index = {node_id: i for i, node_id in enumerate(state.node_ids)}
    timeline = _Timeline(node_index, running, now, config)
    if on_nodes is None:
        return _estimated_start(job, pool, timeline)
    indexes = [node_index.get(node_id) for node_id in on_nodes]
    if None in indexes:
        return math.inf
    chosen = [i for i in indexes if i is not None]
    times = {i: timeline.free_times(i, pool) for i in chosen}
    return timeline._start_on(job, chosen, times)
