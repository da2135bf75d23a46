"""The discrete-event replay: a trace through the coordinator's own scheduling path, on simulated time.

What runs is what the coordinator runs: a `ClusterView` and a `JobManager` (coordinator/control/) over
the in-memory store, on a `FakeClock`, with a seeded random source, in one asyncio loop. Simulated
nodes register through `ClusterView.register`; jobs are submitted through `JobManager.submit` at their
submit times; at every event time (a submit, a rank's end, a restart backoff's end) the engine calls
`SchedulingLoop.step()`, the body of the coordinator's scheduling loop. No gRPC, no processes, no
liveness loop (nodes stay READY, so no heartbeats are needed).

A simulated agent answers what the coordinator queues for it (the sessions' outboxes): a LaunchTask
with RUNNING for each rank and, once the job's remaining run time has passed, EXITED with code 0; a
StopTask (a preemption) ends the attempt's ranks at once with SIGTERM. The job keeps the work done
(less the preemption cost it had to pay first), and each later attempt runs what is left plus
`preemption_cost` seconds (restoring from a checkpoint).

Pools: each pool gets its own ClusterView and JobManager (a `Cell`), since a job only ever runs in its
own pool: every pass then sees only that pool's nodes and queue.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence

from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.job_manager import JobManager, QuotaExceeded
from coordinator.rules import job_rules
from coordinator.rules.liveness import LivenessPolicy
from coordinator.sim.records import AttemptRun, Cell, JobRecord, Outcome, Refusal, SimSettings
from coordinator.sim.traces import TraceJob
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2

SIGTERM = 15
GPU_MODEL = "Simulated GPU 80GB"
GPU_MEMORY_BYTES = 80 * 2**30
MAX_PASSES_PER_INSTANT = 1000
"""Passes at one simulated instant (each stop may free GPUs for another): more means a livelock."""

_SUBMIT, _WAKE, _EXIT, _ACTION = 0, 1, 2, 3
"""Event kinds, in the order events of one instant are handled."""


class Replay:
    """Replays `jobs` (submit times in seconds from the start) under `settings`; `run()` once."""

    def __init__(self, jobs: Sequence[TraceJob], settings: SimSettings, cpu_timer: Callable[[], float] = time.process_time):
        self.jobs = list(jobs)
        self.settings = settings
        self.cpu_timer = cpu_timer
        """Times the scheduling steps (the process's CPU time, not the simulated clock)."""
        self.clock = FakeClock()
        self.origin = self.clock.wall()
        self.rng = random.Random(settings.seed)
        self.cells: dict[str, Cell] = {}
        self.events: list[tuple[float, int, int, object]] = []
        self._sequence = itertools.count()
        self.records: dict[str, JobRecord] = {}
        self.refused: list[Refusal] = []
        self.runs: dict[str, dict[int, AttemptRun]] = {}
        """Job id -> attempt -> the attempt the simulated agents run (until it ends)."""
        self.wakes: dict[str, float] = {}
        """Pool -> the time of the wake event already queued for its earliest backoff end."""
        self.cpu_seconds = 0.0
        self.passes = 0

    def now(self) -> float:
        return self.clock.wall() - self.origin

    def _push(self, at: float, kind: int, payload: object) -> None:
        heapq.heappush(self.events, (at, kind, next(self._sequence), payload))

    # -- building the coordinator's parts -------------------------------------------------------

    async def _build(self) -> None:
        for pool, (nodes, per_node) in self.settings.pools.items():
            cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=self.clock)
            manager = JobManager(
                cluster,
                MemoryJobStore(),
                config=self.settings.scheduler,
                recovery_policy=self.settings.recovery,
                max_pending_jobs_per_user=0,
                quotas=self.settings.coordinator.quota_policy(),
                # Prediction as the coordinator runs it (learning from the jobs that end); the start-time
                # forecast is the loop's side task, which a replay does not run.
                estimates=Estimates(self.settings.coordinator.runtime_predictor()),
                clock=self.clock,
                rng=random.Random(self.rng.random()),
            )
            sessions = []
            for n in range(nodes):
                node_id = f"{pool}-{n:04d}"
                address = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
                register = agent_pb2.Register(node_id=node_id, hostname=node_id, addresses=[address])
                for index in range(per_node):
                    register.devices.add(
                        uuid=f"GPU-{node_id}-{index}", index=index, name=GPU_MODEL, memory_total_bytes=GPU_MEMORY_BYTES
                    )
                _, session, _ = cluster.register(register)
                sessions.append(session)
            await manager.start()
            self.cells[pool] = Cell(pool, cluster, manager, sessions, nodes * per_node)

    def _spec(self, job: TraceJob) -> job_pb2.JobSpec:
        return job_pb2.JobSpec(
            argv=["sim", job.name],
            name=job.name,
            owner=job.owner,
            gpus=job.gpus,
            gpus_per_node=job.gpus_per_node,
            priority=job.priority,
            estimated_runtime_seconds=math.ceil(job.duration) if self.settings.oracle else 0,  # whole seconds on the wire
        )

    # -- the replay -----------------------------------------------------------------------------

    async def run(self) -> Outcome:
        await self._build()
        for job in self.jobs:
            self._push(job.submit_time, _SUBMIT, job)
        while self.events:
            at = self.events[0][0]
            if at > self.now():
                self.clock.advance(at - self.now())
            due: dict[str, Cell] = {}
            while self.events and self.events[0][0] <= at:
                _, kind, _, payload = heapq.heappop(self.events)
                cell = await self._handle(kind, payload)
                if cell is not None:
                    due[cell.pool] = cell
            for cell in due.values():
                await self._settle(cell)
        placements = sum(cell.manager.placements for cell in self.cells.values())
        return Outcome(
            list(self.records.values()),
            self.refused,
            dict(self.settings.pools),
            {pool: cell.timeline for pool, cell in self.cells.items()},
            self.cpu_seconds,
            self.passes,
            placements,
            self.now(),
        )

    def at(self, seconds: float, pool: str, action: Callable[[Cell], object]) -> None:
        """Calls `action(cell)` at `seconds` of simulated time (before run(), or from another action); the pool's
        scheduling step follows. For what-if scripts and tests: an operator's cancel, a drain."""
        self._push(seconds, _ACTION, (pool, action))

    async def _handle(self, kind: int, payload: object) -> Cell | None:
        if kind == _ACTION:
            assert isinstance(payload, tuple)
            cell, action = self.cells[payload[0]], payload[1]
            result = action(cell)
            if inspect.isawaitable(result):
                await result
            return cell
        if kind == _SUBMIT:
            assert isinstance(payload, TraceJob)
            return await self._submit(payload)
        if kind == _WAKE:
            assert isinstance(payload, str)
            self.wakes.pop(payload, None)
            return self.cells[payload]
        assert isinstance(payload, AttemptRun)
        return self._exit(payload)

    async def _submit(self, job: TraceJob) -> Cell | None:
        cell = self.cells.get(job.pool)
        if cell is None:
            self.refused.append(Refusal(job, "unknown_pool", f"pool {job.pool!r} is not simulated"))
            return None
        if job.gpus > cell.gpus:
            self.refused.append(Refusal(job, "larger_than_pool", f"needs {job.gpus} GPUs; pool {job.pool} has {cell.gpus}"))
            return None
        try:
            job_id = await cell.manager.submit(self._spec(job))
        except (job_rules.InvalidSpec, QuotaExceeded) as error:
            self.refused.append(Refusal(job, "invalid", str(error)))
            return None
        self.records[job_id] = JobRecord(job, self.now(), work_left=job.duration)
        return cell

    def _exit(self, run: AttemptRun) -> Cell | None:
        """The attempt's ranks exit with code 0: each at its time where the trace gives them, else all at once,
        or (rank_end_spacing) one at a time in rank order."""
        if run.stopped or not run.ranks:
            return None  # stopped before it could finish
        spacing = self.settings.rank_end_spacing
        now = self.now()
        if run.rank_ends:
            by = now + 1e-6  # this event's time, which the clock reads back within rounding
            ending = {node: due for node, ranks in run.ranks.items() if (due := [r for r in ranks if run.rank_ends[r] <= by])}
        elif spacing > 0:
            node_id, rank = min(((node, rank) for node, ranks in run.ranks.items() for rank in ranks), key=lambda item: item[1])
            ending = {node_id: [rank]}
        else:
            ending = dict(run.ranks)
        for node_id, ranks in ending.items():
            left = [rank for rank in run.ranks[node_id] if rank not in ranks]
            if left:
                run.ranks[node_id] = left
            else:
                del run.ranks[node_id]
            run.cell.busy -= len(ranks)
            for rank in ranks:
                status = agent_pb2.TaskStatus(
                    job_id=run.job_id, attempt=run.attempt, rank=rank, state=agent_pb2.TASK_STATE_EXITED, exit_code=0
                )
                run.cell.manager.on_task_status(node_id, status)
        if run.ranks:
            later = [run.rank_ends[rank] for ranks in run.ranks.values() for rank in ranks] if run.rank_ends else []
            self._push(min(later) if later else now + spacing, _EXIT, run)
            return run.cell
        self._ended(run)
        self._forget(run)
        record = self.records[run.job_id]
        record.work_left = 0.0
        record.end = self.now()
        return run.cell

    def _forget(self, run: AttemptRun) -> None:
        attempts = self.runs.get(run.job_id, {})
        attempts.pop(run.attempt, None)
        if not attempts:
            self.runs.pop(run.job_id, None)

    def _ended(self, run: AttemptRun) -> None:
        run.end = self.now()
        self.records[run.job_id].runs.append((run.start, run.end, run.gpus))

    async def _settle(self, cell: Cell) -> None:
        """Passes at this instant until one changes nothing the agents must answer; then the next wake."""
        for _ in range(MAX_PASSES_PER_INSTANT):
            started = self.cpu_timer()
            await cell.manager.scheduling.step()
            self.cpu_seconds += self.cpu_timer() - started
            self.passes += 1
            if not self._answer(cell):
                break
        else:
            raise RuntimeError(f"pool {cell.pool}: {MAX_PASSES_PER_INSTANT} passes at t={self.now():.0f}s without settling")
        point = (self.now(), bool(cell.manager.pending), cell.busy)
        if not cell.timeline or cell.timeline[-1][1:] != point[1:]:
            cell.timeline.append(point)
        self._queue_wake(cell)

    def _queue_wake(self, cell: Cell) -> None:
        """Restart backoffs end without an event of their own: the coordinator's loop wakes for them."""
        now = self.now()
        ends = [not_before - self.origin for not_before in cell.manager.backoffs.values() if not_before - self.origin > now]
        if not ends:
            return
        at = min(ends)
        queued = self.wakes.get(cell.pool)
        if queued is None or at < queued:
            self.wakes[cell.pool] = at
            self._push(at, _WAKE, cell.pool)

    def _answer(self, cell: Cell) -> bool:
        """The simulated agents answer their outboxes; True if a rank ended (another pass may place more)."""
        ended = False
        busy = True
        while busy:
            busy = False
            for session in cell.sessions:
                outbox = session.outbox
                while not outbox.empty():
                    busy = True
                    message = outbox.get_nowait()
                    if message is None:
                        continue
                    kind = message.WhichOneof("payload")
                    if kind == "launch_task":
                        self._launch(cell, session.node_id, message.launch_task)
                    elif kind == "stop_task":
                        ended |= self._stop(cell, session.node_id, message.stop_task)
        return ended

    def _launch(self, cell: Cell, node_id: str, launch: agent_pb2.LaunchTask) -> None:
        attempts = self.runs.setdefault(launch.job_id, {})
        run = attempts.get(launch.attempt)
        record = self.records[launch.job_id]
        if run is None:
            overhead = self.settings.preemption_cost if record.preemptions else 0.0
            run = attempts[launch.attempt] = AttemptRun(cell, launch.job_id, launch.attempt, self.now(), overhead)
            record.attempts += 1
            if record.first_start is None:
                record.first_start = self.now()
            if record.trace.rank_ends and record.attempts == 1:  # as recorded: the first attempt's ranks, each at its end
                run.rank_ends = {rank: self.now() + end for rank, end in enumerate(record.trace.rank_ends)}
                self._push(min(run.rank_ends.values()), _EXIT, run)
            else:
                self._push(self.now() + overhead + record.work_left, _EXIT, run)
        ranks = [rank.rank for rank in launch.ranks]
        run.ranks[node_id] = ranks
        run.gpus += len(ranks)
        cell.busy += len(ranks)
        for rank in ranks:
            status = agent_pb2.TaskStatus(
                job_id=launch.job_id, attempt=launch.attempt, rank=rank, state=agent_pb2.TASK_STATE_RUNNING
            )
            cell.manager.on_task_status(node_id, status)

    def _stop(self, cell: Cell, node_id: str, stop: agent_pb2.StopTask) -> bool:
        """Ends the ranks of the job's attempts up to `stop.attempt` (0: all) on the node, by SIGTERM."""
        ended = False
        for attempt, run in list(self.runs.get(stop.job_id, {}).items()):
            if stop.attempt and attempt > stop.attempt:
                continue
            ranks = run.ranks.pop(node_id, [])
            if not ranks:
                continue
            cell.busy -= len(ranks)
            if run.end is None:
                self._ended(run)
                run.stopped = True
                record = self.records[run.job_id]
                record.preemptions += 1
                progress = self.now() - run.start - run.overhead
                record.work_left = max(0.0, record.work_left - max(0.0, progress))
            for rank in ranks:
                status = agent_pb2.TaskStatus(
                    job_id=run.job_id, attempt=attempt, rank=rank, state=agent_pb2.TASK_STATE_EXITED, signal=SIGTERM
                )
                cell.manager.on_task_status(node_id, status)
            ended = True
            if not run.ranks:
                self._forget(run)
        return ended
