"""The dashboard's page and data latency at cluster size: a real coordinator with 1,000 simulated nodes
of 8 GPUs (the heartbeat load generator, speaking the real AgentService protocol) and 6,000 jobs of
8 GPUs (1,000 placed, 5,000 queued), a real gpuorch-dashboard in front of it, timed over HTTP.

Prints one JSON object: p50/p99 of GET /, /queue, /api/v1/nodes and /api/v1/jobs, the size of the
cluster event, and the update latency (a node drained at the coordinator until the dashboard's
server-sent "cluster" event shows it).

    python bench/dashboard.py [--nodes 1000] [--jobs 6000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpuorch
from bench.heartbeat_coordinator import Coordinator
from bench.heartbeat_load import Generators, log
from tests.harness import free_port

PATHS = (("page_cluster", "/"), ("page_queue", "/queue"), ("api_nodes", "/api/v1/nodes"), ("api_jobs", "/api/v1/jobs"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def timed_get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - started, len(body)


async def submit_all(target: str, count: int) -> None:
    async with gpuorch.AsyncClient(target, timeout=60) as client:
        gate = asyncio.Semaphore(32)

        async def one(index: int) -> None:
            async with gate:
                await client.submit_job(argv=["sleep", "3600"], gpus=8, name=f"bench-{index}", owner=f"user{index % 40}")

        await asyncio.gather(*(one(index) for index in range(count)))


def sse_events(url: str):
    """(event name, data) of a server-sent event stream, as they come."""
    response = urllib.request.urlopen(url, timeout=60)
    name, data = "", []
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and name:
            yield name, "".join(data)
            name, data = "", []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--refresh-seconds", type=float, default=1.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    coordinator = Coordinator(workdir, 1.0)
    coordinator.start()
    generator_args = argparse.Namespace(interval=1.0, agents_per_channel=50, register_concurrency=64, static_telemetry=False)
    generators = Generators(coordinator.target, args.nodes, 2, generator_args)
    dashboard = None
    try:
        generators.start()
        deadline = time.monotonic() + 120
        while generators.registered() < args.nodes and time.monotonic() < deadline:
            time.sleep(0.5)
        log(f"{generators.registered()} nodes registered; submitting {args.jobs} jobs")
        started = time.monotonic()
        asyncio.run(submit_all(coordinator.target, args.jobs))
        log(f"submitted in {time.monotonic() - started:.1f}s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "gpuorch.dashboard.main", "--coordinator", coordinator.target, "--listen",
                f"127.0.0.1:{port}", "--refresh-seconds", str(args.refresh_seconds), "--log-level", "warning"]  # fmt: skip
        dashboard_log = open(workdir / "dashboard.log", "ab")  # noqa: SIM115 - written until the dashboard stops
        dashboard = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=dashboard_log, env=os.environ)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                nodes = json.loads(urllib.request.urlopen(base + "/api/v1/nodes", timeout=10).read())["nodes"]
                if len(nodes) >= args.nodes:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        timings: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, path in (
                ("page_cluster", "/"),
                ("page_queue", "/queue"),
                ("api_nodes", "/api/v1/nodes"),
                ("api_jobs", "/api/v1/jobs"),
            ):
                seconds, size = timed_get(base + path)
                timings.setdefault(name, []).append(seconds)
                sizes[name] = size
        jobs = json.loads(urllib.request.urlopen(base + "/api/v1/jobs", timeout=30).read())["jobs"]
        updates: list[float] = []
        event_bytes = 0
        client = gpuorch.Client(coordinator.target, timeout=30)
        events = sse_events(base + "/api/v1/events?topics=cluster")
        for index in range(args.updates):
            node_id = nodes[index]["node_id"]
            client.drain_node(node_id, reason="bench")
            changed = time.perf_counter()
            for name, data in events:
                if name != "cluster":
                    continue
                event_bytes = len(data)
                shown = next(node for node in json.loads(data)["nodes"] if node["node_id"] == node_id)
                if shown["drained"]:
                    updates.append(time.perf_counter() - changed)
                    break
            client.resume_node(node_id)
        result = {
            "nodes": len(nodes),
            "gpus": sum(len(node["gpus"]) for node in nodes),
            "queued_jobs": sum(1 for job in jobs if job["state"] == "PENDING"),
            "running_jobs": sum(1 for job in jobs if job["state"] == "RUNNING"),
            "refresh_seconds": args.refresh_seconds,
            "rounds": args.rounds,
            **{f"{name}_p50_ms": round(1000 * percentile(values, 0.5), 1) for name, values in timings.items()},
            **{f"{name}_p99_ms": round(1000 * percentile(values, 0.99), 1) for name, values in timings.items()},
            **{f"{name}_bytes": size for name, size in sizes.items()},
            "cluster_event_bytes": event_bytes,
            "update_latency_p50_ms": round(1000 * percentile(updates, 0.5), 1),
            "update_latency_p99_ms": round(1000 * percentile(updates, 0.99), 1),
            "cpu_cores": os.cpu_count(),
        }
        print(json.dumps(result))
        client.close()
        return 0
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(10)
        generators.stop()
        coordinator.stop()


if __name__ == "__main__":
    sys.exit(main())
