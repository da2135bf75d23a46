"""A fake training loop for recovery tests (no torch): checkpoints, progress, scripted failures.

Rank 0 writes the step it reached to $GPUORCH_CHECKPOINT_DIR/step after every step; every rank
starts from that step, so a restarted attempt resumes instead of starting over.

    trainer.py --steps N [--step-seconds S] [--fail-attempt A --fail-rank R --fail-at-step K --fail-mode exit|hang]
               [--exit-when-world-below W --until-file F]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gpuorch import worker


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    parser.add_argument("--fail-attempt", type=int, default=0)
    parser.add_argument("--fail-rank", type=int, default=0)
    parser.add_argument("--fail-at-step", type=int, default=1)
    parser.add_argument("--fail-mode", choices=("exit", "hang"), default="exit")
    parser.add_argument("--exit-when-world-below", type=int, default=0)
    parser.add_argument("--until-file", default="")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    checkpoint = Path(worker.checkpoint_dir()) / "step"
    start = int(checkpoint.read_text()) if checkpoint.exists() else 0
    reason = worker.restart_reason()
    print(
        f"START rank={rank} world={world} attempt={worker.attempt()} reason={reason.raw or '-'} resumed_from={start}", flush=True
    )
    if args.exit_when_world_below and world < args.exit_when_world_below:
        # A shrunken elastic attempt: keep going until told capacity is back, then ask for a restart.
        while not os.path.exists(args.until_file):
            worker.report_progress(min_interval_seconds=0.1)
            time.sleep(0.05)
        print("EXIT to grow back", flush=True)
        return 75
    for step in range(start, args.steps):
        if worker.attempt() == args.fail_attempt and rank == args.fail_rank and step == args.fail_at_step:
            if args.fail_mode == "exit":
                print(f"FAIL at step {step}", flush=True)
                return 3
            print(f"HANG at step {step}", flush=True)
            while True:
                time.sleep(1)
        time.sleep(args.step_seconds)
        worker.report_progress(min_interval_seconds=0.05)
        if rank == 0:
            temporary = checkpoint.with_suffix(".tmp")
            temporary.write_text(str(step + 1))
            os.replace(temporary, checkpoint)
    print(f"DONE rank={rank} steps={args.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
