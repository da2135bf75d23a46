"""One scheduling pass (`schedule`), one job alone (`place`), and the sizes an elastic job may shrink to."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from coordinator.scheduler.capacity import _Pass, _Pool
from coordinator.scheduler.ordering import _FairShare, order_jobs
from coordinator.scheduler.preemption import _Preemptor, preemption_records
from coordinator.scheduler.quotas import _QuotaLedger
from coordinator.scheduler.reasons import _capacity_reason, _invalid, _names
from coordinator.scheduler.timeline import _Timeline, job_estimate, running_end
from coordinator.scheduler.types import (
    _NO_USAGE,
    Decision,
    JobRequest,
    NodeView,
    Preemption,
    Reservation,
    RunningJob,
    SchedulerConfig,
    SchedulingResult,
)

# --- elastic sizing and usage --------------------------------------------------------------------------


def elastic_sizes(gpus: int, min_gpus: int, gpus_per_node: int) -> list[int]:
    """World sizes to try, largest first: `gpus` down to `min_gpus`, multiples of gpus_per_node."""
    floor = min_gpus or gpus
    step = gpus_per_node or 1
    return [size for size in range(gpus, floor - 1, -1) if size % step == 0]


# --- the pass -----------------------------------------------------------------------------------------------


def place(job: JobRequest, nodes: Sequence[NodeView], config: SchedulerConfig) -> Decision | None:
    """Places one job alone against the nodes' free capacity (no reservations); None if it does not fit."""
    if _invalid(job):
        return None
    state = _Pass(nodes, config)
    return state.place(job, state.pool_for(job))


class _Held:
    """One pool's reservation during the pass."""

    __slots__ = ("indexes", "job", "node_ids", "start", "waiting")

    def __init__(self, job: JobRequest, indexes: list[int], node_ids: tuple[str, ...], start: float, waiting: str) -> None:
        self.job, self.indexes, self.node_ids, self.start, self.waiting = job, indexes, node_ids, start, waiting


