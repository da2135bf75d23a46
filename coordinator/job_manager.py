"""The job manager: the durable queue, scheduling passes, launches, and what rank exits mean.

It applies decisions made by pure code (coordinator/scheduler.py for placement,
coordinator/jobs.py for environments and outcomes) and does the I/O around
them: the store, the agent sessions, the watchers.

GPU ownership lives in one map, `cluster.allocations` (device uuid -> (job id,
attempt)). A device is taken when an attempt is placed and given back when the
rank on it reports its end, or its node is declared DOWN; no device is ever
given to two attempts.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from coordinator import jobs, scheduler
from coordinator.cluster import ClusterView, Transition
from coordinator.liveness import Liveness
from coordinator.store import JobStore, StoredJob
from gpuorch.v1 import agent_pb2, job_pb2

log = structlog.get_logger("coordinator.jobs")

PERIODIC_PASS_SECONDS = 1.0
TELEMETRY_REFRESH_SECONDS = 5.0
"""A node's cached scheduler view is rebuilt for fresher telemetry at most this often (scores need
trends, not every sample); allocation, health and drain changes rebuild it at once."""
"""A scheduling pass runs at least this often, so telemetry-driven changes are seen."""
FAIR_SHARE_HALF_LIFE_SECONDS = 3600.0
LOG_READ_TIMEOUT_SECONDS = 10.0
LOG_CHUNK_BYTES = 64 * 1024


class JobNotFound(KeyError):
    pass


class JobFinished(ValueError):
    """The job is already final."""


def _now_stamp(wall: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(wall * 1e9))
    return stamp


@dataclass(eq=False)
class JobEntry:
    sequence: int
    job: job_pb2.Job
    client_request_id: str = ""
    request: scheduler.JobRequest | None = None
    """The scheduler's view of the job, built once (rebuilt when the priority changes)."""
    rank_node: dict[int, str] = field(default_factory=dict)
    """Current attempt: global rank -> node id."""
    rank_device: dict[int, str] = field(default_factory=dict)
    """Current attempt: global rank -> device uuid."""
    running: set[int] = field(default_factory=set)
    """Ranks of the current attempt whose process started."""
    ended: dict[int, jobs.RankOutcome] = field(default_factory=dict)
    """Ranks of the current attempt that ended, and how."""
    launched_at: float = 0.0
    all_started_at: float = 0.0
    watchers: set[asyncio.Queue] = field(default_factory=set)

    def stored(self) -> StoredJob:
        return StoredJob(self.sequence, self.job, self.client_request_id)

    @property
    def final(self) -> bool:
        return self.job.state in jobs.FINAL_STATES


