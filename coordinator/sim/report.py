"""What a replay measured, as one JSON-ready dict: totals and per pool.

Definitions (seconds unless said otherwise):
- JCT (job completion time): end - submit.
- Queueing delay: first start - submit (the wait before the first attempt; later waits after a
  preemption are in the JCT, not here).
- Utilisation, `utilization_window`: GPU-seconds allocated to attempts (placement to the ranks' end)
  inside the window from the first to the last submit, divided by (pool GPUs x that window): how busy
  the GPUs are while jobs keep arriving. `utilization_makespan`: the same from the first submit to the
  last job's end (the tail, where the queue drains, included). `utilization_queued`: the same over the
  times at which jobs were pending (waiting for GPUs): what share of the GPUs the scheduler keeps busy
  when there is work waiting, i.e. how little it leaves idle behind a blocked job. None if no job waited.
- Makespan: last end - first submit.
- Percentiles are nearest-rank.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from coordinator.sim.engine import JobRecord, Outcome


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


def summary(records: Sequence[JobRecord], gpus: int, timelines: Iterable[tuple[Timeline, int]] = ()) -> dict:
    """The metrics of `records` on `gpus` GPUs (`timelines`: their pools' pending and busy changes)."""
    done = [record for record in records if record.end is not None]
    jct = [record.end - record.submit for record in done if record.end is not None]
    waits = [record.first_start - record.submit for record in records if record.first_start is not None]
    result: dict = {
        "jobs": len(records),
        "completed": len(done),
        "gpus": gpus,
        "avg_jct": sum(jct) / len(jct) if jct else 0.0,
        "p50_jct": percentile(jct, 0.50),
        "p99_jct": percentile(jct, 0.99),
        "avg_queueing_delay": sum(waits) / len(waits) if waits else 0.0,
        "p99_queueing_delay": percentile(waits, 0.99),
        "preemptions": sum(record.preemptions for record in records),
        "utilization_queued": queued_utilization(timelines),
    }
    if not records:
        return {**result, "makespan": 0.0, "utilization_window": 0.0, "utilization_makespan": 0.0}
    first = min(record.submit for record in records)
    last_submit = max(record.submit for record in records)
    last_end = max((record.end for record in done if record.end is not None), default=first)
    window, makespan = last_submit - first, last_end - first
    result["makespan"] = makespan
    result["utilization_window"] = _allocated(records, first, last_submit) / (gpus * window) if window > 0 and gpus else 0.0
    result["utilization_makespan"] = _allocated(records, first, last_end) / (gpus * makespan) if makespan > 0 and gpus else 0.0
    return result


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
    timelines = [(outcome.timelines[pool], sizes[pool]) for pool in outcome.pools]
    total = summary(outcome.records, sum(sizes.values()), timelines)
    return {
        **total,
        "refused": len(outcome.refused),
        "refused_by_reason": refused_by_reason,
        **(extra or {}),
        "scheduler_cpu_seconds": outcome.scheduler_cpu_seconds,
        "passes": outcome.passes,
        "placements": outcome.placements,
        "per_pool": {
            pool: {
                **summary(records, sizes[pool], [(outcome.timelines[pool], sizes[pool])]),
                "refused": refused_by_pool.get(pool, 0),
            }
            for pool, records in by_pool.items()
        },
        **({"per_job": per_job(outcome.records)} if jobs else {}),
    }
