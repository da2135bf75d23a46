"""Scheduler throughput: the real JobManager, scheduler and SQLite store, in-process.

1,000 simulated nodes x 8 GPUs; 10,000 jobs of 1-16 GPUs submitted (durably)
up front; passes run back to back; jobs finish after a few passes through the
same rank-status path agents use, freeing GPUs for the next ones. Measures
placements per second over the whole run (store writes, launch messages and
completions included) and the duration of scheduling passes.

    python bench/schedule.py [--nodes 1000] [--gpus-per-node 8] [--jobs 10000] [--policy priority]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.rules.liveness import LivenessPolicy
from coordinator.scheduler import SchedulerConfig
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import agent_pb2, job_pb2

JOB_SIZES = (1, 1, 1, 2, 2, 4, 4, 8, 8, 16)
"""Mostly small jobs, some large: the mix seen on shared training clusters."""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    for n in range(args.nodes):
        node_id = f"node-{n:04d}"
        register = agent_pb2.Register(node_id=node_id, addresses=[f"10.0.{n // 256}.{n % 256}"])
        for index in range(args.gpus_per_node):
            register.devices.add(uuid=f"GPU-{n:04d}-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
        cluster.register(register)
    with tempfile.TemporaryDirectory() as state_dir:
        store = SqliteJobStore(Path(state_dir) / "jobs.db")
        manager = JobManager(cluster, store, config=SchedulerConfig(policy=args.policy))
        await manager.start()
        submit_started = time.perf_counter()
        await asyncio.gather(
            *(
                manager.submit(
                    job_pb2.JobSpec(
                        argv=["python", "train.py"],
                        gpus=rng.choice(JOB_SIZES),
                        priority=rng.randrange(3),
                        owner=f"user{rng.randrange(20)}",
                        estimated_runtime_seconds=rng.randrange(60, 3600),
                    )
                )
                for _ in range(args.jobs)
            )
        )
        submit_seconds = time.perf_counter() - submit_started

        running: dict[str, int] = {}  # job id -> pass number at which it finishes
        pass_seconds: list[float] = []
        placed_per_pass: list[int] = []
        passes = 0
        started = time.perf_counter()
        while manager.pending and time.perf_counter() - started < args.max_seconds:
            passes += 1
            pass_started = time.perf_counter()
            placed_now = await manager.schedule_pass()
            pass_seconds.append(time.perf_counter() - pass_started)
            placed_per_pass.append(len(placed_now))
            for job_id in placed_now:
                running[job_id] = passes + rng.randint(1, 4)
            for node in cluster.nodes.values():  # what agents would receive; drop it
                while node.session is not None and not node.session.outbox.empty():
                    node.session.outbox.get_nowait()
            for job_id, finish_at in list(running.items()):
                if finish_at > passes:
                    continue
                entry = manager.jobs[job_id]
                for placed in entry.job.placement.nodes:
                    for local_rank in range(len(placed.device_uuids)):
                        manager.on_task_status(
                            placed.node_id,
                            agent_pb2.TaskStatus(
                                job_id=job_id,
                                attempt=entry.job.attempt,
                                rank=placed.first_rank + local_rank,
                                state=agent_pb2.TASK_STATE_EXITED,
                            ),
                        )
                del running[job_id]
            await asyncio.sleep(0)  # let completions be written
        elapsed = time.perf_counter() - started
        await store.close()
    placed = manager.placements
    return {
        "benchmark": "schedule",
        "nodes": args.nodes,
        "gpus": args.nodes * args.gpus_per_node,
        "jobs": args.jobs,
        "policy": args.policy,
        "placements": placed,
        "all_placed": not manager.pending,
        "seconds": round(elapsed, 3),
        "placements_per_s": round(placed / elapsed, 1),
        "passes": passes,
        "pass_ms_p50": round(1000 * percentile(pass_seconds, 0.50), 2),
        "pass_ms_p99": round(1000 * percentile(pass_seconds, 0.99), 2),
        "decision_ms_per_placement_p99": round(
            1000 * percentile([s / n for s, n in zip(pass_seconds, placed_per_pass, strict=True) if n], 0.99), 3
        ),
        "submit_jobs_per_s": round(args.jobs / submit_seconds, 1),
        "store_commits_for_submissions_and_updates": store.commits,
        "target_placements_per_s": 2000,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python", *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--policy", default="priority", choices=("priority", "fcfs", "sjf", "fair_share"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40), cache_logger_on_first_use=True)
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
