"""Recovery times with real processes on loopback.

1. rank death -> every rank of the new attempt running: a 4-rank job on 4 agents of 2 GPUs whose
   ranks print their exec time and sleep; one rank is SIGKILLed; measured to the latest exec time
   of the next attempt's ranks (the workload's own start-up is excluded: the ranks are `sh`).
   Half the GPUs are free, so the restart could be placed at once; included, and also shown on its
   own, is its wait for the old attempt's other ranks to end (they exit at once on SIGTERM): from
   the first attempt's end to the second's placement, as GetJob records them.
2. SIGKILL of an agent -> its node SUSPECT (polling GetNode every 2 ms).
3. a silent agent (SIGSTOP) -> its node DOWN, against 3 heartbeat intervals from its last heartbeat.
4. SIGKILL + restart of the coordinator -> all of N agents re-registered and a new job placed.

    python bench/recovery.py [--samples 10] [--agents 100] [--only rank|agents|restart ...]

Prints one JSON object.
"""

# ruff: noqa: B023 - wait_for calls its predicates before it returns: no lambda outlives its loop iteration

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpuorch.v1 import cluster_pb2, job_pb2  # noqa: E402 - after the sys.path line above
from tests.harness import LocalCluster, wait_for  # noqa: E402

SUSPECT, DOWN, READY = cluster_pb2.NODE_STATE_SUSPECT, cluster_pb2.NODE_STATE_DOWN, cluster_pb2.NODE_STATE_READY
RANK_PROGRAM = ["/bin/sh", "-c", "date +%s.%N; exec sleep 120"]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values: list[float]) -> dict:
    return {
        "p50_ms": round(1000 * statistics.median(values), 1),
        "p99_ms": round(1000 * percentile(values, 0.99), 1),
        "max_ms": round(1000 * max(values), 1),
        "samples": len(values),
    }


def exec_times(client, job_id: str, attempt: int, ranks: int) -> list[float]:
    times = []
    for rank in range(ranks):
        text = b"".join(client.job_logs(job_id, rank, attempt=attempt)).decode().split()
        if not text:
            return []
        times.append(float(text[0]))
    return times


def rank_restart(root: Path, samples: int) -> tuple[list[float], list[float]]:
    cluster = LocalCluster(root / "rank")
    try:
        cluster.start_coordinator("--log-level", "warning", "--stop-grace-period", "2")
        for node_id in ("n1", "n2", "n3", "n4"):
            cluster.add_agent(node_id, 2, "--log-level", "warning")
        cluster.wait_for_nodes(4)
        client = cluster.client()
        results, waits = [], []
        for _ in range(samples + 1):  # the first is a warm-up
            job_id = client.submit_job(argv=RANK_PROGRAM, gpus=4, max_restarts=1)
            wait_for(lambda: len(exec_times(client, job_id, 1, 4)) == 4, timeout=30, what="attempt 1 running")
            pid_files = sorted((cluster.root).glob(f"agent-*/jobs/{job_id}/attempt-1/rank-*.pid"))
            victim = int(pid_files[0].read_text())
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: client.get_job(job_id).attempt == 2, timeout=30, what="attempt 2")
            started = wait_for(
                lambda: (t := exec_times(client, job_id, 2, 4)) and len(t) == 4 and t, timeout=30, what="attempt 2 ranks"
            )
            results.append(max(started) - killed)
            first, second = client.get_job(job_id).attempts[:2]
            waits.append((second.start_time.ToNanoseconds() - first.end_time.ToNanoseconds()) / 1e9)
            client.cancel_job(job_id)
            wait_for(
                lambda: not any(d.allocated_job_id for n in client.list_nodes() for d in n.devices), timeout=30, what="GPUs free"
            )
        return results[1:], waits[1:]
    finally:
        cluster.stop()


