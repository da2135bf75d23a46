"""Keeps each running attempt's step telemetry from the agents' heartbeats and, every window, applies the
decisions of coordinator/rules/job_telemetry.py (stragglers, idleness) through the job manager.

It also keeps each attempt's progress stamp, which hang detection reads: one pass over the reports serves
both. A heartbeat's reports are not read when it comes, only kept (the node's latest replaces the one
before), and taken in once per window, a slice of nodes at a time, and whenever an attempt looks hung. A
rank's report repeats its latest step until the rank writes its next, and steps and stamps only grow, so
the latest report of each node says what all of that window's did: the rates are taken over the window,
and the step-time histogram counts each step, at the step time last reported. With every rank of 2,000
nodes reporting, reading every report of every heartbeat cost the coordinator as much again as the
heartbeats themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Sequence

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.model.job_telemetry import AttemptTelemetry
from coordinator.model.jobs import Attempt, AttemptState, JobEntry
from coordinator.model.telemetry import GPU_UTILIZATION, MEMORY_USED
from coordinator.rules import job_telemetry, usage_report
from coordinator.rules.job_telemetry import TelemetryConfig
from coordinator.rules.liveness import Liveness
from gpuorch.clock import stamp_seconds
from gpuorch.v1 import agent_pb2, job_pb2

SLICE = 50
"""Nodes whose kept reports are taken in, or jobs a window judges, between two yields to the event loop: at 2,000
nodes of 8 ranks, either in one go would hold the loop for a tenth of a second, and slices of 200 still left
heartbeats waiting 0.3 s at p99 behind them (bench/heartbeats.py --progress; 50: 0.1-0.2 s)."""
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
        self.unread: dict[str, Sequence[agent_pb2.RankProgress]] = {}
        """Node id -> the rank reports of its latest heartbeat, not taken in yet."""
        self._backlog: deque[Sequence[agent_pb2.RankProgress]] = deque()
        """Reports a take-in in slices has yet to reach (any take-in finishes them first)."""

    def on_progress(self, node_id: str, reports: Sequence[agent_pb2.RankProgress]) -> None:
        """A heartbeat's rank reports: kept until they are taken in (a node's latest replaces those before)."""
        self.unread[node_id] = reports

    def take_in(self) -> None:
        """Takes in every node's kept reports now (before a hang is judged)."""
        self._backlog.extend(self.unread.values())
        self.unread = {}
        while self._backlog:
            self._take_in(self._backlog.popleft())

    async def take_in_unhurried(self) -> None:
        """take_in, yielding to the event loop between slices of nodes. Reports that come meanwhile are kept for the
        next take-in; one taken in after a later one changes nothing (steps and stamps only grow)."""
        self._backlog.extend(self.unread.values())
        self.unread = {}
        while self._backlog:
            for _ in range(min(SLICE, len(self._backlog))):
                self._take_in(self._backlog.popleft())
            if self._backlog:
                await asyncio.sleep(0)

    def _take_in(self, reports: Sequence[agent_pb2.RankProgress]) -> None:
        """One heartbeat's rank reports: each attempt's progress stamp (hang detection) and, for a running
        attempt, its step telemetry. A heartbeat's reports (all of one attempt, usually) cost one lookup of the
        job and attempt per run of reports of the same attempt, one stamp conversion and one read of each field
        per report."""
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
            wall = stamp_seconds(progress.last_progress_time)
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
        for _ in self._window_in_slices():
            pass

    def _window_in_slices(self) -> Iterator[None]:
        """window, pausing after each SLICE jobs (run() lets the event loop in there: a window over 2,000 jobs
        costs a tenth of a second); a job that ended meanwhile has no RUNNING attempt, and is skipped."""
        now, running = self.manager.now(), self.manager.running
        for job_id in [job_id for job_id in self.attempts if job_id not in running]:
            del self.attempts[job_id]
        for index, entry in enumerate(list(running.values())):
            if index and index % SLICE == 0:
                yield
                now = self.manager.now()
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
            await self.take_in_unhurried()
            for _ in self._window_in_slices():
                await asyncio.sleep(0)
