"""Interactive sessions through the coordinator, with real processes on loopback.

1. keystroke round trip: one byte typed into an attached terminal (gpuorch.Client.attach) and its echo
   back, through coordinator and agent to a `cat` on a raw pty and back: p50/p99 over N keystrokes
   (target p99 < 20 ms).
2. port-forward throughput: a server inside a rank sends MiB; read through one PortForward stream
   (client -> coordinator -> agent -> the rank's port) (target >= 200 MB/s).

    python bench/interactive.py [--keystrokes 500] [--mib 512]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpuorch.v1 import job_pb2  # noqa: E402
from tests.harness import LocalCluster, free_port, wait_for  # noqa: E402

SOURCE = """
import socket, sys
chunk = b"x" * (1 << 20)
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    connection, _ = server.accept()
    for _ in range(int(sys.argv[2])):
        connection.sendall(chunk)
    connection.close()
"""


def running(cluster: LocalCluster, job_id: str) -> None:
    wait_for(lambda: cluster.client().get_job(job_id).state == job_pb2.JOB_STATE_RUNNING, 30, 0.05, f"{job_id} RUNNING")


def keystrokes(cluster: LocalCluster, count: int) -> dict:
    client = cluster.client()
    job_id = client.submit_job(argv=["sh", "-c", "stty raw -echo; echo ready; exec cat"], gpus=1, interactive=True)
    running(cluster, job_id)
    session = client.attach(job_id)
    received = bytearray()
    arrived = threading.Condition()

    def read() -> None:
        for message in session:
            if message.WhichOneof("payload") == "data":
                with arrived:
                    received.extend(message.data)
                    arrived.notify_all()

    threading.Thread(target=read, daemon=True).start()
    with arrived:
        arrived.wait_for(lambda: b"ready" in received, 30)
        received.clear()
    times = []
    for index in range(count):
        key = bytes([97 + index % 26])
        started = time.perf_counter()
        session.send(key)
        with arrived:
            if not arrived.wait_for(lambda: len(received) >= 1, 10):
                raise SystemExit("no echo within 10 s")
            received.clear()
        times.append((time.perf_counter() - started) * 1000)
    session.close()
    client.cancel_job(job_id)
    times.sort()
    return {
        "keystrokes": count,
        "round_trip_ms_p50": round(statistics.median(times), 3),
        "round_trip_ms_p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        "round_trip_ms_max": round(times[-1], 3),
    }


def throughput(cluster: LocalCluster, mib: int) -> dict:
    client = cluster.client()
    port = free_port()
    job_id = client.submit_job(argv=[sys.executable, "-c", SOURCE, str(port), str(mib)], gpus=1)
    running(cluster, job_id)
    results = []
    for _ in range(3):
        total = 0
        started = time.perf_counter()
        with client.port_forward(job_id, port) as session:
            for message in session:
                kind = message.WhichOneof("payload")
                if kind == "data":
                    total += len(message.data)
                elif kind == "ended":
                    break
        elapsed = time.perf_counter() - started
        if total < mib << 20:  # the server was not listening yet
            time.sleep(0.5)
            continue
        results.append(total / elapsed / 1e6)
    client.cancel_job(job_id)
    return {"port_forward_mib": mib, "port_forward_mb_per_s": round(max(results), 1) if results else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keystrokes", type=int, default=500)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cluster = LocalCluster(Path(root))
        try:
            cluster.start_coordinator()
            cluster.add_agent("n1", gpus=1)
            cluster.wait_for_nodes(1)
            result = {"benchmark": "interactive", **keystrokes(cluster, args.keystrokes)}
            result.update(throughput(cluster, args.mib))
        finally:
            cluster.stop()
    result["targets"] = {"round_trip_ms_p99": "< 20", "port_forward_mb_per_s": ">= 200"}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
