"""A training loop that survives preemption: it checkpoints when told to stop and resumes where it left off.

    gpuctl submit --gpus 1 --priority 0 -- python examples/preemptible.py --steps 600

When higher-priority work preempts the job, each rank gets SIGTERM, then SIGKILL once the preemption
grace is over (the coordinator's `preemption_grace_seconds`, 30 s by default). This loop finishes the
step it is in, rank 0 writes the state to $GPUORCH_CHECKPOINT_DIR (the same directory for every attempt
of the job), and every rank exits. The job goes back to the queue without using a restart of
`--max-restarts`; its next attempt starts with GPUORCH_RESTART_REASON=preempted, reads the checkpoint
and goes on from there.

The "model" here is a step counter and a running sum, written as JSON, so the example needs no
torch; a real job saves `model.state_dict()` and `optimizer.state_dict()` with torch.save the same way:
to a temporary file first, then `os.replace`, so that a SIGKILL in the middle never leaves half a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from gpuorch import worker

TERMINATED = 128 + 15
"""Exit code after a stop request: "ended by SIGTERM", as a shell reports it (never 0: that would read as done)."""


def save(path: Path, state: dict, write_seconds: float) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    time.sleep(write_seconds)  # a real checkpoint takes a while: it must fit in the grace
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--checkpoint-seconds", type=float, default=0.0, help="how long writing a checkpoint takes")
    args = parser.parse_args()
    stop = worker.stop_on_sigterm()
    rank = int(os.environ.get("RANK", "0"))
    checkpoint = Path(worker.checkpoint_dir() or ".") / "preemptible.json"
    state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"step": 0, "total": 0}
    reason = worker.restart_reason()
    print(f"START attempt={worker.attempt()} reason={reason.raw or '-'} resumed_from={state['step']}", flush=True)
    while state["step"] < args.steps:
        if stop.is_set():
            if rank == 0:
                save(checkpoint, state, args.checkpoint_seconds)
            print(f"CHECKPOINT step={state['step']}", flush=True)
            return TERMINATED
        time.sleep(args.step_seconds)  # one training step
        state["step"] += 1
        state["total"] += state["step"]
        worker.report_progress()
        print(f"STEP {state['step']}", flush=True)
    expected = args.steps * (args.steps + 1) // 2
    print(f"DONE steps={state['step']} total={state['total']} expected={expected}", flush=True)
    return 0 if state["total"] == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