class JobManager:
    def __init__(
        self,
        cluster: ClusterView,
        store: JobStore,
        *,
        config: scheduler.SchedulerConfig = scheduler.SchedulerConfig(),
        stop_grace_seconds: float = 10.0,
        node_grace_period: float = 10.0,
        rendezvous_ports: tuple[int, int] = (20000, 30000),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.config = config
        self.stop_grace_seconds = stop_grace_seconds
        self.node_grace_period = node_grace_period
        self.rendezvous_ports = rendezvous_ports
        self.clock = clock
        self.jobs: dict[str, JobEntry] = {}
        self.pending: dict[str, JobEntry] = {}
        """Jobs waiting for placement, in submission order."""
        self.by_request_id: dict[str, JobEntry] = {}
        self._sequence = itertools.count(1)
        self._wake = asyncio.Event()
        self._log_requests: dict[int, asyncio.Future] = {}
        self._log_request_ids = itertools.count(1)
        self._expected_nodes: dict[str, float] = {}
        """After a coordinator restart: node id -> wall time by which it must re-register."""
        self._rng = random.Random()
        self._view_cache: dict[str, tuple[tuple, scheduler.NodeView]] = {}
        """Node id -> (what the view was built from, the view)."""
        self._allocation_versions: dict[str, int] = {}
        """Node id -> increases whenever a device on it is taken or given back."""
        self._ports_in_use: dict[str, set[int]] = {}
        """Node id -> MASTER_PORTs of running attempts whose rank 0 is on that node."""
        self.placements = 0
        self.decision_seconds: list[float] = []
        """Duration of recent scheduling passes that placed something (for benchmarks and metrics)."""
        self.launch_latencies: list[float] = []
        """Recent submit -> every rank's process started, in seconds."""
        cluster.listeners.append(self._on_transition)

    # -- start-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        state = await self.store.open()
        for key, value in state.settings.items():
            if key.startswith("drain:"):
                self.cluster.drained[key.removeprefix("drain:")] = value
        highest = 0
        now = self.clock()
        for stored in state.jobs:
            entry = JobEntry(stored.sequence, stored.job, stored.client_request_id)
            highest = max(highest, stored.sequence)
            self._index(entry)
            if stored.job.state == job_pb2.JOB_STATE_RUNNING:
                # Keep its GPUs until its agents say otherwise; they re-register with what they run.
                self._take_devices(entry)
                if stored.job.placement.nodes:
                    self._ports_in_use.setdefault(stored.job.placement.nodes[0].node_id, set()).add(stored.job.placement.master_port)
                for node in stored.job.placement.nodes:
                    self._expected_nodes.setdefault(node.node_id, now + self.node_grace_period)
        self._sequence = itertools.count(highest + 1)
        log.info("jobs loaded", jobs=len(self.jobs), pending=len(self.pending), expected_nodes=len(self._expected_nodes))
        self._wake.set()

    def _index(self, entry: JobEntry) -> None:
        self.jobs[entry.job.job_id] = entry
        if entry.client_request_id:
            self.by_request_id[entry.client_request_id] = entry
        if entry.job.state == job_pb2.JOB_STATE_PENDING:
            self.pending[entry.job.job_id] = entry

    def _take_devices(self, entry: JobEntry) -> None:
        entry.rank_node.clear()
        entry.rank_device.clear()
        for node in entry.job.placement.nodes:
            for local_rank, uuid in enumerate(node.device_uuids):
                rank = node.first_rank + local_rank
                entry.rank_node[rank] = node.node_id
                entry.rank_device[rank] = uuid
                holder = self.cluster.allocations.get(uuid)
                if holder is not None and holder != (entry.job.job_id, entry.job.attempt):
                    raise AssertionError(f"device {uuid} is held by {holder}; refusing to give it to {entry.job.job_id}")
                self.cluster.allocations[uuid] = (entry.job.job_id, entry.job.attempt)
            self._allocation_changed(node.node_id)

    def _release_device(self, entry: JobEntry, rank: int) -> None:
        uuid = entry.rank_device.get(rank)
        if uuid is not None and self.cluster.allocations.get(uuid) == (entry.job.job_id, entry.job.attempt):
            del self.cluster.allocations[uuid]
            self._allocation_changed(entry.rank_node[rank])
            self._wake.set()

    def _allocation_changed(self, node_id: str) -> None:
        self._allocation_versions[node_id] = self._allocation_versions.get(node_id, 0) + 1

    # -- the API -----------------------------------------------------------------------------

    async def submit(self, spec: job_pb2.JobSpec, client_request_id: str = "") -> str:
        """Validates, stores durably, queues; returns the job id. Raises jobs.InvalidSpec."""
        if client_request_id and client_request_id in self.by_request_id:
            return self.by_request_id[client_request_id].job.job_id
        jobs.validate_spec(spec)
        sequence = next(self._sequence)
        job = job_pb2.Job(
            job_id=f"j-{sequence:06d}",
            spec=jobs.normalized(spec),
            state=job_pb2.JOB_STATE_PENDING,
            reason="queued; waiting for the scheduler",
            submit_time=_now_stamp(self.clock()),
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

    def list(self, states=(), owner: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[job_pb2.Job], str]:
        """Newest first. The page token is the sequence number to continue below."""
        limit = min(page_size or 100, 1000)
        try:
            below = int(page_token) if page_token else math.inf
        except ValueError:
            raise ValueError(f"page_token {page_token[:32]!r} is not one this coordinator gave out") from None
        wanted = set(states)
        result: list[JobEntry] = []
        for entry in reversed(self.jobs.values()):  # dicts keep insertion (= sequence) order
            if entry.sequence >= below:
                continue
            if wanted and entry.job.state not in wanted:
                continue
            if owner and entry.job.spec.owner != owner:
                continue
            result.append(entry)
            if len(result) > limit:
                break
        more = len(result) > limit
        page = result[:limit]
        return [entry.job for entry in page], (str(page[-1].sequence) if more else "")

    async def cancel(self, job_id: str) -> job_pb2.Job:
        entry = self.get(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {job_pb2.JobState.Name(entry.job.state).removeprefix('JOB_STATE_')}")
        if entry.job.state == job_pb2.JOB_STATE_RUNNING:
            self._stop_attempt(entry, "cancelled")
        await self._finish(entry, job_pb2.JOB_STATE_CANCELLED, "cancelled by user")
        return entry.job

    async def set_priority(self, job_id: str, priority: int) -> job_pb2.Job:
        entry = self.get(job_id)
        if entry.final:
            raise JobFinished(f"job {job_id} is already {job_pb2.JobState.Name(entry.job.state).removeprefix('JOB_STATE_')}")
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
        counts = {name: 0 for name in job_pb2.JobState.keys() if not name.endswith("UNSPECIFIED")}
        for entry in self.jobs.values():
            counts[job_pb2.JobState.Name(entry.job.state)] += 1
        return counts

    # -- logs --------------------------------------------------------------------------------

    async def read_log(self, job_id: str, rank: int, attempt: int, offset: int, max_bytes: int = LOG_CHUNK_BYTES) -> agent_pb2.LogChunk:
        """Reads part of a rank's log from its node. Raises LookupError / ConnectionError with a reason."""
        entry = self.get(job_id)
        attempt = attempt or entry.job.attempt
        if attempt == 0:
            raise LookupError(f"job {job_id} has not started yet; it has no logs")
        if rank >= entry.job.spec.gpus:
            raise LookupError(f"job {job_id} has ranks 0 to {entry.job.spec.gpus - 1}; there is no rank {rank}")
        node_id = self._node_of_rank(entry, attempt, rank)
        if node_id is None:
            raise LookupError(f"rank {rank} of job {job_id} did not run in attempt {attempt}")
        node = self.cluster.nodes.get(node_id)
        if node is None or node.session is None:
            raise ConnectionError(f"node {node_id}, which holds the log of rank {rank}, is not connected")
        request_id = next(self._log_request_ids)
        answer = asyncio.get_running_loop().create_future()
        self._log_requests[request_id] = answer
        node.session.send(
            agent_pb2.CoordinatorMessage(
                read_logs=agent_pb2.ReadLogs(
                    request_id=request_id, job_id=job_id, attempt=attempt, rank=rank, offset=offset, max_bytes=max_bytes
                )
            )
        )
        try:
            return await asyncio.wait_for(answer, LOG_READ_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise ConnectionError(f"node {node_id} did not answer a log read within {LOG_READ_TIMEOUT_SECONDS:g}s") from None
        finally:
            self._log_requests.pop(request_id, None)

    def _node_of_rank(self, entry: JobEntry, attempt: int, rank: int) -> str | None:
        if attempt != entry.job.attempt:
            return None  # only the current attempt's placement is kept
        return entry.rank_node.get(rank)

    def on_log_chunk(self, node_id: str, chunk: agent_pb2.LogChunk) -> None:
        answer = self._log_requests.get(chunk.request_id)
        if answer is not None and not answer.done():
            answer.set_result(chunk)

    # -- scheduling --------------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduler loop: a pass whenever something changed, and at least every second."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), PERIODIC_PASS_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self._expire_expected_nodes()
            await self.schedule_pass()

    def _node_views(self) -> list[scheduler.NodeView]:
        """The scheduler's view of every node, rebuilt only for nodes whose facts changed."""
        telemetry_epoch = int(time.monotonic() // TELEMETRY_REFRESH_SECONDS)
        views = []
        for node in self.cluster.nodes.values():
            key = (
                id(node),
                node.schedulable,
                node.health_version,
                self._allocation_versions.get(node.node_id, 0),
                telemetry_epoch if node.last_sequence else 0,
            )
            cached = self._view_cache.get(node.node_id)
            if cached is None or cached[0] != key:
                cached = (key, self._build_node_view(node))
                self._view_cache[node.node_id] = cached
            views.append(cached[1])
        return views

    def _build_node_view(self, node) -> scheduler.NodeView:
        allocations = self.cluster.allocations
        gpus = []
        for record in node.devices.values():
            telemetry = record.telemetry
            gpus.append(
                scheduler.GpuView(
                    uuid=record.info.uuid,
                    index=record.info.index,
                    model=record.info.name,
                    memory_total_bytes=record.info.memory_total_bytes,
                    memory_used_bytes=telemetry.memory_used_bytes if telemetry is not None else 0,
                    utilization_percent=telemetry.gpu_utilization_percent if telemetry is not None else 0.0,
                    temperature_celsius=telemetry.temperature_celsius if telemetry is not None else 0.0,
                    healthy=record.health.healthy,
                    free=record.info.uuid not in allocations,
                )
            )
        return scheduler.NodeView(node_id=node.node_id, schedulable=node.schedulable, gpus=tuple(gpus))

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
            job = entry.job
            if not job.HasField("start_time"):
                continue
            start = job.start_time.ToNanoseconds() / 1e9
            end = job.end_time.ToNanoseconds() / 1e9 if job.HasField("end_time") else now
            weight = 0.5 ** (max(0.0, now - end) / FAIR_SHARE_HALF_LIFE_SECONDS)
            usage[job.spec.owner] = usage.get(job.spec.owner, 0.0) + job.spec.gpus * max(0.0, end - start) * weight
        return usage

    async def schedule_pass(self) -> int:
        """One scheduling pass; returns how many jobs it placed."""
        if not self.pending:
            return 0
        started = time.perf_counter()
        now = self.clock()
        usage = self.owner_usage(now) if self.config.policy == "fair_share" else {}
        result = scheduler.schedule(
            self._node_views(), [self._request(entry) for entry in self.pending.values()], self.config, now=now, usage_by_owner=usage
        )
        for job_id, reason in result.pending_reasons.items():
            entry = self.pending.get(job_id)
            if entry is not None:
                entry.job.reason = reason
        placed = [self._start_attempt(self.jobs[decision.job_id], decision, now) for decision in result.placed]
        if not placed:
            return 0
        self.decision_seconds.append(time.perf_counter() - started)
        del self.decision_seconds[:-1000]
        self.placements += len(placed)
        # Durable before launching: a coordinator that dies now restarts knowing these attempts,
        # so it can adopt or fence ranks that agents report.
        await self.store.save([entry.stored() for entry in placed])
        for entry in placed:
            if entry.job.state != job_pb2.JOB_STATE_RUNNING:
                continue  # cancelled while the placement was being written
            for node_id, launch in jobs.launch_messages(entry.job).items():
                self._send(node_id, agent_pb2.CoordinatorMessage(launch_task=launch))
            self._notify(entry)
        return len(placed)

    def _start_attempt(self, entry: JobEntry, decision: scheduler.Decision, now: float) -> JobEntry:
        job = entry.job
        job.attempt += 1
        first_node = self.cluster.nodes[decision.nodes[0].node_id]
        placement = job_pb2.Placement(
            master_addr=first_node.addresses[0] if first_node.addresses else first_node.hostname,
            master_port=self._rendezvous_port(first_node.node_id),
            world_size=sum(len(share.gpu_uuids) for share in decision.nodes),
        )
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
        job.placement.CopyFrom(placement)
        job.state = job_pb2.JOB_STATE_RUNNING
        job.reason = f"attempt {job.attempt} running on {len(decision.nodes)} node(s)"
        job.start_time.CopyFrom(_now_stamp(now))
        self._take_devices(entry)
        entry.running.clear()
        entry.ended.clear()
        entry.launched_at = time.monotonic()
        del self.pending[job.job_id]
        log.info("job placed", job=job.job_id, attempt=job.attempt, nodes=[share.node_id for share in decision.nodes])
        return entry

    def _rendezvous_port(self, node_id: str) -> int:
        """A port for MASTER_PORT, not used by another running attempt whose rank 0 is on the same node."""
        in_use = self._ports_in_use.setdefault(node_id, set())
        low, high = self.rendezvous_ports
        while True:
            port = self._rng.randrange(low, high)
            if port not in in_use:
                in_use.add(port)
                return port

    def _free_rendezvous_port(self, entry: JobEntry) -> None:
        placement = entry.job.placement
        if placement.nodes:
            self._ports_in_use.get(placement.nodes[0].node_id, set()).discard(placement.master_port)

    # -- what agents report ------------------------------------------------------------------

    def on_register(self, node_id: str, register: agent_pb2.Register) -> None:
        """Reconciles what a (re-)registered agent runs with what the coordinator expects."""
        self._expected_nodes.pop(node_id, None)
        reported = set()
        for status in register.tasks:
            reported.add((status.job_id, status.attempt, status.rank))
            self.on_task_status(node_id, status)
        for entry in list(self.jobs.values()):
            if entry.job.state != job_pb2.JOB_STATE_RUNNING:
                continue
            for rank, rank_node in entry.rank_node.items():
                if rank_node == node_id and rank not in entry.ended and (entry.job.job_id, entry.job.attempt, rank) not in reported:
                    lost = agent_pb2.TaskStatus(
                        job_id=entry.job.job_id,
                        attempt=entry.job.attempt,
                        rank=rank,
                        state=agent_pb2.TASK_STATE_EXITED,
                        signal=9,
                        message="its agent re-registered without it; its process is gone",
                    )
                    self.on_task_status(node_id, lost)
        self._wake.set()

    def on_task_status(self, node_id: str, status: agent_pb2.TaskStatus) -> None:
        entry = self.jobs.get(status.job_id)
        current = entry is not None and status.attempt == entry.job.attempt and not entry.final
        if not current:
            if status.state == agent_pb2.TASK_STATE_RUNNING:
                # A rank of an attempt the coordinator no longer runs: fence it.
                self._send(node_id, _stop(status.job_id, status.attempt, 0.0, "stale attempt: fenced by the coordinator"))
            if entry is not None and status.attempt == entry.job.attempt:
                self._rank_ended(entry, node_id, status)
            return
        if status.state == agent_pb2.TASK_STATE_RUNNING:
            entry.running.add(status.rank)
            if len(entry.running) == entry.job.placement.world_size and not entry.all_started_at:
                entry.all_started_at = time.monotonic()
                self.launch_latencies.append(entry.all_started_at - entry.launched_at)
                del self.launch_latencies[:-1000]
            return
        self._rank_ended(entry, node_id, status)
        outcome = entry.ended[status.rank]
        if outcome.failed:
            log.warning("rank failed", job=entry.job.job_id, attempt=entry.job.attempt, reason=outcome.description)
            self._stop_attempt(entry, f"rank {status.rank} failed")
            self._schedule_finish(entry, job_pb2.JOB_STATE_FAILED, outcome.description)
        elif len(entry.ended) == entry.job.placement.world_size:
            self._schedule_finish(entry, job_pb2.JOB_STATE_SUCCEEDED, f"all {len(entry.ended)} ranks exited with code 0")

    def _rank_ended(self, entry: JobEntry, node_id: str, status: agent_pb2.TaskStatus) -> None:
        if status.rank in entry.ended or entry.rank_node.get(status.rank) != node_id:
            return
        entry.ended[status.rank] = jobs.rank_outcome(status, node_id)
        entry.running.discard(status.rank)
        self._release_device(entry, status.rank)
        if len(entry.ended) == entry.job.placement.world_size:
            # Every rank is accounted for: agents may forget this attempt.
            for node in entry.job.placement.nodes:
                self._send(node.node_id, _stop(entry.job.job_id, entry.job.attempt, 0.0, "attempt over"))

    def _on_transition(self, transition: Transition) -> None:
        if transition.after is Liveness.DOWN:
            self._node_lost(transition.node_id, f"node {transition.node_id} is down: {transition.reason}")
        self._wake.set()

    def _expire_expected_nodes(self) -> None:
        now = self.clock()
        for node_id, deadline in list(self._expected_nodes.items()):
            if now >= deadline and node_id not in self.cluster.nodes:
                del self._expected_nodes[node_id]
                self._node_lost(node_id, f"node {node_id} did not come back within {self.node_grace_period:g}s of a coordinator restart")

    def _node_lost(self, node_id: str, reason: str) -> None:
        """Ranks on a lost node are gone: their attempts fail, their devices are free."""
        for entry in list(self.jobs.values()):
            if node_id not in entry.rank_node.values() or entry.job.attempt == 0:
                continue
            for rank, rank_node in entry.rank_node.items():
                if rank_node == node_id and rank not in entry.ended:
                    entry.ended[rank] = jobs.RankOutcome(True, f"rank {rank}: {reason}")
                    self._release_device(entry, rank)
            if entry.job.state == job_pb2.JOB_STATE_RUNNING:
                self._stop_attempt(entry, reason)
                self._schedule_finish(entry, job_pb2.JOB_STATE_FAILED, reason)

    # -- effects -----------------------------------------------------------------------------

    def _send(self, node_id: str, message: agent_pb2.CoordinatorMessage) -> None:
        node = self.cluster.nodes.get(node_id)
        if node is not None and node.session is not None:
            node.session.send(message)

    def _stop_attempt(self, entry: JobEntry, reason: str) -> None:
        for node in entry.job.placement.nodes:
            self._send(node.node_id, _stop(entry.job.job_id, entry.job.attempt, self.stop_grace_seconds, reason))

    def _schedule_finish(self, entry: JobEntry, state: int, reason: str) -> None:
        asyncio.get_running_loop().create_task(self._finish(entry, state, reason))

    async def _finish(self, entry: JobEntry, state: int, reason: str) -> None:
        if entry.final:
            return
        entry.job.state = state
        entry.job.reason = reason
        entry.job.end_time.CopyFrom(_now_stamp(self.clock()))
        self.pending.pop(entry.job.job_id, None)
        self._free_rendezvous_port(entry)
        log.info("job finished", job=entry.job.job_id, state=job_pb2.JobState.Name(state), reason=reason)
        self._wake.set()
        self._notify(entry)
        await self.store.save([entry.stored()])

    def _notify(self, entry: JobEntry) -> None:
        for watcher in entry.watchers:
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(entry.job)
            watcher.put_nowait(snapshot)

    async def persist_drain(self, node_id: str, reason: str | None) -> None:
        await self.store.save(settings={f"drain:{node_id}": reason})


def _stop(job_id: str, attempt: int, grace: float, reason: str) -> agent_pb2.CoordinatorMessage:
    return agent_pb2.CoordinatorMessage(stop_task=agent_pb2.StopTask(job_id=job_id, attempt=attempt, grace_seconds=grace, reason=reason))
