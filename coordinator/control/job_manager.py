"""The job manager: the durable queue, scheduling passes, launches, and recovery from failures.

It applies decisions made by pure code — coordinator/scheduler.py (placement),
coordinator/jobs.py (environments, what an exit means), coordinator/recovery.py
(restart or give up) — and does the I/O around them: the store, the agent
sessions, the watchers.

GPU ownership lives in one map, `cluster.allocations` (device uuid -> (job id,
attempt)). A device is taken when an attempt is placed and given back when the
rank on it reports its end, or its node is declared DOWN; no device is ever
given to two attempts. Every launch and stop carries (job id, attempt), and a
rank of an attempt the coordinator no longer runs is stopped wherever it shows
up (fencing); until its end is confirmed (its end reported, or a registration
of its node without it), the GPU it ran on stays held in `cluster.allocations`
under that stale attempt, so nothing new starts beside it.

A job runs one attempt at a time: a restart is placed only once every rank of
the previous attempt has reported its end, or was given up with its DOWN node.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from coordinator import scheduler
from coordinator.rules import job_rules as jobs, recovery
from coordinator.model.cluster import GPU_UTILIZATION, MEMORY_USED, SAMPLE_FIELDS, TEMPERATURE, ClusterView, Transition
from coordinator.rules.liveness import Liveness
from coordinator.store.api import JobStore, StoredJob
from gpuorch.v1 import agent_pb2, job_pb2

log = structlog.get_logger("coordinator.jobs")

PERIODIC_PASS_SECONDS = 1.0
"""A scheduling pass runs at least this often (backoffs ending, hang checks, telemetry)."""
TELEMETRY_REFRESH_SECONDS = 5.0
"""A node's cached scheduler view is rebuilt for fresher telemetry at most this often (scores need
trends, not every sample); allocation, health and drain changes rebuild it at once."""
FAIR_SHARE_HALF_LIFE_SECONDS = 3600.0
LOG_READ_TIMEOUT_SECONDS = 10.0
LOG_CHUNK_BYTES = 64 * 1024
IDLE_SAMPLE = (0,) * len(SAMPLE_FIELDS)
"""What the scheduler assumes of a GPU that has not reported telemetry yet."""


LIST_ENTRY_OVERHEAD_BYTES = 8
"""What one job adds to a ListJobsResponse beyond its own encoding: the field's tag and length."""

JOB_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
JOB_ID_RANDOM_CHARACTERS = 6
"""30 random bits in every job id, so that no one can name (and plant a checkpoint directory for) the next job."""

DEFAULT_SCHEDULER_CONFIG = scheduler.SchedulerConfig()
DEFAULT_RECOVERY_POLICY = recovery.RecoveryPolicy()

RankKey = tuple[str, int, int]
"""(job id, attempt, rank)."""


def new_job_id(sequence: int) -> str:
    """`j-<sequence>-<random>`, e.g. j-000123-k7f3q2: ordered and readable by its sequence, unguessable by the rest."""
    suffix = "".join(secrets.choice(JOB_ID_ALPHABET) for _ in range(JOB_ID_RANDOM_CHARACTERS))
    return f"j-{sequence:06d}-{suffix}"


class JobNotFound(KeyError):
    pass


class QuotaExceeded(Exception):
    """A limit on what one user may queue was reached; the message names the limit."""


class JobFinished(ValueError):
    """The job is already final."""


def _stamp(wall: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(wall * 1e9))
    return stamp


def _state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


@dataclass(eq=False)
class AttemptRanks:
    """What the coordinator knows of one attempt's ranks."""

    attempt: int
    rank_node: dict[int, str] = field(default_factory=dict)
    rank_device: dict[int, str] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    """Ranks whose process started."""
    ended: dict[int, jobs.RankOutcome] = field(default_factory=dict)
    """Ranks that ended, and how."""
    launched_at: float = 0.0
    """Monotonic time the attempt was launched."""
    node_sessions: dict[str, int] = field(default_factory=dict)
    """Node id -> the id of the node's stream when the attempt was placed (0: none). A registration
    judges only ranks placed before it began, on older streams: the agent's Register cannot know of others."""
    started_wall: float = 0.0
    last_progress_wall: float = 0.0
    """Latest progress any rank reported (wall clock), 0 if none."""
    all_started_at: float = 0.0

    @property
    def world_size(self) -> int:
        return len(self.rank_node)


@dataclass(eq=False)
class JobEntry:
    sequence: int
    job: job_pb2.Job
    client_request_id: str = ""
    request: scheduler.JobRequest | None = None
    """The scheduler's view of the job, built once (rebuilt when the priority changes)."""
    attempts: dict[int, AttemptRanks] = field(default_factory=dict)
    """Attempts that may still have ranks somewhere, by number."""
    not_before: float = 0.0
    """Wall time before which the next attempt must not start (restart backoff)."""
    watchers: set[asyncio.Queue] = field(default_factory=set)

    @property
    def restart_reason(self) -> str:
        """Why the next attempt is started (GPUORCH_RESTART_REASON); empty for the first. Kept in the
        stored job itself, so that it outlives a coordinator restart during the backoff."""
        return self.job.pending_restart_reason

    def stored(self) -> StoredJob:
        return StoredJob(self.sequence, self.job, self.client_request_id)

    @property
    def final(self) -> bool:
        return self.job.state in jobs.FINAL_STATES

    @property
    def current(self) -> AttemptRanks | None:
        return self.attempts.get(self.job.attempt)


