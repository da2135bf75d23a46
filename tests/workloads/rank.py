"""A configurable rank for tests (no torch): prints its environment, then behaves as told.

rank.py [--exit-code-for-rank R:C ...] [--sleep S] [--wait-for FILE] [--ignore-sigterm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

CONTRACT = (
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
    "CUDA_VISIBLE_DEVICES", "GPUORCH_JOB_ID", "GPUORCH_ATTEMPT", "GPUORCH_BACKEND", "USER_VAR",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit-code-for-rank", action="append", default=[])
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--wait-for", default="")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = int(os.environ.get("RANK", "-1"))
    print("ENV " + json.dumps({key: os.environ.get(key) for key in CONTRACT} | {"cwd": os.getcwd()}), flush=True)
    print(f"stderr line from rank {rank}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while args.wait_for and not os.path.exists(args.wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(args.sleep)
    codes = dict(item.split(":") for item in args.exit_code_for_rank)
    return int(codes.get(str(rank), 0))


if __name__ == "__main__":
    sys.exit(main())
