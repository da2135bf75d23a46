"""A rank that records its own lifetime, to check that two attempts of a job never run at once (no torch).

    overlap_rank.py --record FILE [--fail-rank R] [--fail-after S] [--linger S] [--run S]

On its first attempt, rank R exits with code 3 after S seconds; the other ranks run until they are
stopped, and take `--linger` seconds to go once they get SIGTERM (as a trainer writing its last
checkpoint does). Later attempts run `--run` seconds and exit 0. Every rank, however it ends,
appends one line `attempt start end rank` (wall-clock seconds) to FILE just before it exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import time


def main() -> int:
    started = time.time()
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-after", type=float, default=0.5)
    parser.add_argument("--linger", type=float, default=1.0)
    parser.add_argument("--run", type=float, default=0.3)
    args = parser.parse_args()
    attempt = int(os.environ["GPUORCH_ATTEMPT"])
    rank = int(os.environ["RANK"])
    terminated = False

    def on_sigterm(signum, frame) -> None:
        nonlocal terminated
        terminated = True

    signal.signal(signal.SIGTERM, on_sigterm)
    code = 0
    if attempt == 1:
        deadline = started + (args.fail_after if rank == args.fail_rank else 120.0)
        while not terminated and time.time() < deadline:
            time.sleep(0.01)
        if terminated:
            time.sleep(args.linger)
            code = 143
        else:
            code = 3
    else:
        time.sleep(args.run)
    line = f"{attempt} {started:.6f} {time.time():.6f} {rank}\n"
    fd = os.open(args.record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one write of one short line: appends never interleave
    finally:
        os.close(fd)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