class _Schedule:
    """The state of one pass (see `schedule`)."""

    def __init__(
        self,
        nodes: Sequence[NodeView],
        config: SchedulerConfig,
        now: float,
        running: Sequence[RunningJob],
        previous: Sequence[Reservation],
    ) -> None:
        self.nodes, self.config, self.now, self.running = nodes, config, now, running
        self.state = _Pass(nodes, config)
        self.node_index = {node_id: i for i, node_id in enumerate(self.state.node_ids)}
        self.previous = {r.job_id: r for r in previous}
        self.quotas = _QuotaLedger(config.quotas, running)
        self.held: dict[str, _Held] = {}
        """job.pool -> its reservation this pass."""
        self.held_nodes: set[int] = set()
        self.preemptions: list[Preemption] = []
        self._timeline: _Timeline | None = None
        self._placed_spans: list[tuple[int, int, float]] = []
        """(node index, GPUs, estimated end) of every placement this pass."""
        self._soon: dict[int, int] | None = None
        """Node index -> GPUs estimated to come free within preemption_cost_seconds (built when first needed)."""
        self._preemptor: _Preemptor | None = None

    @property
    def timeline(self) -> _Timeline:
        if self._timeline is None:
            self._timeline = _Timeline(self.node_index, self.running, self.now, self.config)
            for span in self._placed_spans:
                self._timeline.add(*span)
        return self._timeline

    @property
    def preemptor(self) -> _Preemptor:
        if self._preemptor is None:
            self._preemptor = _Preemptor(self.running, self.nodes, self.node_index, self.config, self.now)
        return self._preemptor

    def placed(self, job: JobRequest, decision: Decision) -> None:
        self.quotas.charge(job)
        estimate = job_estimate(job)
        end = self.now + (estimate if estimate > 0 else self.config.default_runtime_seconds)
        for share in decision.nodes:
            span = (self.node_index[share.node_id], len(share.gpu_uuids), end)
            self._placed_spans.append(span)
            if self._timeline is not None:
                self._timeline.add(*span)
            if self._soon is not None and end <= self.now + self.config.preemption_cost_seconds:
                self._soon[span[0]] = self._soon.get(span[0], 0) + span[1]

    def backfill(self, job: JobRequest, pool: _Pool) -> Decision | None:
        """A job that does not fit the unreserved GPUs may use reserved ones if it is predicted to end before
        its pool's reservation starts (EASY backfill: it cannot delay the reserved job)."""
        g, state = job.gpus, self.state
        held = self.held.get(job.pool)
        if held is None or not pool.held:
            return None
        estimate = job_estimate(job)
        if not (estimate > 0 and held.start < math.inf and self.now + estimate <= held.start):
            return None
        if pool.total_free + pool.held_free() < g:
            return None
        state.release(held.indexes)
        try:
            return state.place(job, pool)
        finally:
            state.hold(held.indexes)

    def reserve(self, job: JobRequest, pool: _Pool) -> _Held:
        closed = self.held_nodes
        candidates = [i for i in range(len(pool.exist)) if i not in closed]
        before = self.previous.get(job.job_id)
        previous = None
        if before is not None:
            indexes = [self.node_index.get(node_id) for node_id in before.node_ids]
            previous = None if None in indexes else [i for i in indexes if i is not None]
        chosen, start = self.timeline.reservation(job, pool, candidates, previous)
        chosen = sorted(chosen)
        self.state.hold(chosen)
        self.held_nodes.update(chosen)
        node_ids = tuple(self.state.node_ids[i] for i in chosen)
        waiting = f"waiting behind {job.job_id}, which holds a reservation on {_names(node_ids)}"
        held = self.held[job.pool] = _Held(job, chosen, node_ids, start, waiting)
        return held

    def _starts_soon(self, job: JobRequest, pool: _Pool, closed: frozenset[int]) -> bool:
        """Whether the job would fit within preemption_cost_seconds by waiting: never preempt for such a job.
        Counts only known estimated ends (of running jobs and this pass's placements) and stopping jobs: an
        unknown or overrun end is no reason to wait."""
        if self._soon is None:
            deadline = self.now + self.config.preemption_cost_seconds
            soon = self._soon = {}
            for r in self.running:
                if r.stopping or self.now < r.estimated_end_time <= deadline:
                    for share in r.nodes:
                        i = self.node_index.get(share.node_id)
                        if i is not None:
                            soon[i] = soon.get(i, 0) + len(share.gpu_uuids)
            for i, gpus, end in self._placed_spans:
                if end <= deadline:
                    soon[i] = soon.get(i, 0) + gpus
        soon, exist, free, k = self._soon, pool.exist, pool.free, job.gpus_per_node
        open_held = [(i, count) for i, count in pool.held.items() if i not in closed]
        if k:
            ready = pool.nodes_with_free(k) + sum(1 for _, count in open_held if count >= k)
            for i, coming in soon.items():
                have = len(free[i])
                if have < k and exist[i] and i not in closed and have + min(coming, exist[i] - have) >= k:
                    ready += 1
            return ready >= job.gpus // k
        total = pool.total_free + sum(count for _, count in open_held)
        for i, coming in soon.items():
            if exist[i] and i not in closed:
                total += min(coming, exist[i] - len(free[i]))
        return total >= job.gpus

    def hold_for(self, job: JobRequest, nodes: list[int], now: float) -> None:
        """The pool's reservation is the preempting head's nodes, starting as soon as its victims stop."""
        node_ids = tuple(self.state.node_ids[i] for i in nodes)
        waiting = f"waiting behind {job.job_id}, which holds a reservation on {_names(node_ids)}"
        self.held[job.pool] = _Held(job, nodes, node_ids, now, waiting)

    def preempt(self, job: JobRequest, pool: _Pool) -> tuple[str, list[int]] | None:
        """Looks for victims for a blocked job; if it found some (or GPUs already stopping suffice), holds the
        nodes it will start on and returns why it waits and those nodes."""
        closed = frozenset(self.held_nodes)
        found = self.preemptor.find(job, pool, closed)
        if found is None:
            return None
        victims, stopping, nodes = found
        if stopping:
            reason = "waiting for preempted jobs to stop"
        elif self._starts_soon(job, pool, closed):
            return None
        else:
            self.preemptor.take(v for v, _ in victims)
            self.preemptions.extend(preemption_records(job, victims))
            timeline, soon = self.timeline, self._soon
            for victim, _ in victims:  # stopping now, as far as planning goes (their GPUs are not reused this pass)
                end = running_end(victim, self.now, self.config)
                for share in victim.nodes:
                    i = self.node_index.get(share.node_id)
                    if i is not None:
                        timeline.end_now(i, len(share.gpu_uuids), end)
                        if soon is not None:
                            soon[i] = soon.get(i, 0) + len(share.gpu_uuids)
            reason = f"preempting {_names([v.job_id for v, _ in victims])} ({victims[0][1]}); starts once they stop"
        self.state.hold(nodes)
        self.held_nodes.update(nodes)
        return reason, nodes


