"""Plain clusters, running jobs and a tiny discrete-time loop for the scheduler's pure tests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from coordinator.scheduler import (
    GpuView,
    JobRequest,
    NodeShare,
    NodeView,
    RunningJob,
    SchedulerConfig,
    SchedulingResult,
    schedule,
)

GIB = 1 << 30


def gpu(node_id: str, index: int, *, free: bool = True) -> GpuView:
    return GpuView(f"{node_id}-g{index}", index, "NVIDIA H100 80GB HBM3", 80 * GIB, 0, 0.0, 40.0, True, free)


def cluster(sizes: dict[str, int], running: list[RunningJob] = (), pool: str = "default") -> list[NodeView]:
    """Nodes of the given GPU counts whose GPUs are free unless a running job holds them."""
    busy = {u for r in running for s in r.nodes for u in s.gpu_uuids}
    return [
        NodeView(node_id, True, tuple(gpu(node_id, i, free=f"{node_id}-g{i}" not in busy) for i in range(n)), pool)
        for node_id, n in sizes.items()
    ]


def holding(job_id: str, placement: dict[str, list[int]], *, start: float = 0.0, end: float = 0.0, **kw) -> RunningJob:
    """A running job holding GPU indexes per node, started at `start`, estimated to end at `end` (0 = unknown)."""
    nodes = tuple(NodeShare(n, tuple(f"{n}-g{i}" for i in idx)) for n, idx in placement.items())
    return RunningJob(job_id, nodes, start, estimated_end_time=end, **kw)


def job(job_id: str, gpus: int, **kw) -> JobRequest:
    return JobRequest(job_id, gpus, **kw)


def as_running(result: SchedulingResult, jobs: list[JobRequest], now: float, config: SchedulerConfig) -> list[RunningJob]:
    """The placed jobs of a pass as running jobs, ending at now + their estimate (the default if unknown)."""
    by_id = {j.job_id: j for j in jobs}
    out = []
    for decision in result.placed:
        request = by_id[decision.job_id]
        estimate = request.estimated_runtime_seconds or config.default_runtime_seconds
        out.append(RunningJob(decision.job_id, decision.nodes, now, estimated_end_time=now + estimate))
    return out


@dataclass
class Loop:
    """Runs passes every `step` seconds; jobs run exactly their `durations`; preempted jobs are requeued."""

    sizes: dict[str, int]
    config: SchedulerConfig
    durations: dict[str, float]
    now: float = 0.0
    pending: dict[str, JobRequest] = field(default_factory=dict)
    running: dict[str, tuple[RunningJob, float]] = field(default_factory=dict)
    """job id -> (the running job, when it really ends)."""
    started: dict[str, float] = field(default_factory=dict)
    """job id -> first start time."""
    usage: dict[str, float] = field(default_factory=dict)
    reservations: tuple = ()
    preempted: int = 0
    submitted: dict[str, float] = field(default_factory=dict)

    def submit(self, request: JobRequest) -> None:
        self.pending[request.job_id] = request

    def step(self, seconds: float) -> SchedulingResult:
        self.now += seconds
        for job_id, (r, ends) in list(self.running.items()):
            if ends <= self.now:
                del self.running[job_id]
                self.usage[r.owner] = self.usage.get(r.owner, 0.0) + r.gpus * (ends - r.start_time)
        running = [r for r, _ in self.running.values()]
        result = schedule(
            cluster(self.sizes, running),
            list(self.pending.values()),
            self.config,
            now=self.now,
            usage_by_owner=self.usage,
            running=running,
            previous_reservations=self.reservations,
        )
        self.reservations = result.reservations
        for p in result.preemptions:  # stopped at once in this loop, requeued with its service so far
            r, _ = self.running.pop(p.victim_job_id)
            self.preempted += 1
            attained = r.attained_service_seconds + r.gpus * (self.now - r.start_time)
            self.durations[r.job_id] -= self.now - r.start_time
            self.submit(
                JobRequest(
                    r.job_id,
                    r.gpus,
                    priority=r.priority,
                    owner=r.owner,
                    submit_time=self.submitted[r.job_id],
                    estimated_runtime_seconds=r.estimated_runtime_seconds,
                    attained_service_seconds=attained,
                )
            )
        for decision in result.placed:
            request = self.pending.pop(decision.job_id)
            self.started.setdefault(request.job_id, self.now)
            estimate = request.estimated_runtime_seconds
            r = RunningJob(
                request.job_id,
                decision.nodes,
                self.now,
                owner=request.owner,
                priority=request.priority,
                estimated_end_time=self.now + estimate - request.attained_service_seconds / request.gpus if estimate else 0.0,
                attained_service_seconds=request.attained_service_seconds,
                estimated_runtime_seconds=estimate,
            )
            self.running[request.job_id] = (r, self.now + self.durations[request.job_id])
        return result

    def add(self, request: JobRequest, duration: float) -> None:
        request = replace(request, submit_time=self.now)
        self.submitted[request.job_id] = self.now
        self.durations[request.job_id] = duration
        self.submit(request)
