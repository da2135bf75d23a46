"""Runtime prediction error on a trace: the coordinator's RuntimePredictor, replayed in submit order.

Each job is predicted from the jobs that had finished before it was submitted (submit + duration, queueing
left out: the trace has none), then observed once it ends. The Philly trace has no owner or name, so the tiers
that answer are (pool, gpus), pool and cluster (each VC is a pool). Reports, per quantile tried: the median
absolute error, how often the prediction is below the real runtime (an under-estimate: the case that hurts
backfill), the median of prediction / runtime, and which tiers answered.

    python bench/prediction.py [--trace ../shared/traces/philly-sep-dec.csv] [--quantiles 0.5,0.8,0.9]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.scheduler.prediction import RuntimePredictor

DEFAULT_TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "philly-sep-dec.csv"


def load_philly(path: Path) -> list[tuple[float, float, int, str]]:
    """(submit time, duration, gpus, pool) of every job with a positive duration, in submit order."""
    jobs = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            submit = datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            duration = float(row["duration"])
            if duration > 0:
                jobs.append((submit, duration, int(row["num_gpus"]), row["cluster"]))
    jobs.sort(key=lambda job: job[0])
    return jobs


def replay(jobs: list[tuple[float, float, int, str]], predictor: RuntimePredictor) -> dict:
    """Predicts every job from those finished before its submission; returns the error summary."""
    ends: list[tuple[float, int]] = []  # (end time, index of the job)
    errors: list[float] = []
    ratios: list[float] = []
    under = 0
    tiers: Counter[str] = Counter()
    started = time.perf_counter()
    for index, (submit, duration, gpus, pool) in enumerate(jobs):
        while ends and ends[0][0] <= submit:
            _, done = heapq.heappop(ends)
            _, done_duration, done_gpus, done_pool = jobs[done]
            predictor.observe(done_duration, gpus=done_gpus, pool=done_pool)
        prediction = predictor.predict(gpus=gpus, pool=pool)
        tiers[prediction.tier] += 1
        errors.append(abs(prediction.seconds - duration))
        ratios.append(prediction.seconds / duration)
        under += prediction.seconds < duration
        heapq.heappush(ends, (submit + duration, index))
    seconds = time.perf_counter() - started
    return {
        "median_absolute_error_seconds": round(statistics.median(errors), 1),
        "mean_absolute_error_seconds": round(statistics.fmean(errors), 1),
        "under_estimate_fraction": round(under / len(jobs), 4),
        "median_prediction_over_runtime": round(statistics.median(ratios), 3),
        "tiers": dict(tiers.most_common()),
        "microseconds_per_job": round(seconds / len(jobs) * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--quantiles", default="0.5,0.7,0.8,0.9,0.95", help="comma-separated quantiles to try")
    defaults = RuntimePredictor()
    parser.add_argument("--min-samples", type=int, default=defaults.min_samples)
    parser.add_argument("--window", type=int, default=defaults.window)
    args = parser.parse_args()
    jobs = load_philly(args.trace)
    durations = [job[1] for job in jobs]
    result: dict = {
        "trace": args.trace.name,
        "jobs": len(jobs),
        "runtime_median_seconds": statistics.median(durations),
        "min_samples": args.min_samples,
        "window": args.window,
        "default_quantile": defaults.quantile,
        "by_quantile": {},
    }
    for quantile in (float(part) for part in args.quantiles.split(",")):
        predictor = RuntimePredictor(quantile=quantile, min_samples=args.min_samples, window=args.window)
        result["by_quantile"][f"{quantile:g}"] = replay(jobs, predictor)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
