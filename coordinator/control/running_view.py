"""The scheduler's view of the jobs that hold GPUs: one `scheduler.RunningJob` per live attempt.

A pass asks for it every time (backfill, start-time estimates and preemption read it), and there may
be thousands of running jobs, so it is kept across passes: the jobs that may hold GPUs are tracked as
their attempts are placed or restored, each one's record is built once per (attempt, stopping), and a
job leaves the view when its last attempt is forgotten (every rank's end confirmed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from coordinator import scheduler
from coordinator.model.jobs import Attempt, AttemptState, JobEntry
from gpuorch.clock import stamp_seconds
from gpuorch.v1 import job_pb2


def attempt_intervals(entries: Iterable[JobEntry], now: float) -> Iterator[tuple[str, int, float, float]]:
    """(owner, GPUs, start, end) of every attempt of the jobs; an attempt not ended counts until `now`."""
    for entry in entries:
        owner = entry.job.spec.owner
        for attempt in entry.job.attempts:
            end = stamp_seconds(attempt.end_time) if attempt.HasField("end_time") else now
            yield owner, attempt.placement.world_size, stamp_seconds(attempt.start_time), end


def attained_service_seconds(job: job_pb2.Job, before_attempt: int) -> float:
    """GPU-seconds the job's attempts numbered below `before_attempt` ran (each one's GPUs x its duration)."""
    total = 0.0
    for record in job.attempts:
        if record.attempt >= before_attempt or not record.HasField("end_time"):
            continue
        seconds = (record.end_time.ToNanoseconds() - record.start_time.ToNanoseconds()) / 1e9
        total += record.placement.world_size * max(0.0, seconds)
    return total


def running_job(
    entry: JobEntry,
    attempt_number: int,
    stopping: bool,
    request: scheduler.JobRequest,
    nodes: tuple[scheduler.NodeShare, ...] | None = None,
    start: float | None = None,
) -> scheduler.RunningJob:
    """The scheduler's record of one live attempt; `request` is the job's own view (owner, pool, priority...).
    `nodes` and `start`, when the caller has them (a placement just made), spare reading the attempt's record."""
    job = entry.job
    if nodes is None or start is None:
        record = entry.record(attempt_number)
        placement = record.placement if record is not None else job.placement
        nodes = tuple(scheduler.NodeShare(node.node_id, tuple(node.device_uuids)) for node in placement.nodes)
        start = stamp_seconds(record.start_time if record is not None else job.start_time)
    estimate = request.estimated_runtime_seconds
    if request.time_limit_seconds > 0:
        estimate = min(estimate, request.time_limit_seconds) if estimate > 0 else request.time_limit_seconds
    attained = attained_service_seconds(job, attempt_number) if len(job.attempts) > 1 else 0.0
    gpus = sum(len(share.gpu_uuids) for share in nodes)
    # A requeued (preempted) job resumes from its checkpoint: what is left of its estimate is what the
    # earlier attempts did not run yet. Past its estimate it may end any moment (the scheduler's reading of 0 left).
    remaining = max(0.0, estimate - attained / gpus) if estimate > 0 and gpus else 0.0
    return scheduler.RunningJob(
        job_id=job.job_id,
        nodes=nodes,
        start_time=start,
        owner=request.owner,
        group=request.group,
        pool=request.pool,
        priority=request.priority,
        preemptible=request.preemptible,
        estimated_end_time=start + remaining if estimate > 0 else 0.0,
        attained_service_seconds=attained,
        stopping=stopping,
        estimated_runtime_seconds=estimate,
    )


class RunningView:
    """Jobs with attempts that may still hold GPUs, and their scheduler records, kept across passes."""

    def __init__(self, request_of: Callable[[JobEntry], scheduler.JobRequest]) -> None:
        self.request_of = request_of
        """The job's scheduler request (owner, pool, priority, preemptible, estimate): one source for both views."""
        self._live: dict[str, JobEntry] = {}
        self._records: dict[str, tuple[Attempt, bool, scheduler.RunningJob]] = {}
        """Job id -> (the attempt, whether it was stopping, its record)."""

    def track(self, entry: JobEntry) -> None:
        """The job has an attempt that holds GPUs (just placed, or restored after a restart)."""
        self._live[entry.job.job_id] = entry

    def placed(self, entry: JobEntry, decision: scheduler.Decision, start: float, request: scheduler.JobRequest) -> None:
        """The job's new attempt was just placed by `decision`: its record is built from the decision now,
        cheaper than from the stored attempt at the next pass (a pass may place a thousand jobs)."""
        attempt = entry.current
        if attempt is None:
            return
        self._live[entry.job.job_id] = entry
        record = running_job(entry, attempt.attempt, False, request, decision.nodes, start)
        self._records[entry.job.job_id] = (attempt, False, record)

    def changed(self, job_id: str) -> None:
        """The job's spec changed (its priority): its record is built again."""
        self._records.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._live)

    def jobs(self) -> list[scheduler.RunningJob]:
        """Every live attempt now, in placement order; a job whose attempts are all forgotten leaves.
        Reads only plain attributes per job (message fields are slow): an attempt is stopping once the
        rules marked it so (failed, cancelled, preempted, or restored after its job moved on)."""
        running: list[scheduler.RunningJob] = []
        gone: list[str] = []
        records = self._records
        stopping_state = AttemptState.STOPPING
        for job_id, entry in self._live.items():
            attempts = entry.attempts
            if not attempts:
                gone.append(job_id)
                continue
            for attempt in attempts.values():
                stopping = attempt.state is stopping_state
                cached = records.get(job_id)
                if cached is None or cached[0] is not attempt or cached[1] is not stopping:
                    record = running_job(entry, attempt.attempt, stopping, self.request_of(entry))
                    cached = records[job_id] = (attempt, stopping, record)
                running.append(cached[2])
        for job_id in gone:
            del self._live[job_id]
            records.pop(job_id, None)
        return running