class JobManager:
    def __init__(
        self,
        cluster: ClusterView,
        store: JobStore,
        *,
        config: scheduler.SchedulerConfig = DEFAULT_SCHEDULER_CONFIG,
        recovery_policy: recovery.RecoveryPolicy = DEFAULT_RECOVERY_POLICY,
        stop_grace_seconds: float = 10.0,
        node_grace_period: float = 10.0,
        checkpoint_root: str = "",
        rendezvous_ports: tuple[int, int] = (20000, 30000),
        max_pending_jobs_per_user: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.config = config
        self.recovery_policy = recovery_policy
        self.stop_grace_seconds = stop_grace_seconds
        self.node_grace_period = node_grace_period
        self.checkpoint_root = checkpoint_root
        self.rendezvous_ports = rendezvous_ports
        self.clock = clock
        self.epoch = 0
        """The coordinator epoch, from the store once started."""
        self.jobs: dict[str, JobEntry] = {}
        self.pending: dict[str, JobEntry] = {}
        """Jobs waiting for placement (new, or restarting), in submission order."""
        self.pending_by_owner: dict[str, int] = {}
        """Owner -> how many of `pending` are theirs, for max_pending_jobs_per_user."""
        self.max_pending_jobs_per_user = max_pending_jobs_per_user
        self.by_request_id: dict[tuple[str, str], JobEntry] = {}
        """(owner, client_request_id) -> the job that submission made: one user's ids never name another's jobs."""
        self._sequence = itertools.count(1)
        self._wake = asyncio.Event()
        self._log_requests: dict[int, tuple[str, asyncio.Future]] = {}
        """Log reads awaiting their chunk: request id -> (the node asked, the answer)."""
        self._log_request_ids = itertools.count(1)
        self._expected_nodes: dict[str, float] = {}
        """After a coordinator restart: node id -> wall time by which it must re-register."""
        self._rng = random.Random()
        self._view_cache: dict[str, tuple] = {}
        """Node id -> (what its GPU views were built from, the GPU view pairs, allocation version, node view)."""
        self._allocation_versions: dict[str, int] = {}
        """Node id -> increases whenever a device on it is taken or given back."""
        self._ports_in_use: dict[str, set[int]] = {}
        """Node id -> MASTER_PORTs of running attempts whose rank 0 is on that node."""
        self._fence_holds: dict[RankKey, tuple[str, tuple[str, ...]]] = {}
        """Fenced rank not yet confirmed gone -> (its node, the devices held for it in cluster.allocations)."""
        self._fence_holders: dict[str, set[RankKey]] = {}
        """Device uuid -> the fenced ranks it is held for; the device is given back when none is left."""
        self.placements = 0
        self.restarts_by_reason: dict[str, int] = {}
        self.decision_seconds: list[float] = []
        """Duration of recent scheduling passes that placed something (for benchmarks and metrics)."""
        self.launch_latencies: list[float] = []
        """Recent placement -> every rank's process started, in seconds."""
        cluster.listeners.append(self._on_transition)
        cluster.device_listeners.append(self._on_device_unhealthy)

    # -- start-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        state = await self.store.open()
        self.epoch = state.epoch
        self.cluster.drained.update(state.drains)
        highest = 0
        now = self.clock()
        running, restarting = [], []
        for stored in state.jobs:
            entry = JobEntry(stored.sequence, stored.job, stored.client_request_id)
            highest = max(highest, stored.sequence)
            self._index(entry)
            if stored.job.state == job_pb2.JOB_STATE_PENDING and stored.job.attempts:
                entry.not_before = stored.job.restart_not_before.ToNanoseconds() / 1e9
                restarting.append(entry)
            if stored.job.state == job_pb2.JOB_STATE_RUNNING:
                running.append(entry)
        # Keep running attempts' GPUs until their agents say otherwise (they re-register with what
        # they run). Single rank ends are not stored, so two stored attempts may name one GPU: the
        # later one got it after the earlier one's rank there ended, so the later one owns it.
        # A restarting job's last attempt may still have ranks in their stop grace: its restart waits
        # until the agents report them ended, or their nodes stay away past the grace. Restored first,
        # so that a running attempt on the same GPUs (placed after those ranks ended) owns them.
        for entry in restarting:
            last = entry.job.attempts[-1]
            self._take_devices(entry, last.placement, last.attempt, restoring=True)
            for node in last.placement.nodes:
                self._expected_nodes.setdefault(node.node_id, now + self.node_grace_period)
        running.sort(key=lambda entry: entry.job.start_time.ToNanoseconds())
        for entry in running:
            self._take_devices(entry, entry.job.placement, entry.job.attempt, restoring=True)
            entry.current.started_wall = entry.current.last_progress_wall = now
            for node in entry.job.placement.nodes:
                self._expected_nodes.setdefault(node.node_id, now + self.node_grace_period)
        self._sequence = itertools.count(highest + 1)
        log.info("jobs loaded", jobs=len(self.jobs), pending=len(self.pending), expected_nodes=len(self._expected_nodes))
        self._wake.set()

    def _index(self, entry: JobEntry) -> None:
        self.jobs[entry.job.job_id] = entry
        if entry.client_request_id:
            self.by_request_id[(entry.job.spec.owner, entry.client_request_id)] = entry
        if entry.job.state == job_pb2.JOB_STATE_PENDING:
            self._enqueue(entry)

    # -- devices -----------------------------------------------------------------------------

    def _take_devices(self, entry: JobEntry, placement: job_pb2.Placement, attempt: int, restoring: bool = False) -> AttemptRanks:
        ranks = AttemptRanks(attempt, launched_at=time.monotonic())
        for node in placement.nodes:
            record = self.cluster.nodes.get(node.node_id)
            ranks.node_sessions[node.node_id] = (
                record.session.session_id if record is not None and record.session is not None else 0
            )
            for local_rank, uuid in enumerate(node.device_uuids):
                rank = node.first_rank + local_rank
                ranks.rank_node[rank] = node.node_id
                ranks.rank_device[rank] = uuid
                holder = self.cluster.allocations.get(uuid)
                if holder is not None and holder != (entry.job.job_id, attempt) and not restoring:
                    raise AssertionError(f"device {uuid} is held by {holder}; refusing to give it to {entry.job.job_id}")
                self.cluster.allocations[uuid] = (entry.job.job_id, attempt)
            self._allocation_changed(node.node_id)
        if placement.nodes:
            self._ports_in_use.setdefault(placement.nodes[0].node_id, set()).add(placement.master_port)
        entry.attempts[attempt] = ranks
        return ranks

    def _release_device(self, entry: JobEntry, ranks: AttemptRanks, rank: int) -> None:
        uuid = ranks.rank_device.get(rank)
        if uuid is not None and self.cluster.allocations.get(uuid) == (entry.job.job_id, ranks.attempt):
            del self.cluster.allocations[uuid]
            self._allocation_changed(ranks.rank_node[rank])
            self._wake.set()

    def _allocation_changed(self, node_id: str) -> None:
        self._allocation_versions[node_id] = self._allocation_versions.get(node_id, 0) + 1

    # -- the API -----------------------------------------------------------------------------

    def _enqueue(self, entry: JobEntry) -> None:
        if entry.job.job_id not in self.pending:
            owner = entry.job.spec.owner
            self.pending_by_owner[owner] = self.pending_by_owner.get(owner, 0) + 1
        self.pending[entry.job.job_id] = entry

    def _dequeue(self, job_id: str) -> None:
        entry = self.pending.pop(job_id, None)
        if entry is not None:
            owner = entry.job.spec.owner
            left = self.pending_by_owner.get(owner, 0) - 1
            if left > 0:
                self.pending_by_owner[owner] = left
            else:
                self.pending_by_owner.pop(owner, None)

    async def submit(self, spec: job_pb2.JobSpec, client_request_id: str = "") -> str:
        """Validates, stores durably, queues; returns the job id. Raises jobs.InvalidSpec, QuotaExceeded."""
        if client_request_id and (spec.owner, client_request_id) in self.by_request_id:
            return self.by_request_id[(spec.owner, client_request_id)].job.job_id
        spec = jobs.normalized(spec)
        jobs.validate_spec(spec)
        queued = self.pending_by_owner.get(spec.owner, 0)
        if self.max_pending_jobs_per_user and queued >= self.max_pending_jobs_per_user:
            raise QuotaExceeded(
                f"{spec.owner or 'the anonymous owner'} already has {queued} pending jobs; "
                f"the limit is max_pending_jobs_per_user={self.max_pending_jobs_per_user}"
            )
        sequence = next(self._sequence)
        job = job_pb2.Job(
            job_id=new_job_id(sequence),
            spec=spec,
            state=job_pb2.JOB_STATE_PENDING,
            reason="queued; waiting for the scheduler",
            submit_time=_stamp(self.clock()),
        )
        entry = JobEntry(sequence, job, client_request_id)
        self._index(entry)
        self._wake.set()
        await self.store.save([entry.stored()])
        log.info("job submitted", job=job.job_id, gpus=spec.gpus, owner=spec.owner, name=spec.name)
        return job.job_id

    def get(self, job_id: str) -> JobEntry:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        return entry

    def list(
        self, states=(), owner: str = "", page_size: int = 0, page_token: str = "", max_bytes: int = 0
    ) -> tuple[list[job_pb2.Job], str]:
        """Newest first: at most `page_size` jobs (default 100, at most 1000) and, with `max_bytes`,
        at most that many bytes encoded (but always one job), so that a page fits in one message
        however large its jobs are. The page token is the sequence number to continue below."""
        limit = min(page_size or 100, 1000)
        try:
            below = int(page_token) if page_token else math.inf
        except ValueError:
            raise ValueError(f"page_token {page_token[:32]!r} is not one this coordinator gave out") from None
        wanted = set(states)
        page: list[JobEntry] = []
        page_bytes = 0
        more = False
        for entry in reversed(self.jobs.values()):  # dicts keep insertion (= sequence) order
            if entry.sequence >= below:
                continue
            if wanted and entry.job.state not in wanted:
                continue
            if owner and entry.job.spec.owner != owner:
                continue
            job_bytes = entry.job.ByteSize() + LIST_ENTRY_OVERHEAD_BYTES if max_bytes else 0
            if len(page) == limit or (page and page_bytes + job_bytes > max_bytes > 0):
                more = True
                break
            page.append(entry)
            page_bytes += job_bytes
        return [entry.job for entry in page], (str(page[-1].sequence) if more else "")

    async def cancel(self, job_id: str) -> job_pb2.Job:
        entry = self.get(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {_state_name(entry.job.state)}")
        if entry.job.state == job_pb2.JOB_STATE_RUNNING:
            self._stop_attempt(entry, entry.job.attempt, "cancelled")
            self._end_attempt_record(entry, "cancelled by user")
        write = self._finish(entry, job_pb2.JOB_STATE_CANCELLED, "cancelled by user")
        if write is not None:
            await write
        return entry.job

    async def set_priority(self, job_id: str, priority: int) -> job_pb2.Job:
        entry = self.get(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {_state_name(entry.job.state)}")
        entry.job.spec.priority = priority
        entry.request = None
        self._wake.set()
        await self.store.save([entry.stored()])
        return entry.job

    async def watch(self, job_id: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every change of state or attempt, until it is final."""
        entry = self.get(job_id)
        updates: asyncio.Queue = asyncio.Queue()
        entry.watchers.add(updates)
        try:
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(entry.job)
            yield snapshot
            while snapshot.state not in jobs.FINAL_STATES:
                snapshot = await updates.get()
                yield snapshot
        finally:
            entry.watchers.discard(updates)

    def jobs_by_state(self) -> dict[str, int]:
        counts = {name: 0 for name in job_pb2.JobState.keys() if not name.endswith("UNSPECIFIED")}  # noqa: SIM118 - an enum wrapper, not a dict
        for entry in self.jobs.values():
            counts[job_pb2.JobState.Name(entry.job.state)] += 1
        return counts

    # -- logs --------------------------------------------------------------------------------

    async def read_log(
        self, job_id: str, rank: int, attempt: int, offset: int, max_bytes: int = LOG_CHUNK_BYTES
    ) -> agent_pb2.LogChunk:
        """Reads part of a rank's log from its node. Raises LookupError / ConnectionError with a reason."""
        entry = self.get(job_id)
        attempt = attempt or entry.job.attempt
        if attempt == 0:
            raise LookupError(f"job {job_id} has not started yet; it has no logs")
        node_id = self._node_of_rank(entry, attempt, rank)
        if node_id is None:
            raise LookupError(f"job {job_id} has no rank {rank} in attempt {attempt}")
        node = self.cluster.nodes.get(node_id)
        if node is None or node.session is None:
            raise ConnectionError(f"node {node_id}, which holds the log of rank {rank}, is not connected")
        request_id = next(self._log_request_ids)
        answer = asyncio.get_running_loop().create_future()
        self._log_requests[request_id] = (node_id, answer)
        node.session.send(
            agent_pb2.CoordinatorMessage(
                read_logs=agent_pb2.ReadLogs(
                    request_id=request_id, job_id=job_id, attempt=attempt, rank=rank, offset=offset, max_bytes=max_bytes
                )
            )
        )
        try:
            return await asyncio.wait_for(answer, LOG_READ_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ConnectionError(f"node {node_id} did not answer a log read within {LOG_READ_TIMEOUT_SECONDS:g}s") from None
        finally:
            self._log_requests.pop(request_id, None)

    def _node_of_rank(self, entry: JobEntry, attempt: int, rank: int) -> str | None:
        for record in entry.job.attempts:
            if record.attempt == attempt:
                for node in record.placement.nodes:
                    if node.first_rank <= rank < node.first_rank + len(node.device_uuids):
                        return node.node_id
        return None

    def on_log_chunk(self, node_id: str, chunk: agent_pb2.LogChunk) -> None:
        asked, answer = self._log_requests.get(chunk.request_id, ("", None))
        if answer is not None and asked == node_id and not answer.done():  # only the node asked may answer
            answer.set_result(chunk)

    # -- scheduling --------------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduler loop: a pass whenever something changed, and at least every second."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._next_timer())
            except TimeoutError:
                pass
            self._wake.clear()
            self._expire_expected_nodes()
            self._detect_hangs()
            await self.schedule_pass()

    def _next_timer(self) -> float:
        """Seconds until the loop must look again: the next backoff to end, at most a second."""
        now = self.clock()
        waits = [entry.not_before - now for entry in self.pending.values() if entry.not_before > now]
        return max(0.01, min([PERIODIC_PASS_SECONDS, *waits]))

    def _node_views(self) -> list[scheduler.NodeView]:
        """The scheduler's view of every node. Each GPU's two possible views (free, taken) are built
        once per telemetry refresh or health change; an allocation change only re-picks between them."""
        telemetry_epoch = int(time.monotonic() // TELEMETRY_REFRESH_SECONDS)
        allocations = self.cluster.allocations
        views = []
        for node in self.cluster.nodes.values():
            allocation_version = self._allocation_versions.get(node.node_id, 0)
            key = (id(node), node.schedulable, node.health_version, telemetry_epoch if node.last_sequence else 0)
            cached = self._view_cache.get(node.node_id)
            if cached is None or cached[0] != key:
                cached = (key, self._gpu_view_pairs(node), -1, None)
            elif cached[2] == allocation_version:
                views.append(cached[3])
                continue
            pairs = cached[1]
            view = scheduler.NodeView(
                node_id=node.node_id,
                schedulable=node.schedulable,
                gpus=tuple(taken if uuid in allocations else free for uuid, free, taken in pairs),
            )
            self._view_cache[node.node_id] = (key, pairs, allocation_version, view)
            views.append(view)
        return views

    @staticmethod
    def _gpu_view_pairs(node) -> list[tuple[str, scheduler.GpuView, scheduler.GpuView]]:
        """(uuid, view when free, view when taken) for every GPU of the node."""
        pairs = []
        for uuid, record in node.devices.items():
            sample = record.sample or IDLE_SAMPLE
            free = scheduler.GpuView(
                uuid=uuid,
                index=record.info.index,
                model=record.info.name,
                memory_total_bytes=record.memory_total,
                memory_used_bytes=sample[MEMORY_USED],
                utilization_percent=sample[GPU_UTILIZATION],
                temperature_celsius=sample[TEMPERATURE],
                healthy=record.health.healthy,
                free=True,
            )
            pairs.append((uuid, free, replace(free, free=False)))
        return pairs

    def _request(self, entry: JobEntry) -> scheduler.JobRequest:
        if entry.request is None:
            spec = entry.job.spec
            entry.request = scheduler.JobRequest(
                job_id=entry.job.job_id,
                gpus=spec.gpus,
                gpus_per_node=spec.gpus_per_node,
                priority=spec.priority,
                submit_time=entry.job.submit_time.ToNanoseconds() / 1e9,
                owner=spec.owner,
                estimated_runtime_seconds=float(spec.estimated_runtime_seconds),
                min_memory_per_gpu_bytes=spec.requirements.min_memory_per_gpu_bytes,
                gpu_model=spec.requirements.gpu_model,
                spread=spec.spread,
            )
        return entry.request

    def owner_usage(self, now: float) -> dict[str, float]:
        """Each owner's GPU-seconds, decayed with a one-hour half-life (for fair_share)."""
        usage: dict[str, float] = {}
        for entry in self.jobs.values():
            for attempt in entry.job.attempts:
                start = attempt.start_time.ToNanoseconds() / 1e9
                end = attempt.end_time.ToNanoseconds() / 1e9 if attempt.HasField("end_time") else now
                weight = 0.5 ** (max(0.0, now - end) / FAIR_SHARE_HALF_LIFE_SECONDS)
                gpus = attempt.placement.world_size * max(0.0, end - start) * weight
                usage[entry.job.spec.owner] = usage.get(entry.job.spec.owner, 0.0) + gpus
        return usage

    async def schedule_pass(self) -> list[str]:
        """One scheduling pass; returns the ids of the jobs it placed."""
        now = self.clock()
        ready = [entry for entry in self.pending.values() if entry.not_before <= now and self._previous_attempt_over(entry)]
        if not ready:
            return []
        started = time.perf_counter()
        usage = self.owner_usage(now) if self.config.policy == "fair_share" else {}
        views = self._node_views()
        result = scheduler.schedule(views, [self._request(entry) for entry in ready], self.config, now=now, usage_by_owner=usage)
        for job_id, reason in result.pending_reasons.items():
            entry = self.pending.get(job_id)
            if entry is not None:
                entry.job.reason = f"{entry.job.reason.split(';')[0]}; {reason}" if entry.restart_reason else reason
        placed = [self._start_attempt(self.jobs[decision.job_id], decision, now) for decision in result.placed]
        placed += self._place_elastic(ready, result, now)
        if not placed:
            return []
        self.decision_seconds.append(time.perf_counter() - started)
        del self.decision_seconds[:-1000]
        self.placements += len(placed)
        # Durable before launching: a coordinator that dies now restarts knowing these attempts,
        # so it can adopt or fence ranks that agents report.
        await self.store.save([entry.stored() for entry in placed])
        for entry in placed:
            if entry.job.state != job_pb2.JOB_STATE_RUNNING:
                continue  # cancelled while the placement was being written
            for node_id, launch in jobs.launch_messages(entry.job, self._attempt_environment(entry)).items():
                self._send(node_id, agent_pb2.CoordinatorMessage(launch_task=launch))
            self._notify(entry)
        return [entry.job.job_id for entry in placed]

    @staticmethod
    def _previous_attempt_over(entry: JobEntry) -> bool:
        """Whether every rank of the job's earlier attempts has ended (an attempt leaves `entry.attempts`
        once all its ranks reported their end or were given up with their DOWN node). Until then a
        restart waits: two attempts of one job never run at once, nor share a checkpoint directory."""
        if not entry.attempts:
            return True
        left = sum(ranks.world_size - len(ranks.ended) for ranks in entry.attempts.values())
        waiting = f"waiting for {left} rank(s) of attempt {max(entry.attempts)} to end"
        if not entry.job.reason.endswith(waiting):
            entry.job.reason = f"{entry.job.reason.split(';')[0]}; {waiting}"
        return False

    def _place_elastic(self, ready: list[JobEntry], result: scheduler.SchedulingResult, now: float) -> list[JobEntry]:
        """Restarting elastic jobs that did not fit at full size try smaller sizes, down to min_gpus."""
        placed_ids = {decision.job_id for decision in result.placed}
        placed = []
        for entry in ready:
            spec = entry.job.spec
            if not entry.restart_reason or spec.min_gpus >= spec.gpus or entry.job.job_id in placed_ids:
                continue
            if result.reserved_for and result.reserved_for != entry.job.job_id:
                continue  # someone holds a reservation; do not take capacity around it
            views = self._node_views()
            for size in recovery.elastic_sizes(spec.gpus, spec.min_gpus, spec.gpus_per_node)[1:]:
                decision = scheduler.place(replace(self._request(entry), gpus=size), views, self.config)
                if decision is not None:
                    placed.append(self._start_attempt(entry, decision, now))
                    break
        return placed

    def _attempt_environment(self, entry: JobEntry) -> dict[str, str]:
        env = {"GPUORCH_RESTART_REASON": entry.job.attempts[-1].restart_reason}
        if self.checkpoint_root:
            env["GPUORCH_CHECKPOINT_DIR"] = str(Path(self.checkpoint_root) / entry.job.job_id)
        return env

    def _start_attempt(self, entry: JobEntry, decision: scheduler.Decision, now: float) -> JobEntry:
        job = entry.job
        job.attempt += 1
        first_node = self.cluster.nodes[decision.nodes[0].node_id]
        placement = job.placement
        placement.Clear()
        placement.master_addr = first_node.addresses[0] if first_node.addresses else first_node.hostname
        placement.master_port = self._rendezvous_port(first_node.node_id)
        rank = 0
        for node_rank, share in enumerate(decision.nodes):
            devices = self.cluster.nodes[share.node_id].devices
            placement.nodes.add(
                node_id=share.node_id,
                node_rank=node_rank,
                device_uuids=share.gpu_uuids,
                first_rank=rank,
                device_indexes=[devices[uuid].info.index for uuid in share.gpu_uuids],
            )
            rank += len(share.gpu_uuids)
        placement.world_size = rank
        job.state = job_pb2.JOB_STATE_RUNNING
        size = "" if placement.world_size == job.spec.gpus else f" on {placement.world_size} of {job.spec.gpus} GPUs (elastic)"
        job.reason = f"attempt {job.attempt} running{size} on {len(decision.nodes)} node(s)"
        started = _stamp(now)
        job.start_time.CopyFrom(started)
        job.ClearField("restart_not_before")
        record = job.attempts.add(attempt=job.attempt, start_time=started, restart_reason=job.pending_restart_reason)
        job.pending_restart_reason = ""
        record.placement.CopyFrom(placement)
        ranks = self._take_devices(entry, placement, job.attempt)
        ranks.started_wall = now
        self._dequeue(job.job_id)
        log.info(
            "job placed",
            job=job.job_id,
            attempt=job.attempt,
            nodes=[share.node_id for share in decision.nodes],
            gpus=placement.world_size,
        )
        return entry

    def _rendezvous_port(self, node_id: str) -> int:
        """A port for MASTER_PORT, not used by another running attempt whose rank 0 is on the same node."""
        in_use = self._ports_in_use.setdefault(node_id, set())
        low, high = self.rendezvous_ports
        while True:
            port = self._rng.randrange(low, high)
            if port not in in_use:
                return port

    # -- what agents report ------------------------------------------------------------------

    def on_register(self, node_id: str, register: agent_pb2.Register) -> None:
        """Reconciles what a (re-)registered agent runs with what the coordinator expects.

        Called in the step that registered the node, before anything can be placed there. It judges
        only ranks placed before this registration began (on an older stream of the node): a rank
        placed since is one the agent could not list in its Register."""
        self._expected_nodes.pop(node_id, None)
        node = self.cluster.nodes.get(node_id)
        registration = node.session.session_id if node is not None and node.session is not None else 0
        reported: set[RankKey] = set()
        for status in register.tasks:
            reported.add((status.job_id, status.attempt, status.rank))
            self.on_task_status(node_id, status)
        for key, (held_on, _) in list(self._fence_holds.items()):
            if held_on == node_id and key not in reported:
                self._fence_confirmed(node_id, key)  # the agent no longer runs it
        for entry in list(self.jobs.values()):
            for ranks in list(entry.attempts.values()):
                if ranks.node_sessions.get(node_id, 0) >= registration > 0:
                    continue
                for rank, rank_node in ranks.rank_node.items():
                    if (
                        rank_node == node_id
                        and rank not in ranks.ended
                        and (entry.job.job_id, ranks.attempt, rank) not in reported
                    ):
                        lost = agent_pb2.TaskStatus(
                            job_id=entry.job.job_id,
                            attempt=ranks.attempt,
                            rank=rank,
                            state=agent_pb2.TASK_STATE_EXITED,
                            signal=9,
                            message="its agent re-registered without it; its process is gone",
                        )
                        self.on_task_status(node_id, lost)
        self._wake.set()

    def on_progress(self, node_id: str, progress: agent_pb2.RankProgress) -> None:
        entry = self.jobs.get(progress.job_id)
        ranks = entry.attempts.get(progress.attempt) if entry is not None else None
        if ranks is not None:
            ranks.last_progress_wall = max(ranks.last_progress_wall, progress.last_progress_time.ToNanoseconds() / 1e9)

    def on_task_status(self, node_id: str, status: agent_pb2.TaskStatus) -> None:
        if status.state != agent_pb2.TASK_STATE_RUNNING and self._fence_holds:
            self._fence_confirmed(node_id, (status.job_id, status.attempt, status.rank))
        entry = self.jobs.get(status.job_id)
        ranks = entry.attempts.get(status.attempt) if entry is not None else None
        if entry is None or ranks is None or ranks.rank_node.get(status.rank) != node_id:
            if status.state == agent_pb2.TASK_STATE_RUNNING:
                # A rank the coordinator does not run (an old attempt, a forgotten job): fence it.
                self._fence(node_id, entry, status, "fenced: attempt not run by the coordinator")
            return
        live = entry.job.state == job_pb2.JOB_STATE_RUNNING and status.attempt == entry.job.attempt
        if status.state == agent_pb2.TASK_STATE_RUNNING:
            if not live:
                self._fence(node_id, entry, status, "fenced: attempt superseded")
                return
            if status.working_dir:
                self._record_working_dir(entry, status.attempt, node_id, status.working_dir)
            ranks.running.add(status.rank)
            if len(ranks.running) == ranks.world_size and not ranks.all_started_at:
                ranks.all_started_at = time.monotonic()
                self.launch_latencies.append(ranks.all_started_at - ranks.launched_at)
                del self.launch_latencies[:-1000]
            return
        if status.rank in ranks.ended:
            return
        outcome = jobs.rank_outcome(status, node_id)
        self._rank_ended(entry, ranks, status.rank, outcome)
        if not live:
            return
        if outcome.failed:
            self._attempt_failed(entry, recovery.rank_failure_code(status), outcome.description)
        elif len(ranks.ended) == ranks.world_size:
            self._end_attempt_record(entry, f"all {ranks.world_size} ranks exited with code 0")
            self._finish(entry, job_pb2.JOB_STATE_SUCCEEDED, f"all {ranks.world_size} ranks exited with code 0")

    def _rank_ended(self, entry: JobEntry, ranks: AttemptRanks, rank: int, outcome: jobs.RankOutcome) -> None:
        ranks.ended[rank] = outcome
        ranks.running.discard(rank)
        self._release_device(entry, ranks, rank)
        if len(ranks.ended) == ranks.world_size:
            # Every rank is accounted for: agents may forget this attempt, and so may we.
            nodes = set(ranks.rank_node.values())
            for node_id in nodes:
                self._send(node_id, _stop(entry.job.job_id, ranks.attempt, 0.0, "attempt over"))
            del entry.attempts[ranks.attempt]
            self._wake.set()  # a restart waiting for this attempt's end may go now
            for record in entry.job.attempts:
                if record.attempt == ranks.attempt and record.placement.nodes:
                    self._ports_in_use.get(record.placement.nodes[0].node_id, set()).discard(record.placement.master_port)

    @staticmethod
    def _record_working_dir(entry: JobEntry, attempt: int, node_id: str, working_dir: str) -> None:
        """Where the attempt's ranks on `node_id` run, for GetJob (`gpuctl job` says where it ran)."""
        for record in reversed(entry.job.attempts):
            if record.attempt == attempt:
                if record.working_dirs.get(node_id) != working_dir:
                    record.working_dirs[node_id] = working_dir
                return

    # -- fencing -----------------------------------------------------------------------------

    def _fence(self, node_id: str, entry: JobEntry | None, status: agent_pb2.TaskStatus, reason: str) -> None:
        """Stops a running rank the coordinator does not run, and keeps its GPU from being placed until
        its end is confirmed: the rank holds the device until then, whatever the coordinator thought."""
        self._send(node_id, _stop(status.job_id, status.attempt, 0.0, reason))
        key = (status.job_id, status.attempt, status.rank)
        if key in self._fence_holds:
            return
        node = self.cluster.nodes.get(node_id)
        if node is None:
            return
        uuid = self._device_of_rank(entry, status.attempt, status.rank, node_id) if entry is not None else None
        # A rank whose GPU is not known (a job this coordinator forgot) may be on any of the node's GPUs.
        candidates = (uuid,) if uuid is not None and uuid in node.devices else tuple(node.devices)
        held = []
        allocations = self.cluster.allocations
        for candidate in candidates:
            holder = allocations.get(candidate)
            if holder is None:
                allocations[candidate] = (status.job_id, status.attempt)
            elif candidate not in self._fence_holders:
                if holder != (status.job_id, status.attempt) and uuid is not None:
                    log.error(
                        "stale rank runs on a GPU given to another attempt",
                        job=status.job_id,
                        attempt=status.attempt,
                        rank=status.rank,
                        node=node_id,
                        gpu=candidate,
                        holder=f"{holder[0]} attempt {holder[1]}",
                    )
                continue  # held by a running attempt, which gives it back only when its own rank there ends
            self._fence_holders.setdefault(candidate, set()).add(key)
            held.append(candidate)
        if held:
            self._fence_holds[key] = (node_id, tuple(held))
            self._allocation_changed(node_id)
            log.info(
                "GPUs held until a fenced rank is gone",
                job=status.job_id,
                attempt=status.attempt,
                rank=status.rank,
                node=node_id,
                gpus=held,
            )

    def _fence_confirmed(self, node_id: str, key: RankKey) -> None:
        """A fenced rank is gone (its end reported, or its agent no longer lists it): give back what it held."""
        hold = self._fence_holds.get(key)
        if hold is None or hold[0] != node_id:
            return
        del self._fence_holds[key]
        for uuid in hold[1]:
            holders = self._fence_holders.get(uuid)
            if holders is None:
                continue
            holders.discard(key)
            if not holders:
                del self._fence_holders[uuid]
                self.cluster.allocations.pop(uuid, None)
        self._allocation_changed(node_id)
        self._wake.set()

    @staticmethod
    def _device_of_rank(entry: JobEntry, attempt: int, rank: int, node_id: str) -> str | None:
        """The GPU the rank of an attempt was placed on, from the job's attempt history."""
        for record in entry.job.attempts:
            if record.attempt == attempt:
                for node in record.placement.nodes:
                    if node.node_id == node_id and node.first_rank <= rank < node.first_rank + len(node.device_uuids):
                        return node.device_uuids[rank - node.first_rank]
        return None

    # -- failures ----------------------------------------------------------------------------

    def _attempt_failed(self, entry: JobEntry, code: str, description: str) -> None:
        """The current attempt cannot go on: stop it everywhere, then restart or give up."""
        job = entry.job
        if job.state != job_pb2.JOB_STATE_RUNNING:
            return
        log.warning("attempt failed", job=job.job_id, attempt=job.attempt, code=code, reason=description)
        self._stop_attempt(entry, job.attempt, description)
        self._end_attempt_record(entry, description)
        history = [record.end_reason for record in job.attempts]
        decision = recovery.decide(job.spec.max_restarts, job.restarts, history, self.recovery_policy, code)
        if isinstance(decision, recovery.GiveUp):
            self._finish(entry, job_pb2.JOB_STATE_FAILED, decision.reason)
            return
        now = self.clock()
        job.restarts = decision.restart_number
        job.state = job_pb2.JOB_STATE_PENDING
        job.reason = f"restart {decision.restart_number} of {job.spec.max_restarts} after {code}"
        job.pending_restart_reason = code
        entry.not_before = now + decision.delay_seconds
        if decision.delay_seconds:
            job.restart_not_before.CopyFrom(_stamp(entry.not_before))
        self._enqueue(entry)
        self.restarts_by_reason[code.split(":")[0]] = self.restarts_by_reason.get(code.split(":")[0], 0) + 1
        self._notify(entry)
        self.store.save([entry.stored()])
        self._wake.set()

    def _end_attempt_record(self, entry: JobEntry, end_reason: str) -> None:
        if entry.job.attempts and not entry.job.attempts[-1].end_reason:
            entry.job.attempts[-1].end_time.CopyFrom(_stamp(self.clock()))
            entry.job.attempts[-1].end_reason = end_reason

    def _on_transition(self, transition: Transition) -> None:
        if transition.after is Liveness.DOWN:
            self._node_lost(transition.node_id, f"node {transition.node_id} is down: {transition.reason}")
        self._wake.set()

    def _on_device_unhealthy(self, node_id: str, uuid: str, health) -> None:
        holder = self.cluster.allocations.get(uuid)
        if holder is None:
            return
        entry = self.jobs.get(holder[0])
        if entry is not None and entry.job.attempt == holder[1]:
            self._attempt_failed(
                entry, f"gpu_unhealthy:{uuid}", f"GPU {uuid} on node {node_id} turned unhealthy: {health.reason}"
            )

    def _expire_expected_nodes(self) -> None:
        now = self.clock()
        for node_id, deadline in list(self._expected_nodes.items()):
            if now >= deadline and node_id not in self.cluster.nodes:
                del self._expected_nodes[node_id]
                self._node_lost(
                    node_id, f"node {node_id} did not come back within {self.node_grace_period:g}s of a coordinator restart"
                )

    def _node_lost(self, node_id: str, reason: str) -> None:
        """Ranks on a lost node are gone: their devices are free and their attempts fail."""
        for entry in list(self.jobs.values()):
            for ranks in list(entry.attempts.values()):
                lost = [rank for rank, rank_node in ranks.rank_node.items() if rank_node == node_id and rank not in ranks.ended]
                if not lost:
                    continue
                current = entry.job.state == job_pb2.JOB_STATE_RUNNING and ranks.attempt == entry.job.attempt
                for rank in lost:
                    self._rank_ended(entry, ranks, rank, jobs.RankOutcome(True, f"rank {rank}: {reason}"))
                if current:
                    self._attempt_failed(entry, f"node_down:{node_id}", reason)

    def _detect_hangs(self) -> None:
        now = self.clock()
        for entry in list(self.jobs.values()):
            timeout = entry.job.spec.progress_timeout_seconds
            ranks = entry.current
            if not timeout or ranks is None or entry.job.state != job_pb2.JOB_STATE_RUNNING:
                continue
            if recovery.hung(timeout, ranks.started_wall, ranks.last_progress_wall, now):
                self._attempt_failed(entry, "hang", f"no rank reported progress for {timeout}s (hang)")

    # -- effects -----------------------------------------------------------------------------

    def _send(self, node_id: str, message: agent_pb2.CoordinatorMessage) -> None:
        node = self.cluster.nodes.get(node_id)
        if node is not None and node.session is not None:
            node.session.send(message)

    def _stop_attempt(self, entry: JobEntry, attempt: int, reason: str) -> None:
        ranks = entry.attempts.get(attempt)
        if ranks is None:
            return
        for node_id in set(ranks.rank_node.values()):
            self._send(node_id, _stop(entry.job.job_id, attempt, self.stop_grace_seconds, reason))

    def _finish(self, entry: JobEntry, state: int, reason: str) -> asyncio.Future | None:
        """Makes the job final and queues its write at once, so stored writes keep the order of events
        (a job's end is written before any placement onto the GPUs it gave back). Returns the write."""
        if entry.final:
            return None
        entry.job.state = state
        entry.job.reason = reason
        entry.job.end_time.CopyFrom(_stamp(self.clock()))
        entry.job.ClearField("restart_not_before")
        entry.job.pending_restart_reason = ""
        self._dequeue(entry.job.job_id)
        log.info("job finished", job=entry.job.job_id, state=job_pb2.JobState.Name(state), reason=reason)
        self._wake.set()
        self._notify(entry)
        return self.store.save([entry.stored()])

    def _notify(self, entry: JobEntry) -> None:
        for watcher in entry.watchers:
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(entry.job)
            watcher.put_nowait(snapshot)

    async def persist_drain(self, node_id: str, reason: str | None) -> None:
        await self.store.save(drains={node_id: reason})


def _stop(job_id: str, attempt: int, grace: float, reason: str) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(
        stop_task=agent_pb2.StopTask(job_id=job_id, attempt=attempt, grace_seconds=grace, reason=reason)
    )
