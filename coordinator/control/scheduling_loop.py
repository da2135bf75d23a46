"""The scheduling loop: when to run a pass, what the scheduler sees, and applying what it decides.

Each pass builds the scheduler's plain views (coordinator/scheduler/ imports nothing of ours), asks
it where the ready jobs go, turns its decisions into placements, lets the job rules start the
attempts (coordinator/rules/job_machine.place), makes them durable, and only then launches them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.model.cluster import NodeRecord
from coordinator.model.jobs import JobEntry
from coordinator.model.telemetry import GPU_UTILIZATION, MEMORY_USED, SAMPLE_FIELDS, TEMPERATURE
from coordinator.rules import job_machine
from coordinator.rules.effects import Effect, Save
from gpuorch.v1 import job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = structlog.get_logger("coordinator.jobs")

PERIODIC_PASS_SECONDS = 1.0
"""A scheduling pass runs at least this often (backoffs ending, hang checks, telemetry)."""
TELEMETRY_REFRESH_SECONDS = 5.0
"""A node's cached scheduler view is rebuilt for fresher telemetry at most this often (scores need
trends, not every sample); allocation, health and drain changes rebuild it at once."""
FAIR_SHARE_HALF_LIFE_SECONDS = 3600.0
IDLE_SAMPLE = (0,) * len(SAMPLE_FIELDS)
"""What the scheduler assumes of a GPU that has not reported telemetry yet."""
KEPT_TIMINGS = 1000


@dataclass(eq=False)
class _CachedView:
    key: tuple
    """What the GPU views were built from: the node record, schedulable, health version, telemetry epoch."""
    pairs: list[tuple[str, scheduler.GpuView, scheduler.GpuView]]
    allocation_version: int
    view: scheduler.NodeView | None


def placement_of(decision: scheduler.Decision, nodes: dict[str, NodeRecord], port: int) -> job_pb2.Placement:
    """The wire placement of a scheduler decision: node ranks, first ranks, device indexes, the rendezvous."""
    first = nodes[decision.nodes[0].node_id]
    placement = job_pb2.Placement(master_addr=first.addresses[0] if first.addresses else first.hostname, master_port=port)
    rank = 0
    for node_rank, share in enumerate(decision.nodes):
        devices = nodes[share.node_id].devices
        placement.nodes.add(
            node_id=share.node_id,
            node_rank=node_rank,
            device_uuids=share.gpu_uuids,
            first_rank=rank,
            device_indexes=[devices[uuid].info.index for uuid in share.gpu_uuids],
        )
        rank += len(share.gpu_uuids)
    placement.world_size = rank
    return placement


def _intervals(entries: Iterable[JobEntry], now: float) -> Iterator[tuple[str, int, float, float]]:
    """(owner, GPUs, start, end) of every attempt of the jobs; an attempt not ended counts until `now`."""
    for entry in entries:
        owner = entry.job.spec.owner
        for attempt in entry.job.attempts:
            end = attempt.end_time.ToNanoseconds() / 1e9 if attempt.HasField("end_time") else now
            yield owner, attempt.placement.world_size, attempt.start_time.ToNanoseconds() / 1e9, end


class SchedulingLoop:
    """Runs passes for one JobManager: whenever something changed, and at least every second."""

    def __init__(
        self,
        manager: JobManager,
        cluster: ClusterView,
        config: scheduler.SchedulerConfig,
        rendezvous_ports: tuple[int, int],
        rng: random.Random,
        elapsed_clock: Callable[[], float],
    ) -> None:
        self.manager = manager
        self.cluster = cluster
        self.config = config
        self.rendezvous_ports = rendezvous_ports
        self.rng = rng
        self.elapsed_clock = elapsed_clock
        """Times passes (the clock's monotonic time)."""
        self.wake = asyncio.Event()
        self.placements = 0
        self.decision_seconds: list[float] = []
        """Duration of recent scheduling passes that placed something (for benchmarks and metrics)."""
        self.ports_in_use: dict[str, set[int]] = {}
        """Node id -> MASTER_PORTs of attempts not yet over whose rank 0 is on that node."""
        self._views: dict[str, _CachedView] = {}
        self._requests: dict[str, scheduler.JobRequest] = {}
        """Job id -> the scheduler's view of the job (dropped when its spec changes or it is final)."""
        self._settled_usage: dict[str, float] = {}
        """Owner -> decayed GPU-seconds of final jobs' attempts as of `_settled_at`: each final job is added once,
        so a fair_share pass reads only the jobs still pending or running, not every job ever held."""
        self._settled_at = 0.0
        self._settled_jobs: set[str] = set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self._next_timer())
            except TimeoutError:
                pass
            self.wake.clear()
            await self.step()

    async def step(self) -> list[str]:
        """What the loop does at each wake: deadlines of expected nodes, hangs, then a pass. The
        simulator (coordinator/sim/) calls this at each event time, so it runs the same path."""
        self.manager.expire_expected_nodes()
        self.manager.detect_hangs()
        return await self.schedule_pass()

    def _next_timer(self) -> float:
        """Seconds until the loop must look again: the next backoff to end, at most a second."""
        now = self.manager.clock.wall()
        waits = [not_before - now for not_before in self.manager.backoffs.values() if not_before > now]
        return max(0.01, min([PERIODIC_PASS_SECONDS, *waits]))

    # -- what the scheduler sees --

    def node_views(self) -> list[scheduler.NodeView]:
        """The scheduler's view of every node. Each GPU's two possible views (free, taken) are built
        once per telemetry refresh or health change; an allocation change only re-picks between them."""
        telemetry_epoch = int(self.manager.clock.monotonic() // TELEMETRY_REFRESH_SECONDS)
        allocations = self.cluster.allocations
        views = []
        for node in self.cluster.nodes.values():
            allocation_version = allocations.version(node.node_id)
            key = (id(node), node.schedulable, node.health_version, telemetry_epoch if node.last_sequence else 0)
            cached = self._views.get(node.node_id)
            if cached is None or cached.key != key:
                cached = self._views[node.node_id] = _CachedView(key, self._gpu_view_pairs(node), -1, None)
            elif cached.allocation_version == allocation_version and cached.view is not None:
                views.append(cached.view)
                continue
            cached.view = scheduler.NodeView(
                node_id=node.node_id,
                schedulable=node.schedulable,
                gpus=tuple(taken if uuid in allocations else free for uuid, free, taken in cached.pairs),
            )
            cached.allocation_version = allocation_version
            views.append(cached.view)
        return views

    @staticmethod
    def _gpu_view_pairs(node: NodeRecord) -> list[tuple[str, scheduler.GpuView, scheduler.GpuView]]:
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

    def request(self, entry: JobEntry) -> scheduler.JobRequest:
        """The scheduler's view of the job, built once: a pass asks it of every ready job, and reading the
        spec's message fields each time cost more than the scheduler's own ordering (`request_changed` drops it)."""
        request = self._requests.get(entry.job.job_id)
        if request is None:
            spec = entry.job.spec
            request = self._requests[entry.job.job_id] = scheduler.JobRequest(
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
        return request

    def request_changed(self, job_id: str) -> None:
        """The job's spec changed (its priority): its request is built again at the next pass."""
        self._requests.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        """The job is final: it will not be scheduled again; its usage joins the settled usage."""
        self._requests.pop(job_id, None)
        entry = self.manager.jobs.get(job_id)
        if entry is None or not entry.job.attempts or job_id in self._settled_jobs:
            return
        self._settled_jobs.add(job_id)
        # Decay is exponential, so usage as of one time is usage as of another times one factor.
        at = max(self.manager.clock.wall(), self._settled_at)
        factor = 0.5 ** ((at - self._settled_at) / FAIR_SHARE_HALF_LIFE_SECONDS)
        settled = {owner: used * factor for owner, used in self._settled_usage.items()}
        for owner, used in scheduler.decayed_usage(_intervals([entry], at), at, FAIR_SHARE_HALF_LIFE_SECONDS).items():
            settled[owner] = settled.get(owner, 0.0) + used
        self._settled_usage, self._settled_at = settled, at

    def owner_usage(self, now: float) -> dict[str, float]:
        """Each owner's GPU-seconds, decayed with a one-hour half-life (for fair_share): the jobs still pending
        or running, read now, and the final ones, settled as they ended."""
        live = (*self.manager.pending.values(), *self.manager.running.values())
        usage = scheduler.decayed_usage(_intervals(live, now), now, FAIR_SHARE_HALF_LIFE_SECONDS)
        factor = 0.5 ** (max(0.0, now - self._settled_at) / FAIR_SHARE_HALF_LIFE_SECONDS)
        for owner, used in self._settled_usage.items():
            usage[owner] = usage.get(owner, 0.0) + used * factor
        return usage

    # -- a pass --

    async def schedule_pass(self) -> list[str]:
        """One scheduling pass; returns the ids of the jobs it placed."""
        manager = self.manager
        now = manager.now()
        wall, backoffs, cached_requests = now.wall, manager.backoffs, self._requests
        ready: list[JobEntry] = []
        requests: list[scheduler.JobRequest] = []
        # Every pending job, every pass: only plain data here (message fields are slow to read).
        for job_id, entry in manager.pending.items():
            if backoffs and backoffs.get(job_id, 0.0) > wall:
                continue
            waiting = job_machine.waiting_for_previous(entry)
            if waiting is None:
                ready.append(entry)
                requests.append(cached_requests.get(job_id) or self.request(entry))
            elif not entry.job.reason.endswith(waiting):
                entry.job.reason = job_machine.pending_reason(entry.job, waiting)
        if not ready:
            return []
        started = self.elapsed_clock()
        usage = self.owner_usage(now.wall) if self.config.policy == "fair_share" else {}
        views = self.node_views()
        result = scheduler.schedule(views, requests, self.config, now=now.wall, usage_by_owner=usage)
        for job_id, reason in result.pending_reasons.items():
            waiting_entry = manager.pending.get(job_id)
            if waiting_entry is not None:
                waiting_entry.job.reason = job_machine.pending_reason(waiting_entry.job, reason)
        effects: list[Effect] = []
        placed: list[JobEntry] = []
        for decision in result.placed:
            entry = manager.jobs[decision.job_id]
            effects += self._start(entry, decision, now)
            placed.append(entry)
        for entry, started_effects in self._place_elastic(ready, result, now):
            effects += started_effects
            placed.append(entry)
        if not placed:
            return []
        self.decision_seconds.append(self.elapsed_clock() - started)
        del self.decision_seconds[:-KEPT_TIMINGS]
        self.placements += len(placed)
        manager.apply([effect for effect in effects if not isinstance(effect, Save)])  # placed jobs leave the queue now
        # Durable before launching: a coordinator that dies now restarts knowing these attempts,
        # so it can adopt or fence ranks that agents report.
        await manager.save([manager.jobs[job_id] for job_id in dict.fromkeys(e.job_id for e in effects if isinstance(e, Save))])
        for entry in placed:
            manager.apply(job_machine.launches(entry, manager.machine))
        return [entry.job.job_id for entry in placed]

    def _place_elastic(
        self, ready: list[JobEntry], result: scheduler.SchedulingResult, now: job_machine.Now
    ) -> list[tuple[JobEntry, list[Effect]]]:
        """Restarting elastic jobs that did not fit at full size try smaller sizes, down to min_gpus."""
        placed_ids = {decision.job_id for decision in result.placed}
        placed = []
        for entry in ready:
            if not entry.restart_reason:
                continue  # only a restart may shrink; most ready jobs are first attempts
            spec = entry.job.spec
            if spec.min_gpus >= spec.gpus or entry.job.job_id in placed_ids:
                continue
            if result.reserved_for and result.reserved_for != entry.job.job_id:
                continue  # someone holds a reservation; do not take capacity around it
            views = self.node_views()
            for size in scheduler.elastic_sizes(spec.gpus, spec.min_gpus, spec.gpus_per_node)[1:]:
                decision = scheduler.place(replace(self.request(entry), gpus=size), views, self.config)
                if decision is not None:
                    placed.append((entry, self._start(entry, decision, now)))  # taken now: the next job sees it
                    break
        return placed

    def _start(self, entry: JobEntry, decision: scheduler.Decision, now: job_machine.Now) -> list[Effect]:
        nodes = self.cluster.nodes
        first = decision.nodes[0].node_id
        placement = placement_of(decision, nodes, self._rendezvous_port(first))
        self.ports_in_use.setdefault(first, set()).add(placement.master_port)
        sessions = {
            share.node_id: (session.session_id if (session := nodes[share.node_id].session) is not None else 0)
            for share in decision.nodes
        }
        effects = job_machine.place(entry, placement, now, self.cluster.allocations, sessions, self.manager.machine)
        log.info(
            "job placed",
            job=entry.job.job_id,
            attempt=entry.job.attempt,
            nodes=[s.node_id for s in decision.nodes],
            gpus=placement.world_size,
        )
        return effects

    def port_released(self, node_id: str, port: int) -> None:
        self.ports_in_use.get(node_id, set()).discard(port)

    def _rendezvous_port(self, node_id: str) -> int:
        """A port for MASTER_PORT, not used by another attempt whose rank 0 is on the same node."""
        in_use = self.ports_in_use.setdefault(node_id, set())
        low, high = self.rendezvous_ports
        while True:
            port = self.rng.randrange(low, high)
            if port not in in_use:
                return port
