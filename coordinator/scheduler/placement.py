"""One scheduling pass (`schedule`), one job alone (`place`), and the sizes an elastic job may shrink to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from coordinator.scheduler.capacity import _Pass
from coordinator.scheduler.ordering import _FairShare, order_jobs
from coordinator.scheduler.reasons import _capacity_reason, _invalid, _names
from coordinator.scheduler.types import _NO_USAGE, Decision, JobRequest, NodeView, RunningJob, SchedulerConfig, SchedulingResult

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


def schedule(
    nodes: Sequence[NodeView],
    pending: Sequence[JobRequest],
    config: SchedulerConfig,
    *,
    now: float,
    usage_by_owner: Mapping[str, float] = _NO_USAGE,
    running: Sequence[RunningJob] = (),
) -> SchedulingResult:
    """One scheduling pass: the jobs to start now and where, and why each other job waits.

    `usage_by_owner` (GPU-seconds used, by owner) matters to fair_share only. `now` is
    compared with submit times for `reserve_after_seconds`. `running` lists the jobs holding GPUs
    (for backfill against their estimated ends, and preemption).
    """
    del running  # not used yet
    state = _Pass(nodes, config)
    if config.policy == "fair_share":
        fair = _FairShare(pending, config, usage_by_owner)
        jobs: Iterable[JobRequest] = fair
    else:
        fair = None
        jobs = order_jobs(pending, config)

    placed: list[Decision] = []
    reasons: dict[str, str] = {}
    holder: JobRequest | None = None
    reserved: tuple[str, ...] = ()
    waiting = ""
    cached: dict[tuple, str] = {}

    plain, only_pool = state.plain, state.only_pool
    reserve_after = config.reserve_after_seconds
    for job in jobs:
        g, k = job.gpus, job.gpus_per_node
        if g <= 0 or k < 0 or (k and g % k):
            reasons[job.job_id] = _invalid(job) or ""
            continue
        pool = state.pool_for(job) if job.min_memory_per_gpu_bytes or job.gpu_model or job.pool != only_pool else plain
        if pool.total_free >= g:
            decision = state.place(job, pool)
            if decision is not None:
                placed.append(decision)
                if fair is not None:
                    fair.charge(job)
                cached.clear()
                continue
        if (
            holder is None
            and config.reservations
            and (reserve_after <= 0 or now - job.submit_time >= reserve_after)
            and state.fits_ever(job, pool)
        ):
            holder = job
            chosen = state.reserve(job, pool)
            reserved = tuple(state.node_ids[i] for i in chosen)
            so_far = sum(min(pool.held[i], k) for i in chosen) if k else min(pool.held_free(), g)
            reasons[job.job_id] = f"reserving {_names(reserved)}: {so_far} of {g} GPUs free so far"
            waiting = f"waiting behind {job.job_id}, which holds a reservation on {_names(reserved)}"
            cached.clear()
            continue
        # Jobs of one shape wait for the same reason until capacity changes: cheap rejections when full.
        shape = (g, k, job.min_memory_per_gpu_bytes, job.gpu_model, job.pool)
        reason = cached.get(shape)
        if reason is None:
            if holder is not None and state.fits_with_held(job, pool):
                reason = waiting
            else:
                reason = _capacity_reason(job, pool, state.known_pools)
            cached[shape] = reason
        reasons[job.job_id] = reason

    return SchedulingResult(tuple(placed), reasons, holder.job_id if holder else None, reserved)
