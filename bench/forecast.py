"""Cost of the start-time forecast (coordinator/scheduler/forecast.py) at cluster scale.

1,000 nodes x 8 GPUs, every GPU held by running jobs with estimated ends over the next hour, and 10,000
pending jobs of 1-16 GPUs (bench/schedule.py's mix) with estimates: the worst case, where every step of the
forecast is a full pass over a saturated cluster. Times `forecast_starts` at the coordinator's bounds and at
others, and says how many pending jobs got an estimate.

    python bench/forecast.py [--nodes 1000] [--gpus-per-node 8] [--jobs 10000] [--steps 8,32] [--max-jobs 500,2000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.scheduler import GpuView, JobRequest, NodeShare, NodeView, RunningJob, SchedulerConfig
from coordinator.scheduler.forecast import DEFAULT_MAX_JOBS, DEFAULT_MAX_STEPS, forecast_steps

JOB_SIZES = (1, 1, 1, 2, 2, 4, 4, 8, 8, 16)
NOW = 1_800_000_000.0


def setup(nodes: int, gpus_per_node: int, jobs: int, rng: random.Random):
    views, running = [], []
    for n in range(nodes):
        node_id = f"node-{n:04d}"
        gpus = tuple(
            GpuView(f"GPU-{n:04d}-{i}", i, "H100 80GB", 80 << 30, 1 << 30, 90.0, 50.0, True, False) for i in range(gpus_per_node)
        )
        views.append(NodeView(node_id, True, gpus))
        index = 0
        while index < gpus_per_node:  # the node's GPUs split among running jobs of 1, 2, 4 or 8 GPUs
            size = min(rng.choice((1, 2, 4, 8)), gpus_per_node - index)
            share = NodeShare(node_id, tuple(gpu.uuid for gpu in gpus[index : index + size]))
            end = NOW + rng.uniform(60, 3600)
            running.append(RunningJob(f"r-{n}-{index}", (share,), start_time=NOW - 600, estimated_end_time=end))
            index += size
    pending = [
        JobRequest(
            f"j-{j:06d}",
            rng.choice(JOB_SIZES),
            priority=rng.randrange(3),
            submit_time=NOW - jobs + j,
            owner=f"user{rng.randrange(20)}",
            estimated_runtime_seconds=rng.randrange(60, 3600),
        )
        for j in range(jobs)
    ]
    return views, running, pending


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--steps", default=f"8,{DEFAULT_MAX_STEPS}")
    parser.add_argument("--max-jobs", default=f"500,{DEFAULT_MAX_JOBS}")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    views, running, pending = setup(args.nodes, args.gpus_per_node, args.jobs, random.Random(args.seed))
    config = SchedulerConfig()
    runs = []
    for max_steps in (int(part) for part in args.steps.split(",")):
        for max_jobs in (int(part) for part in args.max_jobs.split(",")):
            started = time.perf_counter()
            steps = forecast_steps(views, pending, running, config, now=NOW, max_steps=max_steps, max_jobs=max_jobs)
            longest = 0.0
            while True:  # as the coordinator runs it: the event loop gets control back between steps
                step_started = time.perf_counter()
                try:
                    next(steps)
                except StopIteration as done:
                    forecast = done.value
                    break
                finally:
                    longest = max(longest, time.perf_counter() - step_started)
            seconds = time.perf_counter() - started
            runs.append(
                {
                    "max_steps": max_steps,
                    "max_jobs": max_jobs,
                    "seconds": round(seconds, 4),
                    "longest_step_seconds": round(longest, 4),
                    "steps": forecast.steps,
                    "estimated": len(forecast.starts),
                    "horizon_seconds": round(forecast.horizon - NOW, 1),
                    "coordinator_default": (max_steps, max_jobs) == (DEFAULT_MAX_STEPS, DEFAULT_MAX_JOBS),
                }
            )
    result = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "pending": args.jobs,
        "running": len(running),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
