"""The scheduling loop: when to run a pass, what the scheduler sees, and applying what it decides.

Each pass builds the scheduler's plain views (coordinator/scheduler/ imports nothing of ours), asks
it where the ready jobs go, turns its decisions into placements, lets the job rules start the
attempts (coordinator/rules/job_machine.place), makes them durable, and only then launches them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.running_view import RunningView, attained_service_seconds
from coordinator.model.cluster import NodeRecord
from coordinator.model.jobs import JobEntry
from coordinator.model.telemetry import GPU_UTILIZATION, MEMORY_USED, SAMPLE_FIELDS, TEMPERATURE
from coordinator.rules import job_machine, preemption
from coordinator.rules.effects import Effect, Preempted, Save, Stop
from gpuorch.pools import DEFAULT_POOL
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
        estimates: Estimates | None = None,
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
        self.estimates = estimates or Estimates()
        """Runtime predictions for the requests, and start-time estimates (control/estimates.py)."""
        self.running = RunningView(self._request_of_live)
        """The jobs holding GPUs, as the scheduler sees them (`running_jobs`)."""
        self.reservations: tuple[scheduler.Reservation, ...] = ()
        """The last pass's reservations, passed back so that each stays on its nodes."""

    async def run(self) -> None:
        forecasts = asyncio.create_task(self.estimates.run(self))  # start-time estimates, beside the passes
        try:
            while True:
                try:
                    await asyncio.wait_for(self.wake.wait(), self._next_timer())
                except TimeoutError:
                    pass
                self.wake.clear()
                self.manager.expire_expected_nodes()
                self.manager.detect_hangs()
                await self.schedule_pass()
        finally:
            forecasts.cancel()

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
                pool=node.pool,
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
        spec's message fields each time cost more than the scheduler's own ordering (`request_changed` drops it).
        Its runtime estimate is the user's, else the time limit, else a prediction (control/estimates.py)."""
        request = self._requests.get(entry.job.job_id)
        if request is None:
            spec = entry.job.spec
            request = scheduler.JobRequest(
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
                pool=spec.pool or DEFAULT_POOL,
                time_limit_seconds=float(spec.time_limit_seconds),
                group=self.manager.quotas.group_of(spec.owner),
                preemptible=not spec.non_preemptible,
                attained_service_seconds=attained_service_seconds(entry.job, entry.job.attempt + 1) if entry.job.attempt else 0.0,
            )
            request = self._requests[entry.job.job_id] = self.estimates.with_estimate(request, spec.name)
        return request

    def request_changed(self, job_id: str) -> None:
        """The job's spec changed (its priority): its request is built again at the next pass."""
        self._requests.pop(job_id, None)
        self.running.changed(job_id)

    def _request_of_live(self, entry: JobEntry) -> scheduler.JobRequest:
        request = self._requests.get(entry.job.job_id) or self.request(entry)
        if entry.final:  # a cancelled job's ranks still stopping: not kept once they are gone
            self._requests.pop(entry.job.job_id, None)
        return request

    def running_jobs(self) -> list[scheduler.RunningJob]:
        """Every job with a live attempt (placed, starting, running, or stopping), as the scheduler sees it."""
        return self.running.jobs()

    def forget(self, job_id: str) -> None:
        """The job is final: it will not be scheduled again."""
        self._requests.pop(job_id, None)

    def finished(self, entry: JobEntry, state: int, reason: str) -> None:
        """The job reached a final state: its runtime teaches the predictor."""
        log.info("job finished", job=entry.job.job_id, state=job_pb2.JobState.Name(state), reason=reason)
        self.estimates.learn((entry,))

    def owner_usage(self, now: float) -> dict[str, float]:
        """Each owner's GPU-seconds, decayed with a one-hour half-life (for fair_share)."""
        intervals = (
            (
                entry.job.spec.owner,
                attempt.placement.world_size,
                attempt.start_time.ToNanoseconds() / 1e9,
                attempt.end_time.ToNanoseconds() / 1e9 if attempt.HasField("end_time") else now,
            )
            for entry in self.manager.jobs.values()
            for attempt in entry.job.attempts
        )
        return scheduler.decayed_usage(intervals, now, FAIR_SHARE_HALF_LIFE_SECONDS)

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
        if self.estimates.refresh(cached_requests, started):
            requests = [cached_requests[entry.job.job_id] for entry in ready]
        usage = self.owner_usage(now.wall) if self.config.policy == "fair_share" else {}
        views = self.node_views()
        result = scheduler.schedule(
            views,
            requests,
            self.config,
            now=now.wall,
            usage_by_owner=usage,
            running=self.running_jobs(),
            previous_reservations=self.reservations,
        )
        self.reservations = result.reservations
        for job_id, reason in result.pending_reasons.items():
            waiting_entry = manager.pending.get(job_id)
            if waiting_entry is not None:
                waiting_entry.job.reason = job_machine.pending_reason(waiting_entry.job, reason)
        effects: list[Effect] = self._preempt(result.preemptions, now)
        placed: list[JobEntry] = []
        for decision in result.placed:
            entry = manager.jobs[decision.job_id]
            effects += self._start(entry, decision, now)
            placed.append(entry)
        for entry, started_effects in self._place_elastic(ready, result, now):
            effects += started_effects
            placed.append(entry)
        if not effects:
            return []
        if placed:
            self.decision_seconds.append(self.elapsed_clock() - started)
            del self.decision_seconds[:-KEPT_TIMINGS]
            self.placements += len(placed)
        manager.apply([effect for effect in effects if not isinstance(effect, Save | Stop)])  # placed jobs leave the queue now
        # Durable before launching: a coordinator that dies now restarts knowing these attempts,
        # so it can adopt or fence ranks that agents report. And before a preempted job's ranks are
        # stopped: restarted, it knows them preempted (a rank that checkpoints and exits 0 is no success).
        await manager.save([manager.jobs[job_id] for job_id in dict.fromkeys(e.job_id for e in effects if isinstance(e, Save))])
        manager.apply([effect for effect in effects if isinstance(effect, Stop)])
        for entry in placed:
            manager.apply(job_machine.launches(entry, manager.machine))
        return [entry.job.job_id for entry in placed]

    def _preempt(self, preemptions: tuple[scheduler.Preemption, ...], now: job_machine.Now) -> list[Effect]:
        """The job rules' effects of stopping the running jobs the pass chose to make room (job_machine.preempt)."""
        effects: list[Effect] = []
        for chosen in preemptions:
            victim = self.manager.jobs.get(chosen.victim_job_id)
            if victim is not None:
                effects += job_machine.preempt(victim, chosen.for_job_id, chosen.reason, now, self.manager.machine)
                self._requests.pop(chosen.victim_job_id, None)  # requeued: built again with the service it attained
        return effects

    def preempted(self, effect: Preempted) -> None:
        """For the log and the metrics (gpuorch_job_restarts_total{reason="preempted"})."""
        log.info("attempt preempted", job=effect.job_id, attempt=effect.attempt, for_job=effect.for_job_id, reason=effect.reason)
        restarts = self.manager.restarts_by_reason
        restarts[preemption.PREEMPTED] = restarts.get(preemption.PREEMPTED, 0) + 1

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
        entry.job.ClearField("estimated_start_time")
        effects = job_machine.place(entry, placement, now, self.cluster.allocations, sessions, self.manager.machine)
        self.running.placed(entry, decision, now.wall, self._requests.get(entry.job.job_id) or self.request(entry))
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
