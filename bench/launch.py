"""Launch latency and rendezvous overhead, with real processes on loopback.

1. submit -> every rank's process started: 100 jobs of 4 ranks over 2 agents,
   one at a time. Each rank runs /bin/date, which prints the wall time it was
   exec'd; latency = the latest rank's time - the time just before SubmitJob.
2. time to the first completed all-reduce of a 4-rank gloo job
   (examples/allreduce.py) through gpuorch, against `torchrun --nproc-per-node 4`
   running the same script on the same machine, as a ratio (median of N runs each).

    python bench/launch.py [--jobs 100] [--allreduce-runs 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpuorch.v1 import job_pb2  # noqa: E402
from tests.harness import LocalCluster, wait_for  # noqa: E402

DATE = shutil.which("date") or "/bin/date"
DONE = re.compile(r"allreduce_done_unix (\d+\.\d+)")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def wait_final(client, job_id: str, timeout: float = 120) -> job_pb2.Job:
    for job in client.watch_job(job_id):
        if job.state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED):
            return job
    raise RuntimeError(f"watch of {job_id} ended early")


def rank_logs(client, job_id: str, ranks: int) -> list[str]:
    return [b"".join(client.job_logs(job_id, rank)).decode() for rank in range(ranks)]


def launch_latencies(client, jobs: int) -> list[float]:
    latencies = []
    for _ in range(jobs):
        submitted = time.time()
        job_id = client.submit_job(argv=[DATE, "+%s.%N"], gpus=4, gpus_per_node=2)
        job = wait_final(client, job_id)
        if job.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"{job_id}: {job.reason}")
        started = [float(text.split()[0]) for text in rank_logs(client, job_id, 4)]
        latencies.append(max(started) - submitted)
    return latencies


def gpuorch_allreduce(client) -> float:
    submitted = time.time()
    job_id = client.submit_job(argv=[sys.executable, str(REPO / "examples" / "allreduce.py")], gpus=4, backend="gloo")
    job = wait_final(client, job_id)
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{job_id}: {job.reason}")
    return max(float(DONE.search(text).group(1)) for text in rank_logs(client, job_id, 4)) - submitted


def torchrun_allreduce() -> float:
    started = time.time()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            str(REPO / "examples" / "allreduce.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GPUORCH_BACKEND": "gloo", "OMP_NUM_THREADS": "1"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed: {result.stderr[-2000:]}")
    return max(float(match) for match in DONE.findall(result.stdout)) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--allreduce-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cluster = LocalCluster(Path(root))
        try:
            cluster.start_coordinator("--log-level", "warning")
            for node_id in ("n1", "n2"):
                cluster.add_agent(node_id, 2, "--log-level", "warning")
            cluster.wait_for_nodes(2)
            client = cluster.client()
            client.submit_job(argv=[DATE], gpus=4)  # warm-up: first launches pay for imports
            wait_for(lambda: client.list_jobs(["succeeded"])[0], timeout=30)
            latencies = launch_latencies(client, args.jobs)
            torch_available = importlib.util.find_spec("torch") is not None
            gpuorch_times, torchrun_times = [], []
            if torch_available and args.allreduce_runs:
                os.environ["OMP_NUM_THREADS"] = "1"
                for _ in range(args.allreduce_runs):  # interleaved, so both see the same machine state
                    gpuorch_times.append(gpuorch_allreduce(client))
                    torchrun_times.append(torchrun_allreduce())
        finally:
            cluster.stop()
    result = {
        "benchmark": "launch",
        "jobs": args.jobs,
        "ranks_per_job": 4,
        "nodes": 2,
        "submit_to_all_ranks_started_ms_p50": round(1000 * percentile(latencies, 0.50), 1),
        "submit_to_all_ranks_started_ms_p99": round(1000 * percentile(latencies, 0.99), 1),
        "submit_to_all_ranks_started_ms_max": round(1000 * max(latencies), 1),
        "target_p99_ms": 100,
        "allreduce_runs": len(gpuorch_times),
        "first_allreduce_s_gpuorch_median": round(statistics.median(gpuorch_times), 3) if gpuorch_times else None,
        "first_allreduce_s_torchrun_median": round(statistics.median(torchrun_times), 3) if torchrun_times else None,
        "gpuorch_over_torchrun": round(statistics.median(gpuorch_times) / statistics.median(torchrun_times), 3)
        if gpuorch_times
        else None,
        "target_ratio": 1.1,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
