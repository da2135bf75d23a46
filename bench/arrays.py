"""Job arrays: one 10,000-task array against 10,000 separate jobs, through the real JobManager and SQLite store.

1,000 simulated nodes x 8 GPUs, in-process. Submits one array of 10,000 1-GPU tasks (one SubmitJob's work: the
tasks built, indexed and made durable in one store write), then runs passes back to back, each task finishing a
few passes after it was placed through the rank-status path agents use, until every task was placed. Then the
same with 10,000 separate 1-GPU jobs submitted at once. Reports submit latency, the store commits of the submit,
the time until every task was placed, and placements/s, for both.

    python bench/arrays.py [--nodes 1000] [--gpus-per-node 8] [--tasks 10000]

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
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import agent_pb2, job_pb2


def cluster_of(nodes: int, gpus_per_node: int) -> ClusterView:
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    for n in range(nodes):
        register = agent_pb2.Register(node_id=f"node-{n:04d}", addresses=[f"10.0.{n // 256}.{n % 256}"])
        for index in range(gpus_per_node):
            register.devices.add(uuid=f"GPU-{n:04d}-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
        cluster.register(register)
    return cluster


async def place_everything(manager: JobManager, cluster: ClusterView, rng: random.Random, max_seconds: float) -> tuple:
    """Passes until nothing pends; tasks end a few passes after placement. Returns (seconds, passes)."""
    running: dict[str, int] = {}
    passes = 0
    started = time.perf_counter()
    while manager.pending and time.perf_counter() - started < max_seconds:
        passes += 1
        for job_id in await manager.schedule_pass():
            running[job_id] = passes + rng.randint(1, 4)
        for node in cluster.nodes.values():  # what agents would receive; dropped
            while node.session is not None and not node.session.outbox.empty():
                node.session.outbox.get_nowait()
        for job_id, finish_at in list(running.items()):
            if finish_at <= passes:
                job = manager.jobs[job_id].job
                status = agent_pb2.TaskStatus(job_id=job_id, attempt=job.attempt, rank=0, state=agent_pb2.TASK_STATE_EXITED)
                manager.on_task_status(job.placement.nodes[0].node_id, status)
                del running[job_id]
        await asyncio.sleep(0)
    return time.perf_counter() - started, passes


async def one_run(args: argparse.Namespace, as_array: bool) -> dict:
    rng = random.Random(args.seed)
    cluster = cluster_of(args.nodes, args.gpus_per_node)
    with tempfile.TemporaryDirectory() as state_dir:
        store = SqliteJobStore(Path(state_dir) / "jobs.db")
        manager = JobManager(cluster, store, max_pending_jobs_per_user=0)
        await manager.start()
        spec = job_pb2.JobSpec(argv=["python", "eval.py", "--checkpoint", "{index}"], gpus=1, owner="alice")
        commits_before = store.commits
        submit_started = time.perf_counter()
        if as_array:
            spec.array.CopyFrom(job_pb2.JobArray(first=0, last=args.tasks - 1))
            await manager.arrays.submit(spec)
        else:
            await asyncio.gather(*(manager.submit(spec) for _ in range(args.tasks)))
        submit_seconds = time.perf_counter() - submit_started
        submit_commits = store.commits - commits_before
        seconds, passes = await place_everything(manager, cluster, rng, args.max_seconds)
        await store.close()
    return {
        "submit_ms": round(1000 * submit_seconds, 1),
        "submit_store_commits": submit_commits,
        "seconds_until_all_placed": round(seconds, 3),
        "all_placed": not manager.pending,
        "placements": manager.placements,
        "placements_per_s": round(manager.placements / seconds, 1),
        "passes": passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # warnings and up: the log is not timed
    array = asyncio.run(one_run(args, as_array=True))
    separate = asyncio.run(one_run(args, as_array=False))
    print(
        json.dumps(
            {
                "benchmark": "arrays",
                "nodes": args.nodes,
                "gpus": args.nodes * args.gpus_per_node,
                "tasks": args.tasks,
                "array": array,
                "separate_jobs": separate,
                "array_placements_vs_separate": round(array["placements_per_s"] / separate["placements_per_s"], 3),
                "target": "array placements/s no lower than separate jobs'; one store commit for the array's submit",
                "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
                "command": " ".join(["python", *sys.argv]),
            }
        )
    )


if __name__ == "__main__":
    main()