def agent_kill_to_suspect(root: Path, samples: int) -> tuple[list[float], list[float]]:
    cluster = LocalCluster(root / "agents")
    suspect, down_error = [], []
    try:
        cluster.start_coordinator("--log-level", "warning", "--node-grace-period", "60")
        client = cluster.client()
        for sample in range(samples):
            node_id = f"k{sample}"
            agent = cluster.add_agent(node_id, 1, "--log-level", "warning", "--heartbeat-interval", "0.25")
            cluster.wait_node_state(node_id, READY, timeout=20)
            wait_for(lambda: client.get_node(node_id).last_heartbeat_sequence >= 2, what="heartbeats")
            agent.signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: client.get_node(node_id).state == SUSPECT, timeout=5, interval=0.002, what="SUSPECT")
            suspect.append(time.monotonic() - killed)
            # Silent node: SIGSTOP another agent; DOWN is due 3 intervals after its last heartbeat.
            node_id = f"s{sample}"
            agent = cluster.add_agent(node_id, 1, "--log-level", "warning", "--heartbeat-interval", "0.25")
            cluster.wait_node_state(node_id, READY, timeout=20)
            wait_for(lambda: client.get_node(node_id).last_heartbeat_sequence >= 2, what="heartbeats")
            agent.signal(signal.SIGSTOP)
            wait_for(lambda: client.get_node(node_id).state == DOWN, timeout=5, interval=0.002, what="DOWN")
            seen_down = time.time()
            last = client.get_node(node_id).last_heartbeat_time.ToNanoseconds() / 1e9
            down_error.append(seen_down - last)
            agent.signal(signal.SIGCONT)
            agent.kill()
        return suspect, down_error
    finally:
        cluster.stop()


def coordinator_restart(root: Path, agents: int, samples: int) -> list[float]:
    cluster = LocalCluster(root / "restart")
    results = []
    try:
        cluster.start_coordinator("--log-level", "warning")
        for index in range(agents):
            cluster.add_agent(f"a{index:03d}", 1, "--log-level", "warning")
        cluster.wait_for_nodes(agents, timeout=180)
        client = cluster.client()
        for _ in range(samples):
            cluster.coordinator.kill()
            killed = time.monotonic()
            cluster.start_coordinator("--log-level", "warning", wait=False)
            wait_for(lambda: len(client.list_nodes(["ready"])) == agents, timeout=60, interval=0.01, what="every agent back")
            job_id = client.submit_job(argv=["/bin/true"], gpus=1)
            wait_for(
                lambda: client.get_job(job_id).state != job_pb2.JOB_STATE_PENDING, timeout=30, interval=0.01, what="a placement"
            )
            results.append(time.monotonic() - killed)
        return results
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--restart-samples", type=int, default=3)
    parser.add_argument(
        "--only", action="append", choices=("rank", "agents", "restart"), help="run only these parts (default: all)"
    )
    args = parser.parse_args()
    parts = set(args.only or ("rank", "agents", "restart"))
    result: dict = {"benchmark": "recovery"}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        if "rank" in parts:
            rank, restart_wait = rank_restart(root, args.samples)
            result["rank_death_to_new_attempt_running"] = {**summary(rank), "target_ms": 1000}
            result["restart_wait_for_previous_attempt_to_end"] = summary(restart_wait)
        if "agents" in parts:
            suspect, down = agent_kill_to_suspect(root, args.samples)
            result["agent_sigkill_to_suspect"] = {**summary(suspect), "target_p99_ms": 100}
            result["silent_node_to_down_after_last_heartbeat"] = {
                **summary(down),
                "heartbeat_interval_s": 0.25,
                "expected_ms": 750,
            }
        if "restart" in parts:
            restart = coordinator_restart(root, args.agents, args.restart_samples)
            result["coordinator_restart_to_all_agents_back_and_scheduling"] = {
                **summary(restart),
                "agents": args.agents,
                "target_ms": 3000,
            }
    print(
        json.dumps(
            {
                **result,
                "anchors": "node declared dead: Ray ~15 s, Nomad 10 s TTL + 10 s grace, Kubernetes 40-50 s, Slurm 300 s",
                "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
                "command": " ".join(["python", *sys.argv]),
            }
        )
    )


if __name__ == "__main__":
    main()
