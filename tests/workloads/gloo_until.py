"""A rank of a gloo job that all-reduces until a file appears, then exits 0: a job that keeps running
(with its ranks talking to each other) across whatever the test does to the coordinators.

    gloo_until.py --until-file PATH
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--until-file", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}/{world} pid {os.getpid()} attempt {os.environ.get('GPUORCH_ATTEMPT')}", flush=True)
    rounds = 0
    while True:
        done = torch.tensor([1.0 if rank == 0 and os.path.exists(args.until_file) else 0.0])
        dist.all_reduce(done)  # rank 0 decides for everyone; every round is a real collective
        rounds += 1
        if done.item() > 0:
            break
        time.sleep(0.2)
    print(f"rank {rank} done after {rounds} rounds", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
