"""The job manager: the index of jobs, the API on it (submit, cancel, priority, watch, list, logs),
and the applier of what the job rules decide.

Every decision about a job's life is made by coordinator/rules/job_machine.py over the plain data
of coordinator/model/; this class feeds it events (agents' reports, liveness transitions, a GPU
turning unhealthy, the passage of time) and applies the effects it returns: messages to agents
(control/node_links.py), store writes, watchers, the scheduling loop (control/scheduling_loop.py),
fences (control/reconcile.py). GPU ownership lives in one place, `cluster.allocations`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

from coordinator import scheduler
from coordinator.control import reconcile
from coordinator.control.arrays import Arrays
from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.job_history import JobHistory
from coordinator.control.job_writes import JobWrites
from coordinator.control.node_links import LOG_CHUNK_BYTES, NodeLinks, stop_message
from coordinator.control.scheduling_loop import SchedulingLoop
from coordinator.model import jobs as job_queries
from coordinator.model.cluster import Transition
from coordinator.model.jobs import FINAL_STATES, JobEntry
from coordinator.rules import job_machine, job_rules, recovery
from coordinator.rules.effects import (
    AllStarted,
    AttemptFailed,
    AttemptOver,
    Effect,
    Fence,
    Finished,
    Launch,
    Notify,
    Preempted,
    QueueChanged,
    Release,
    Save,
    Stop,
    Wake,
)
from coordinator.rules.health import DeviceHealth
from coordinator.rules.liveness import Liveness
from coordinator.rules.quotas import QuotaPolicy, pending_quota_problem
from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, JobStore
from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, job_pb2

log = get_logger("coordinator.jobs")

KEPT_TIMINGS = 1000
__all__ = ["LOG_CHUNK_BYTES", "JobFinished", "JobManager", "JobNotFound", "NoSuchRank", "QuotaExceeded"]


class JobNotFound(KeyError):
    pass


class NoSuchRank(LookupError):
    """A log was asked of a rank the attempt does not have."""


class QuotaExceeded(Exception):
    """A limit on what one user may queue was reached; the message names the limit."""


class JobFinished(ValueError):
    """The job is already final."""


def _state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


class JobManager:
    def __init__(
        self,
        cluster: ClusterView,
        store: JobStore,
        *,
        config: scheduler.SchedulerConfig | None = None,
        recovery_policy: recovery.RecoveryPolicy | None = None,
        stop_grace_seconds: float = 10.0,
        preemption_grace_seconds: float = 30.0,
        launch_timeout_seconds: float = 0.0,
        node_grace_period: float = 10.0,
        checkpoint_root: str = "",
        rendezvous_ports: tuple[int, int] = (20000, 30000),
        max_pending_jobs_per_user: int = 0,
        quotas: QuotaPolicy | None = None,
        estimates: Estimates | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        recent_ended_jobs: int = RECENT_ENDED_JOBS,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.clock = clock
        policy = recovery_policy or recovery.RecoveryPolicy()
        self.machine = job_machine.MachineConfig(
            policy, stop_grace_seconds, checkpoint_root, preemption_grace_seconds, launch_timeout_seconds
        )
        self.node_grace_period = node_grace_period
        self.max_pending_jobs_per_user = max_pending_jobs_per_user
        self.quotas = quotas or QuotaPolicy()  # per user and group (rules/quotas.py): pending at submit, the job's group
        self.epoch = 0  # the coordinator epoch, from the store once started
        self.jobs: dict[str, JobEntry] = {}
        self.pending: dict[str, JobEntry] = {}
        """Jobs waiting for placement (new, or restarting), in submission order: those in PENDING."""
        self.running: dict[str, JobEntry] = {}  # those in RUNNING: hang checks look at these, not at every job ever
        self.backoffs: dict[str, float] = {}
        """Pending job id -> the end of its restart backoff, read from the job once as it enters the queue (the
        rules set it only then): every pass looks at every pending job, and message fields are slow to read."""
        self.pending_by_owner: dict[str, int] = {}  # owner -> how many of `pending` are theirs, for max_pending_jobs_per_user
        self.by_request_id: dict[tuple[str, str], JobEntry] = {}  # (owner, client_request_id) -> the job it made, per user
        self.watchers: dict[str, set[asyncio.Queue[job_pb2.Job]]] = {}
        self.expected_nodes: dict[str, float] = {}  # after a coordinator restart: node id -> when it must re-register
        self.take_in_progress: Callable[[], None] = lambda: None  # JobTelemetry.take_in: progress stamps kept, not read
        self._sequence = itertools.count(1)
        self.links = NodeLinks(cluster)
        config, rng = config or scheduler.SchedulerConfig(), rng or random.Random()
        self.scheduling = SchedulingLoop(self, cluster, config, rendezvous_ports, rng, clock.monotonic, estimates)
        self.arrays = Arrays(self)  # job arrays and dependencies (control/arrays.py): hooked in where jobs change
        self.restarts_by_reason: dict[str, int] = {}
        self.launch_latencies: list[float] = []  # recent placement -> every rank's process started, in seconds
        self.writes = JobWrites(store)
        self.history = JobHistory(self, recent_ended_jobs)  # which ended jobs stay in memory; reads of those that left
        self._appliers = self._applier_table()
        cluster.listeners.append(self._on_transition)
        cluster.device_listeners.append(self._on_device_unhealthy)

    def now(self) -> job_machine.Now:
        return job_machine.Now(self.clock.wall(), self.clock.monotonic())

    # -- what the scheduling loop keeps, for metrics and benchmarks --

    @property
    def placements(self) -> int:
        return self.scheduling.placements

    @property
    def decision_seconds(self) -> list[float]:
        return self.scheduling.decision_seconds

    async def run(self) -> None:
        await self.scheduling.run()

    async def schedule_pass(self) -> list[str]:
        return await self.scheduling.schedule_pass()

    def node_views(self) -> list[scheduler.NodeView]:
        return self.scheduling.node_views()

    # -- start-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the store and restores what it knew (control/reconcile.py); agents' registrations settle the rest."""
        state = await self.store.open()
        self.epoch = state.epoch
        self.cluster.drained.update(state.drains)
        reconcile.restore(self, state)
        self.history.restored(sum(stored.job.state in FINAL_STATES for stored in state.jobs))
        log.info("jobs loaded", jobs=len(self.jobs), pending=len(self.pending), expected_nodes=len(self.expected_nodes))
        self.scheduling.wake.set()

    def restored(self, entry: JobEntry, highest_sequence: int) -> None:
        """Indexes a job loaded from the store; new jobs are numbered after the highest."""
        self._index(entry)
        self._sequence = itertools.count(highest_sequence + 1)

    def _index(self, entry: JobEntry) -> None:
        self.jobs[entry.job.job_id] = entry
        if entry.client_request_id:
            self.by_request_id[(entry.job.spec.owner, entry.client_request_id)] = entry
        self._queue_follows_state(entry)

    def _queue_follows_state(self, entry: JobEntry) -> None:
        """`pending` holds exactly the PENDING jobs, `running` the RUNNING ones."""
        job = entry.job
        job_id, owner, state = job.job_id, job.spec.owner, job.state
        if state == job_pb2.JOB_STATE_PENDING:
            if job_id not in self.pending:
                self.pending[job_id] = entry
                self.pending_by_owner[owner] = self.pending_by_owner.get(owner, 0) + 1
                if job.HasField("restart_not_before"):
                    self.backoffs[job_id] = entry.not_before
                self.scheduling.queue_changed(job_id, restarting=bool(job.pending_restart_reason))
        elif self.pending.pop(job_id, None) is not None:
            self.backoffs.pop(job_id, None)
            left = self.pending_by_owner.get(owner, 0) - 1
            if left > 0:
                self.pending_by_owner[owner] = left
            else:
                self.pending_by_owner.pop(owner, None)
            self.scheduling.queue_changed(job_id)
        if state == job_pb2.JOB_STATE_RUNNING:
            self.running[job_id] = entry
        else:
            self.running.pop(job_id, None)
        self.arrays.state_changed(entry)  # first: history asks the arrays whether a task may leave memory
        if state in FINAL_STATES:
            self.scheduling.forget(job_id)
            self.history.job_ended(entry)

    # -- effects -----------------------------------------------------------------------------

    def apply(self, effects: Iterable[Effect]) -> asyncio.Future[None] | None:
        """Applies the rules' effects in order, the jobs to save as one write after the rest (control/job_writes.py):
        one event's effects may save a job twice, or several. Returns that write, if any (it is watched)."""
        appliers = self._appliers
        for effect in effects:
            appliers[type(effect)](effect)
        write = self.writes.save_unsaved()
        self.history.evict()
        return write

    def _applier_table(self) -> dict[type, Callable[[Any], object]]:
        send, jobs, ask, wake = self.links.send, self.jobs, self.writes.ask, self.scheduling.wake
        return {
            Save: lambda effect: ask(jobs[effect.job_id]),
            Wake: lambda effect: wake.set(),
            Notify: lambda effect: self._notify(jobs[effect.job_id]),
            QueueChanged: lambda effect: self._queue_follows_state(jobs[effect.job_id]),
            Launch: lambda effect: send(effect.node_id, effect.message),
            Stop: lambda effect: send(
                effect.node_id, stop_message(effect.job_id, effect.attempt, effect.grace_seconds, effect.reason)
            ),
            AttemptOver: lambda effect: self.writes.after_durable(lambda: self.links.forget(effect)),
            Fence: lambda effect: reconcile.fence(self, effect),
            Release: lambda effect: self.scheduling.ports.release(effect.node_id, effect.port),
            AttemptFailed: self._attempt_failed,
            Preempted: self.scheduling.preempted,
            Finished: lambda effect: self.scheduling.finished(self.jobs[effect.job_id], effect.state, effect.reason),
            AllStarted: self._all_started,
        }

    def _attempt_failed(self, effect: AttemptFailed) -> None:
        log.warning("attempt failed", job=effect.job_id, attempt=effect.attempt, code=effect.code, reason=effect.reason)
        if effect.restart:
            self.restarts_by_reason[effect.kind] = self.restarts_by_reason.get(effect.kind, 0) + 1

    def _all_started(self, effect: AllStarted) -> None:
        self.launch_latencies.append(effect.seconds)
        del self.launch_latencies[:-KEPT_TIMINGS]

    def save(self, entries: Iterable[JobEntry] = ()) -> asyncio.Future[None]:
        """One write: the jobs the rules asked to save since the last, then `entries`; its failure is logged and counted."""
        write = self.writes.save(entries)
        self.history.evict()
        return write

    def _notify(self, entry: JobEntry) -> None:
        for watcher in self.watchers.get(entry.job.job_id, ()):
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(entry.job)
            watcher.put_nowait(snapshot)

    # -- the API -----------------------------------------------------------------------------

    async def submit(self, spec: job_pb2.JobSpec, client_request_id: str = "") -> str:
        """Validates, stores durably, queues; returns the job id. Raises job_rules.InvalidSpec, QuotaExceeded."""
        earlier = await self.history.find_request(spec.owner, client_request_id) if client_request_id else None
        if earlier is not None:  # (checked again after the store's answer: a submission may have indexed it meanwhile)
            return earlier.job.job_id
        spec = job_rules.normalized(spec)
        job_rules.validate_spec(spec)
        problem = pending_quota_problem(self.quotas, spec.owner, self.pending_by_owner, self.max_pending_jobs_per_user)
        if problem is not None:
            raise QuotaExceeded(problem)
        sequence = next(self._sequence)
        job = job_pb2.Job(
            job_id=job_rules.new_job_id(sequence),
            spec=spec,
            state=job_pb2.JOB_STATE_PENDING,
            reason="queued; waiting for the scheduler",
            submit_time=job_machine.stamp(self.clock.wall()),
        )
        entry = JobEntry(sequence, job, client_request_id)
        self._index(entry)
        self.scheduling.wake.set()
        await self.save([entry])
        log.info("job submitted", job=job.job_id, gpus=spec.gpus, owner=spec.owner, name=spec.name)
        return job.job_id

    def get(self, job_id: str) -> JobEntry:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        return entry

    async def find(self, job_id: str) -> JobEntry:
        """The job, from memory or, one that ended long ago, from the store. Raises JobNotFound."""
        entry = await self.history.find(job_id)
        if entry is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        return entry

    async def list(
        self, query: JobQuery | None = None, page_size: int = 0, page_token: str = "", max_bytes: int = 0
    ) -> tuple[list[job_pb2.Job], str]:
        """Newest first, a page at a time, from memory (an array's tasks folded into its view, control/arrays.py)
        and the store's history (control/job_history.py)."""
        return await self.history.page(query or JobQuery(), page_size, page_token, max_bytes, self.arrays.listed())

    async def cancel(self, job_id: str, reason: str = "cancelled by user") -> job_pb2.Job:
        entry = await self.find(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {_state_name(entry.job.state)}")
        write = self.apply(job_machine.cancel(entry, self.now(), self.machine, reason))
        if write is not None:
            await write
        return entry.job

    async def set_priority(self, job_id: str, priority: int) -> job_pb2.Job:
        entry = await self.find(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {_state_name(entry.job.state)}")
        entry.job.spec.priority = priority
        self.scheduling.request_changed(job_id)
        self.scheduling.wake.set()
        await self.save([entry])
        return entry.job

    def jobs_by_state(self) -> dict[str, int]:
        return job_queries.jobs_by_state(self.jobs.values())

    async def read_log(
        self, job_id: str, rank: int, attempt: int, offset: int, max_bytes: int = LOG_CHUNK_BYTES
    ) -> agent_pb2.LogChunk:
        """Reads part of a rank's log from its node. Raises LookupError (NoSuchRank for a rank the attempt
        does not have) or ConnectionError, with a reason."""
        entry = await self.find(job_id)
        attempt = attempt or entry.job.attempt
        if attempt == 0:
            raise LookupError(f"job {job_id} has not started yet; it has no logs")
        node_id = entry.node_of_rank(attempt, rank)
        if node_id is None:
            raise NoSuchRank(f"job {job_id} has no rank {rank} in attempt {attempt}")
        read = agent_pb2.ReadLogs(job_id=job_id, attempt=attempt, rank=rank, offset=offset, max_bytes=max_bytes)
        return await self.links.read_log(node_id, read)

    def on_log_chunk(self, node_id: str, chunk: agent_pb2.LogChunk) -> None:
        self.links.on_log_chunk(node_id, chunk)

    async def persist_drain(self, node_id: str, reason: str | None) -> None:
        await self.store.save(drains={node_id: reason})

    # -- events ------------------------------------------------------------------------------

    def on_register(self, node_id: str, register: agent_pb2.Register) -> None:
        """Reconciles what a (re-)registered agent runs with what the coordinator expects (control/reconcile.py)."""
        reconcile.reconcile(self, node_id, register)

    def on_task_status(self, node_id: str, status: agent_pb2.TaskStatus) -> None:
        allocations = self.cluster.allocations
        ended = status.state != agent_pb2.TASK_STATE_RUNNING
        if ended and allocations.fencing and allocations.fence_confirmed(node_id, (status.job_id, status.attempt, status.rank)):
            self.scheduling.wake.set()
        entry, now = self.jobs.get(status.job_id), job_machine.Now(self.clock.wall(), self.clock.monotonic())
        self.arrays.record_result(entry, status)  # a reported result goes with the job's write of this end
        self.apply(job_machine.rank_reported(entry, node_id, status, now, allocations, self.machine))
        if ended:  # `at`: when its GPU came free as the scheduler sees it (tests replay a run's rank ends in the simulator)
            log.debug("rank ended", job=status.job_id, attempt=status.attempt, rank=status.rank, node=node_id, at=now.wall)

    def _on_transition(self, transition: Transition) -> None:
        if transition.after is Liveness.DOWN:
            self._node_lost(transition.node_id, f"node {transition.node_id} is down: {transition.reason}")
        self.scheduling.wake.set()

    def _on_device_unhealthy(self, node_id: str, uuid: str, health: DeviceHealth) -> None:
        holder = self.cluster.allocations.get(uuid)
        entry = self.jobs.get(holder[0]) if holder is not None else None
        if entry is not None and holder is not None and entry.job.attempt == holder[1]:
            self.apply(job_machine.device_unhealthy(entry, node_id, uuid, health.reason, self.now(), self.machine))

    def expire_expected_nodes(self) -> None:
        now = self.clock.wall()
        for node_id, deadline in list(self.expected_nodes.items()):
            if now >= deadline and node_id not in self.cluster.nodes:
                del self.expected_nodes[node_id]
                self._node_lost(
                    node_id, f"node {node_id} did not come back within {self.node_grace_period:g}s of a coordinator restart"
                )

    def _node_lost(self, node_id: str, reason: str) -> None:
        self.apply(job_machine.node_lost(self.jobs.values(), node_id, reason, self.now(), self.cluster.allocations, self.machine))

    def detect_hangs(self) -> None:
        if job_machine.hung(self.running.values(), self.now()):  # mostly none: one look, not two
            self.take_in_progress()  # the heartbeats' progress is read lazily: the stamps must be fresh first
            self.apply(job_machine.detect_hangs(self.running.values(), self.now(), self.machine))
