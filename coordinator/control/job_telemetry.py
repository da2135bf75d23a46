"""Keeps each running attempt's step telemetry from the agents' heartbeats and, every window, applies the
decisions of coordinator/rules/job_telemetry.py (stragglers, idleness) through the job manager.

It also keeps each attempt's progress stamp, which hang detection reads: one pass over a heartbeat's reports
serves both. A report costs a stamp conversion and a comparison unless the rank reached a later step (at
most once a second per rank: gpuorch.worker writes no more often), so the heartbeat path stays cheap with
every rank reporting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.model.job_telemetry import AttemptTelemetry, stamp_wall
from coordinator.model.jobs import Attempt, AttemptState, JobEntry
from coordinator.model.telemetry import GPU_UTILIZATION, MEMORY_USED
from coordinator.rules import job_telemetry, usage_report
from coordinator.rules.job_telemetry import TelemetryConfig
from coordinator.rules.liveness import Liveness
from gpuorch.v1 import agent_pb2, job_pb2

NO_SCALARS: dict[str, float] = {}
"""The scalars passed for a rank other than 0 (rank_progress keeps rank 0's only); never written."""


class JobTelemetry:
    """The step telemetry of every running attempt (the current attempt of each RUNNING job)."""

    def __init__(self, manager: JobManager, cluster: ClusterView, config: TelemetryConfig, window_seconds: float) -> None:
        self.manager = manager
        self.cluster = cluster
        self.config = config
        self.window_seconds = window_seconds
        self.attempts: dict[str, AttemptTelemetry] = {}
        """Job id -> its current attempt's telemetry."""

    def on_progress(self, node_id: str, reports: Sequence[agent_pb2.RankProgress]) -> None:
        """One heartbeat's rank reports: each attempt's progress stamp (hang detection) and, for a running
        attempt, its step telemetry. This runs for every rank in every heartbeat, so a heartbeat's reports (all
        of one attempt, usually) cost one lookup of the job and attempt per run of reports of the same attempt,
        one stamp conversion and one read of each field per report."""
        jobs, running, attempts = self.manager.jobs, self.manager.running, self.attempts
        key: tuple[str, int] | None = None
        record: Attempt | None = None
        state: AttemptTelemetry | None = None
        startable: JobEntry | None = None
        for progress in reports:
            job_id, attempt, step = progress.job_id, progress.attempt, progress.step
            if key != (job_id, attempt):
                key = (job_id, attempt)
                entry = jobs.get(job_id)
                record = entry.attempts.get(attempt) if entry is not None else None
                state = attempts.get(job_id)
                if state is not None and state.attempt != attempt:
                    state = None
                live = running.get(job_id)
                startable = live if live is not None and live.job.attempt == attempt else None
            if record is None:
                continue
            wall = stamp_wall(progress.last_progress_time)
            if wall > record.last_progress_wall:
                record.last_progress_wall = wall
            if state is None:
                if startable is None or not step:
                    continue
                state = self._start(startable)
            rank = progress.rank
            if step > (steps.step if (steps := state.ranks.get(rank)) is not None else 0):
                scalars = progress.scalars if rank == 0 else NO_SCALARS  # only rank 0's are kept
                job_telemetry.rank_progress(state, rank, step, progress.samples, progress.step_seconds, wall, scalars)

    def _start(self, entry: JobEntry) -> AttemptTelemetry:
        """A new attempt's telemetry; the job's figures of the attempt before are cleared (not its stragglers)."""
        job = entry.job
        stragglers = list(job.telemetry.stragglers)
        job.ClearField("telemetry")
        job.telemetry.stragglers.extend(stragglers)
        state = self.attempts[job.job_id] = AttemptTelemetry(job.job_id, job.attempt)
        return state

    def window(self) -> None:
        """One window over every running attempt."""
        now = self.manager.now()
        for job_id in [job_id for job_id in self.attempts if job_id not in self.manager.running]:
            del self.attempts[job_id]
        for entry in list(self.manager.running.values()):
            attempt = entry.current
            if attempt is None or attempt.state is not AttemptState.RUNNING:
                continue
            state = self.attempts.get(entry.job.job_id)
            if state is None or state.attempt != attempt.attempt:
                state = self._start(entry)
            excluded = len(entry.job.excluded_device_uuids)
            samples = list(self._samples(attempt.devices()))
            utilizations = [utilization for utilization, _ in samples]
            self._account(entry, state, utilizations, [memory for _, memory in samples], now.wall)
            self.manager.apply(job_telemetry.window(entry, attempt, state, utilizations, now, self.config, self.manager.machine))
            if len(entry.job.excluded_device_uuids) != excluded:
                self.manager.scheduling.request_changed(entry.job.job_id)

    def _account(
        self, entry: JobEntry, state: AttemptTelemetry, utilizations: list[float], memory: list[int], wall: float
    ) -> None:
        """Adds this window's sample to the attempt's usage record (Attempt.usage; stored with the job's next write).
        A sample covers the time since the one before, at most two windows: a gap (a restart) is not filled in."""
        record = entry.job.attempts[-1] if entry.job.attempts else None
        if record is None or record.attempt != state.attempt:
            return
        covered = min(wall - state.last_sample_wall, 2 * self.window_seconds) if state.last_sample_wall else self.window_seconds
        state.last_sample_wall = wall
        usage_report.sample(record, utilizations, memory, covered)

    def _samples(self, devices: list[tuple[str, str]]) -> Iterator[tuple[float, int]]:
        """(utilisation, memory used) latest of each of these GPUs whose node is READY and has sampled it."""
        nodes = self.cluster.nodes
        for node_id, uuid in devices:
            node = nodes.get(node_id)
            if node is None or node.liveness.state is not Liveness.READY:
                continue
            device = node.devices.get(uuid)
            if device is not None and device.sample is not None:
                yield device.sample[GPU_UTILIZATION], int(device.sample[MEMORY_USED])

    def running(self) -> Iterator[tuple[job_pb2.Job, AttemptTelemetry]]:
        """Each running job with its attempt's telemetry (for the metrics)."""
        for job_id, state in self.attempts.items():
            entry = self.manager.running.get(job_id)
            if entry is not None:
                yield entry.job, state

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.window_seconds)
            self.window()
