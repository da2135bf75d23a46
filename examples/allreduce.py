"""All-reduce across every rank of a job, checking the result: the "hello world" of a GPU cluster.

Runs unmodified under gpuorch or torchrun:

    gpuctl submit --gpus 4 --backend gloo -- python examples/allreduce.py
    torchrun --nproc-per-node 4 examples/allreduce.py

Each rank contributes rank + 1; after the sum every rank must hold
world_size * (world_size + 1) / 2. Exit code 0 only if that holds.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from gpuorch import worker


def main() -> int:
    started = time.perf_counter()
    rank, world_size = worker.init_process_group()
    tensor = torch.full((1024,), float(rank + 1), device=worker.device())
    dist.all_reduce(tensor)
    elapsed = time.perf_counter() - started
    expected = world_size * (world_size + 1) / 2
    ok = bool(torch.all(tensor == expected))
    print(
        f"rank {rank}/{world_size} local_rank {os.environ.get('LOCAL_RANK')} backend {dist.get_backend()} "
        f"device {tensor.device}: all_reduce {'ok' if ok else 'WRONG'} ({tensor[0].item():g}, expected {expected:g}) "
        f"first_allreduce_s {elapsed:.4f} allreduce_done_unix {time.time():.6f}",
        flush=True,
    )
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
