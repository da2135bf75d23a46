"""What a replay measured, as one JSON-ready dict: totals and per pool.

Definitions (seconds unless said otherwise):
- JCT (job completion time): end - submit.
- Queueing delay: first start - submit (the wait before the first attempt; later waits after a
  preemption are in the JCT, not here).
- Utilisation, `utilization_window`: GPU-seconds allocated to attempts (placement to the ranks' end)
  inside the pool's window from its first to its last submit, divided by (pool GPUs x that window): how
  busy the GPUs are while jobs keep arriving. `utilization_makespan`: the same from the pool's first
  submit to its last job's end (the tail, where the queue drains, included). `utilization_queued`: the
  same over the times at which the pool had jobs pending (waiting for GPUs): the share of GPUs the
  scheduler keeps busy while work waits, i.e. how little it leaves idle behind a blocked job; None if no
  job waited. Totals add up each pool's allocated and available GPU-seconds over its own windows (pools
  scaled to one load have windows of different lengths).
- Makespan: last end - first submit.
- Percentiles are nearest-rank.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from coordinator.sim.records import JobRecord, Outcome


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _allocated(records: Iterable[JobRecord], start: float, end: float) -> float:
    """GPU-seconds allocated within [start, end]."""
    total = 0.0
    for record in records:
        for run_start, run_end, gpus in record.runs:
            overlap = min(run_end, end) - max(run_start, start)
            if overlap > 0:
                total += gpus * overlap
    return total


Timeline = Sequence[tuple[float, bool, int]]


def queued_utilization(timelines: Iterable[tuple[Timeline, int]]) -> float | None:
    """Busy GPU-seconds / available GPU-seconds over the stretches during which a pool had jobs pending,
    from (timeline, the pool's GPUs) pairs."""
    busy = available = 0.0
    for timeline, gpus in timelines:
        for (start, pending, in_use), (end, _, _) in itertools.pairwise(timeline):
            if pending:
                busy += in_use * (end - start)
                available += gpus * (end - start)
    return busy / available if available > 0 else None


Group = tuple[Sequence[JobRecord], int, Timeline]
"""One pool: its jobs, its GPUs, its timeline."""


def _utilization_parts(records: Sequence[JobRecord], gpus: int) -> tuple[float, float, float, float]:
    """(allocated, available) GPU-seconds over the pool's window of submits, then over its makespan."""
    if not records or not gpus:
        return 0.0, 0.0, 0.0, 0.0
    first = min(record.submit for record in records)
    last_submit = max(record.submit for record in records)
    last_end = max((record.end for record in records if record.end is not None), default=first)
    return (
        _allocated(records, first, last_submit),
        gpus * (last_submit - first),
        _allocated(records, first, last_end),
        gpus * (last_end - first),
    )


def summary(groups: Sequence[Group]) -> dict:
    """The metrics of one pool, or of several together (utilisation then adds up each pool's own window)."""
    records = [record for group in groups for record in group[0]]
    done = [record for record in records if record.end is not None]
    jct = [record.end - record.submit for record in done if record.end is not None]
    waits = [record.first_start - record.submit for record in records if record.first_start is not None]
    parts = [_utilization_parts(members, gpus) for members, gpus, _ in groups]
    window_busy, window_all, span_busy, span_all = (sum(column) for column in zip(*parts, strict=True)) if parts else (0, 0, 0, 0)
    first = min((record.submit for record in records), default=0.0)
    return {
        "jobs": len(records),
        "completed": len(done),
        "gpus": sum(gpus for _, gpus, _ in groups),
        "avg_jct": sum(jct) / len(jct) if jct else 0.0,
        "p50_jct": percentile(jct, 0.50),
        "p99_jct": percentile(jct, 0.99),
        "avg_queueing_delay": sum(waits) / len(waits) if waits else 0.0,
        "p99_queueing_delay": percentile(waits, 0.99),
        "preemptions": sum(record.preemptions for record in records),
        "makespan": max((record.end for record in done if record.end is not None), default=first) - first,
        "utilization_window": window_busy / window_all if window_all > 0 else 0.0,
        "utilization_makespan": span_busy / span_all if span_all > 0 else 0.0,
        "utilization_queued": queued_utilization((timeline, gpus) for _, gpus, timeline in groups),
    }


def per_job(records: Iterable[JobRecord]) -> list[dict]:
    """Each job's times (simulated seconds), in submit order."""
    return [
        {
            "name": record.trace.name,
            "pool": record.trace.pool,
            "gpus": record.trace.gpus,
            "submit": record.submit,
            "start": record.first_start,
            "end": record.end,
            "attempts": record.attempts,
        }
        for record in sorted(records, key=lambda record: (record.submit, record.trace.line))
    ]


def report(outcome: Outcome, extra: dict | None = None, jobs: bool = False) -> dict:
    """The whole replay: totals over every pool, then each pool's, the refusals and the scheduler's cost
    (and, with `jobs`, every job's times)."""
    by_pool: dict[str, list[JobRecord]] = {pool: [] for pool in outcome.pools}
    for record in outcome.records:
        by_pool[record.trace.pool].append(record)
    sizes = {pool: nodes * per_node for pool, (nodes, per_node) in outcome.pools.items()}
    refused_by_reason: dict[str, int] = {}
    refused_by_pool: dict[str, int] = {}
    for refusal in outcome.refused:
        refused_by_reason[refusal.kind] = refused_by_reason.get(refusal.kind, 0) + 1
        refused_by_pool[refusal.job.pool] = refused_by_pool.get(refusal.job.pool, 0) + 1
    groups: dict[str, Group] = {pool: (by_pool[pool], sizes[pool], outcome.timelines[pool]) for pool in outcome.pools}
    total = summary(list(groups.values()))
    return {
        **total,
        "refused": len(outcome.refused),
        "refused_by_reason": refused_by_reason,
        **(extra or {}),
        "scheduler_cpu_seconds": outcome.scheduler_cpu_seconds,
        "passes": outcome.passes,
        "placements": outcome.placements,
        "per_pool": {pool: {**summary([group]), "refused": refused_by_pool.get(pool, 0)} for pool, group in groups.items()},
        **({"per_job": per_job(outcome.records)} if jobs else {}),
    }
