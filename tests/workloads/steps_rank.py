"""A rank that trains in steps and reports them through gpuorch.worker, for the job telemetry tests.

    steps_rank.py --until-file PATH [--step-seconds S] [--slow-gpus-file PATH] [--gloo]

Every step it computes (sleeps --step-seconds inside worker.compute(); twice as long while its GPU is
named in --slow-gpus-file, read every step: a throttling GPU), then with --gloo all-reduces with its peers
(so every rank's wall step time is the slowest's: only the timed compute tells them apart), then calls
report_progress(step, samples=8, loss=...). Rank 0 ends the job once --until-file exists.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from gpuorch import worker


def my_gpu() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return devices[int(os.environ.get("LOCAL_RANK", "0"))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--until-file", required=True)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--slow-gpus-file", default="")
    parser.add_argument("--gloo", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    dist = None
    if args.gloo:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
    print(f"rank {rank} on {os.environ.get('GPUORCH_NODE_ID')} gpu {my_gpu()} attempt {worker.attempt()}", flush=True)
    step = 0
    while True:
        step += 1
        slow_file = Path(args.slow_gpus_file) if args.slow_gpus_file else None
        slow = slow_file is not None and slow_file.exists() and my_gpu() in slow_file.read_text()
        with worker.compute():
            time.sleep(args.step_seconds * (2.0 if slow else 1.0))
        stop = rank == 0 and os.path.exists(args.until_file)
        if dist is not None:
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag)
            stop = flag.item() > 0
        elif os.path.exists(args.until_file):
            stop = True
        worker.report_progress(step, samples=8, loss=1.0 / step)
        if stop:
            break
    print(f"rank {rank} done after {step} steps", flush=True)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
