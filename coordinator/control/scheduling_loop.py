"""The scheduling loop: when to run a pass, what the scheduler sees, and applying what it decides.

Each pass builds the scheduler's plain views (coordinator/scheduler/ imports nothing of ours), asks
it where the ready jobs go, turns its decisions into placements, lets the job rules start the
attempts (coordinator/rules/job_machine.place), makes them durable, and only then launches them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.node_views import NodeViewCache
from coordinator.control.placements import RendezvousPorts, placement_of
from coordinator.control.running_view import RunningView, attained_service_seconds, attempt_intervals
from coordinator.model.jobs import JobEntry
from coordinator.model.node_state import Liveness
from coordinator.rules import job_machine, job_reasons, launch_timeout, preemption
from coordinator.rules.effects import Effect, Preempted, Stop
from gpuorch.clock import stamp_seconds
from gpuorch.logs import get_logger
from gpuorch.pools import DEFAULT_POOL
from gpuorch.v1 import job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = get_logger("coordinator.jobs")

PERIODIC_PASS_SECONDS = 1.0
"""A scheduling pass runs at least this often (backoffs ending, hang checks, telemetry)."""
FAIR_SHARE_HALF_LIFE_SECONDS = 3600.0
KEPT_TIMINGS = 1000
NO_GPUS: frozenset[str] = frozenset()
"""The excluded GPUs of almost every request: one shared empty set, not one for the collector to track per job."""
MAX_REST_SECONDS = 1.0
"""After a pass the loop rests as long as the pass took (at most this) before the next one: a pass holds the event
loop, and a burst of wakes (a fleet registering into a long queue: each node wakes a pass) ran them back to back,
so heartbeats went unread until healthy nodes were declared down. Passes take at most half of the loop's time."""


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
        self.ports = RendezvousPorts(rendezvous_ports, rng)
        """MASTER_PORTs of the attempts not yet over, by the node of their rank 0."""
        self.elapsed_clock = elapsed_clock
        """Times passes (the clock's monotonic time)."""
        self.wake = asyncio.Event()
        self.placements = 0
        self.decision_seconds: list[float] = []
        """Duration of recent scheduling passes that placed something (for benchmarks and metrics)."""
        self._views = NodeViewCache()
        self._requests: dict[str, scheduler.JobRequest] = {}
        """Job id -> the scheduler's view of the job (dropped when its spec changes or it is final)."""
        self.estimates = estimates or Estimates()
        """Runtime predictions for the requests, and start-time estimates (control/estimates.py)."""
        self.running = RunningView(self._request_of_live)
        """The jobs holding GPUs, as the scheduler sees them (`running_jobs`)."""
        self.reservations: tuple[scheduler.Reservation, ...] = ()
        """The last pass's reservations, passed back so that each stays on its nodes."""
        self._shown_waits: dict[str, str] = {}
        """Pending job id -> the scheduler's reason last rendered into its `reason` (dropped as it enters or
        leaves the queue): a reason is written only when it changes, not for every waiting job every pass."""
        self.restarting: set[str] = set()
        """Pending job ids whose next attempt is a restart (Job.pending_restart_reason set, read once as the job
        enters the queue): only these have a restart to tell in their reason, or may shrink (elastic)."""

        self._settled_usage: dict[str, float] = {}
        """Owner -> decayed GPU-seconds of final jobs' attempts as of `_settled_at`: each final job is added once,
        so a fair_share pass reads only the jobs still pending or running, not every job ever held."""
        self._settled_at = 0.0

    async def run(self) -> None:
        forecasts = asyncio.create_task(self.estimates.run(self))  # start-time estimates, beside the passes
        try:
            while True:
                try:
                    await asyncio.wait_for(self.wake.wait(), self._next_timer())
                except TimeoutError:
                    pass
                self.wake.clear()
                started = self.elapsed_clock()
                await self.step()
                await asyncio.sleep(min(self.elapsed_clock() - started, MAX_REST_SECONDS))
        finally:
            forecasts.cancel()

    async def step(self) -> list[str]:
        """What the loop does at each wake: deadlines of expected nodes, hangs, launches that never
        finished, then a pass. The simulator (coordinator/sim/) calls this at each event time, so it runs
        the same path."""
        manager = self.manager
        manager.expire_expected_nodes()
        manager.detect_hangs()
        if manager.machine.launch_timeout_seconds:
            ready = self._node_ready
            manager.apply(launch_timeout.fail_stalled(manager.running.values(), manager.now(), manager.machine, ready))
        return await self.schedule_pass()

    def _node_ready(self, node_id: str) -> bool:
        """Connected and READY: a launch there that does not finish is the launch timeout's, not liveness's."""
        node = self.cluster.nodes.get(node_id)
        return node is not None and node.liveness.state is Liveness.READY and node_id not in self.manager.expected_nodes

    def _next_timer(self) -> float:
        """Seconds until the loop must look again: the next backoff to end, at most a second."""
        now = self.manager.clock.wall()
        waits = [not_before - now for not_before in self.manager.backoffs.values() if not_before > now]
        return max(0.01, min([PERIODIC_PASS_SECONDS, *waits]))

    # -- what the scheduler sees --

    def node_views(self) -> list[scheduler.NodeView]:
        """The scheduler's view of every node (control/node_views.py caches them)."""
        return self._views.views(self.cluster, self.manager.clock.monotonic())

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
                submit_time=stamp_seconds(entry.job.submit_time),
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
                excluded_gpus=frozenset(excluded) if (excluded := entry.job.excluded_device_uuids) else NO_GPUS,
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

    def queue_changed(self, job_id: str, restarting: bool = False) -> None:
        """The job entered the queue (`restarting`: for a restart) or left it; the rules wrote its reason, so the
        next wait is rendered anew."""
        self._shown_waits.pop(job_id, None)
        if restarting:
            self.restarting.add(job_id)
        else:
            self.restarting.discard(job_id)

    def forget(self, job_id: str) -> None:
        """The job is final: it will not be scheduled again; under fair_share its usage joins the settled usage."""
        self._requests.pop(job_id, None)
        self.estimates.forget(job_id)
        self._shown_waits.pop(job_id, None)
        self.restarting.discard(job_id)
        if self.config.policy != "fair_share":
            return  # only fair_share reads owners' usage (owner_usage); the policy is fixed for the loop's life
        entry = self.manager.jobs.get(job_id)
        if entry is None or not entry.job.attempts or entry.usage_settled:
            return
        entry.usage_settled = True
        # Decay is exponential, so usage as of one time is usage as of another times one factor.
        at = max(self.manager.clock.wall(), self._settled_at)
        factor = 0.5 ** ((at - self._settled_at) / FAIR_SHARE_HALF_LIFE_SECONDS)
        settled = {owner: used * factor for owner, used in self._settled_usage.items()}
        for owner, used in scheduler.decayed_usage(attempt_intervals([entry], at), at, FAIR_SHARE_HALF_LIFE_SECONDS).items():
            settled[owner] = settled.get(owner, 0.0) + used
        self._settled_usage, self._settled_at = settled, at

    def finished(self, entry: JobEntry, state: int, reason: str) -> None:
        """The job reached a final state: its runtime teaches the predictor."""
        log.info("job finished", job=entry.job.job_id, state=job_pb2.JobState.Name(state), reason=reason)
        self.estimates.learn((entry,))

    def owner_usage(self, now: float) -> dict[str, float]:
        """Each owner's GPU-seconds, decayed with a one-hour half-life (for fair_share): the jobs still pending
        or running, read now, and the final ones, settled as they ended."""
        live = (*self.manager.pending.values(), *self.manager.running.values())
        usage = scheduler.decayed_usage(attempt_intervals(live, now), now, FAIR_SHARE_HALF_LIFE_SECONDS)
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
        shown = self._shown_waits
        manager.arrays.before_pass()  # dependents released or cancelled as their targets changed
        # Most passes gate no job at all: then no job is asked (two calls per pending job per pass, otherwise).
        gated = manager.arrays.gated if manager.arrays.gates_any() else None
        gate = manager.arrays.gate
        # Every pending job, every pass: only plain data here (message fields are slow to read).
        for job_id, entry in manager.pending.items():
            if backoffs and backoffs.get(job_id, 0.0) > wall:
                continue
            if gated is not None and gated(job_id) and gate(entry):  # over its array's cap, or waiting for dependencies
                shown.pop(job_id, None)
                continue
            if entry.attempts:  # a restart waits until every rank of the earlier attempt has ended
                waiting = job_reasons.waiting_for_previous(entry)
                if waiting is not None:
                    shown.pop(job_id, None)
                    if not entry.job.reason.endswith(waiting):
                        entry.job.reason = job_reasons.pending_reason(entry.job, waiting)
                    continue
            ready.append(entry)
            requests.append(cached_requests.get(job_id) or self.request(entry))
        if not ready:
            return []
        started = self.elapsed_clock()
        if self.estimates.refresh(cached_requests):
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
        restarting = self.restarting
        for job_id, reason in result.pending_reasons.items():
            # Written only when it changes, and rendered from the job only when it has a restart to tell first.
            if shown.get(job_id) != reason and (waiting_entry := manager.pending.get(job_id)) is not None:
                job = waiting_entry.job
                job.reason = job_reasons.pending_reason(job, reason) if job_id in restarting else reason
                shown[job_id] = reason
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
        stops = [effect for effect in effects if isinstance(effect, Stop)]
        # Placed jobs leave the queue now, their placements (and preemptions) in one write.
        write = manager.apply([effect for effect in effects if not isinstance(effect, Stop)])
        # Durable before launching: a coordinator that dies now restarts knowing these attempts,
        # so it can adopt or fence ranks that agents report. And before a preempted job's ranks are
        # stopped: restarted, it knows them preempted (a rank that checkpoints and exits 0 is no success).
        if write is not None:
            await write
        manager.apply(stops + [effect for entry in placed for effect in manager.arrays.launches(entry)])
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
        restarting = self.restarting
        if not restarting:
            return []  # only a restart may shrink; most ready jobs are first attempts
        placed_ids = {decision.job_id for decision in result.placed}
        placed = []
        for entry in ready:
            if entry.job.job_id not in restarting:
                continue
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
        placement = placement_of(decision, nodes, self.ports.take(first))
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
