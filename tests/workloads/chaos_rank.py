"""A rank for the randomized fault test (stdlib only, cheap to start): records its own life.

    chaos_rank.py --record FILE --run TOKEN --request ID --seconds S [--fail-attempts 1,2] [--term-linger L]

Appends one JSON line to FILE when it starts and one when it ends (normally or on SIGTERM), each a
single O_APPEND write so that lines of concurrent ranks never interleave. A start line says who it
is (job, attempt, rank, node, its own GPU uuid, pid and the kernel's start time of the pid, which
also tells a reused pid apart) and when (CLOCK_BOOTTIME, the clock of that start time, shared by
every process of the machine, and wall time). SIGKILL leaves no end line; the test watches the pid for that.

It runs for S seconds, then exits 0, or 3 on the attempts listed in --fail-attempts. On SIGTERM it
lingers L seconds first (a rank that takes its time to stop), then exits 143. `--run TOKEN` is
unused by the rank: it marks the test run's processes in /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (after the parenthesised command, which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--fail-attempts", default="")
    parser.add_argument("--term-linger", type=float, default=0.0)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    attempt = int(os.environ.get("GPUORCH_ATTEMPT", "0"))
    identity = {
        "request": args.request,
        "job": os.environ.get("GPUORCH_JOB_ID", ""),
        "attempt": attempt,
        "rank": int(os.environ.get("RANK", "-1")),
        "node": os.environ.get("GPUORCH_NODE_ID", ""),
        "gpu": devices[local_rank] if local_rank < len(devices) else "",
        "pid": os.getpid(),
        "proc_start": process_start_time(os.getpid()),
    }
    record = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(event: str, **fields) -> None:
        line = {"event": event, **identity, "boot": time.clock_gettime(time.CLOCK_BOOTTIME), "wall": time.time(), **fields}
        os.write(record, (json.dumps(line) + "\n").encode())

    def on_sigterm(signum, frame) -> None:
        time.sleep(args.term_linger)
        write("end", how="sigterm", code=143)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    write("start")
    time.sleep(args.seconds)
    failing = {int(item) for item in args.fail_attempts.split(",") if item}
    code = 3 if attempt in failing else 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the end line is the last word
    write("end", how="exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