def schedule(
    nodes: Sequence[NodeView],
    pending: Sequence[JobRequest],
    config: SchedulerConfig,
    *,
    now: float,
    usage_by_owner: Mapping[str, float] = _NO_USAGE,
    running: Sequence[RunningJob] = (),
    previous_reservations: Sequence[Reservation] = (),
) -> SchedulingResult:
    """One scheduling pass: the jobs to start now and where, the running jobs to preempt, and why each other
    job waits.

    `usage_by_owner` (GPU-seconds used, by owner) matters to fair_share only. `running` lists the jobs holding
    GPUs: their estimated ends place reservations in time (backfill), they are the preemption candidates, and
    they count against quotas. `previous_reservations` is the last pass's `SchedulingResult.reservations`: a
    job keeps its reserved nodes unless another choice would start it earlier.
    """
    run = _Schedule(nodes, config, now, running, previous_reservations)
    state = run.state
    if config.policy == "fair_share":
        fair = _FairShare(pending, config, usage_by_owner)
        jobs: Iterable[JobRequest] = fair
    else:
        fair = None
        jobs = order_jobs(pending, config, now=now)

    placed: list[Decision] = []
    reasons: dict[str, str] = {}
    cached: dict[tuple, str] = {}
    plain, only_pool = state.plain, state.only_pool
    reserve_after = config.reserve_after_seconds
    quotas = run.quotas if run.quotas.active else None
    preempting = bool(config.preemption) or config.policy in ("las", "srtf")
    backfill = config.backfill
    holds = run.held
    for job in jobs:
        g, k = job.gpus, job.gpus_per_node
        if g <= 0 or k < 0 or (k and g % k):
            reasons[job.job_id] = _invalid(job) or ""
            continue
        if quotas is not None:
            over = quotas.blocked(job)
            if over is not None:
                reasons[job.job_id] = over
                continue
        held = holds.get(job.pool) if holds else None
        if held is not None and not backfill:
            reasons[job.job_id] = f"waiting behind {held.job.job_id} (strict order: no backfill)"
            continue
        pool = (
            state.pool_for(job)
            if job.min_memory_per_gpu_bytes or job.gpu_model or job.pool != only_pool or job.excluded_gpus
            else plain
        )
        decision = state.place(job, pool) if pool.total_free >= g else None
        if decision is None and held is not None and held.start > now:
            decision = run.backfill(job, pool)
        if decision is not None:
            placed.append(decision)
            run.placed(job, decision)
            if fair is not None:
                fair.charge(job)
            cached.clear()
            continue
        could_fit = None
        if (
            held is None
            and config.reservations
            and (reserve_after <= 0 or now - job.submit_time >= reserve_after)
            and (could_fit := state.fits_ever(job, pool))
        ):
            preempted = run.preempt(job, pool) if preempting and run.preemptor.may_search(job) else None
            if preempted is not None:  # it holds the nodes it preempted on, until it starts there
                reasons[job.job_id], preempted_on = preempted
                run.hold_for(job, preempted_on, now)
                cached.clear()
                continue
            held = run.reserve(job, pool)
            so_far = sum(min(pool.held[i], k) for i in held.indexes) if k else min(sum(pool.held[i] for i in held.indexes), g)
            when = f"; estimated to start in {held.start - now:.0f} s" if held.start < math.inf else ""
            reasons[job.job_id] = f"reserving {_names(held.node_ids)}: {so_far} of {g} GPUs free so far{when}"
            cached.clear()
            continue
        if preempting and run.preemptor.may_search(job) and (could_fit if could_fit is not None else state.fits_ever(job, pool)):
            preempted = run.preempt(job, pool)
            if preempted is not None:
                reasons[job.job_id] = preempted[0]
                cached.clear()
                continue
        # Jobs of one shape wait for the same reason until capacity changes: cheap rejections when full.
        shape = (g, k, job.min_memory_per_gpu_bytes, job.gpu_model, job.pool, job.excluded_gpus)
        reason = cached.get(shape)
        if reason is None:
            if held is not None and state.fits_with_held(job, pool):
                reason = held.waiting
            else:
                reason = _capacity_reason(job, pool, state.known_pools)
            cached[shape] = reason
        reasons[job.job_id] = reason

    reservations = tuple(Reservation(h.job.job_id, h.node_ids, h.start, pool_name) for pool_name, h in run.held.items())
    first = reservations[0] if reservations else None
    return SchedulingResult(
        tuple(placed),
        reasons,
        first.job_id if first else None,
        first.node_ids if first else (),
        tuple(run.preemptions),
        reserved_start_time=first.start_time if first else 0.0,
        reservations=reservations,
    )
