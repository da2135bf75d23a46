"""Every scheduling policy on the Philly trace, through gpuorch-sim (the coordinator's own scheduling path).

Replays ../shared/traces/philly-sep-dec.csv (relative to the repository) with the published VC pools
at each --loads value, with --preemption-cost 60, for every policy: the coordinator's (priority, fcfs,
sjf, fair_share, las where the scheduler has it) and the simulator's references (ref-fifo, ref-sjf,
ref-srtf, which use the true durations). A policy this build cannot run is listed with the reason.

    python bench/sim.py [--loads 0.7,0.9,1.0] [--policies priority,ref-srtf] [--processes 2] [--markdown]

Prints one JSON object: a row per (policy, load) with avg JCT, p99 queueing delay and utilisation, and
the ratio of the default policy's avg JCT to ref-srtf's at load 0.9 (the target is <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from coordinator.scheduler import POLICIES  # noqa: E402
from coordinator.settings import CoordinatorSettings  # noqa: E402
from coordinator.sim import cli  # noqa: E402
from coordinator.sim.policies import UnsupportedPolicy  # noqa: E402

TRACE = REPO.parent / "shared" / "traces" / "philly-sep-dec.csv"
WANTED = ("priority", "fcfs", "sjf", "fair_share", "las", "ref-fifo", "ref-sjf", "ref-srtf")
PREEMPTION_COST = 60.0
KEPT = (
    "jobs",
    "refused",
    "avg_jct",
    "p50_jct",
    "p99_jct",
    "avg_queueing_delay",
    "p99_queueing_delay",
    "utilization_window",
    "utilization_makespan",
    "utilization_queued",
    "makespan",
    "preemptions",
    "scheduler_cpu_seconds",
    "passes",
)


def one(task: tuple[str, float, str]) -> dict:
    policy, load, trace = task
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    row: dict = {"policy": policy, "load": load}
    started = time.perf_counter()
    try:
        result = cli.simulate(cli.Options(trace=trace, policy=policy, load=load, preemption_cost=PREEMPTION_COST))
    except UnsupportedPolicy as error:
        return {**row, "unavailable": str(error)}
    return {**row, **{key: result[key] for key in KEPT}, "replay_seconds": round(time.perf_counter() - started, 2)}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| policy | load | avg JCT (h) | p99 queueing (h) | utilisation (window) | utilisation (queued) | preemptions |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['policy']} | {row['load']} | n/a: {row['unavailable']} | | | | |")
            continue
        queued = row["utilization_queued"]
        lines.append(
            f"| {row['policy']} | {row['load']} | {row['avg_jct'] / 3600:.2f} | {row['p99_queueing_delay'] / 3600:.2f} | "
            f"{row['utilization_window']:.3f} | {'-' if queued is None else f'{queued:.3f}'} | {row['preemptions']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--loads", default="0.7,0.9,1.0")
    parser.add_argument("--policies", default=",".join(WANTED), help="comma-separated; las only where the scheduler has it")
    parser.add_argument("--processes", type=int, default=1, help="replays run in parallel (one core each)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown instead of JSON")
    args = parser.parse_args()
    if not Path(args.trace).exists():
        print(json.dumps({"skipped": f"trace {args.trace} is absent (see ../shared/traces/README.md)"}))
        return 0
    loads = [float(value) for value in args.loads.split(",") if value]
    policies = [name for name in args.policies.split(",") if name and (name != "las" or "las" in POLICIES)]
    tasks = [(policy, load, args.trace) for load in loads for policy in policies]
    started = time.perf_counter()
    if args.processes > 1:
        with multiprocessing.Pool(args.processes) as pool:
            rows = pool.map(one, tasks, chunksize=1)
    else:
        rows = [one(task) for task in tasks]
    default = CoordinatorSettings().scheduler_policy
    by_key = {(row["policy"], row["load"]): row for row in rows if "unavailable" not in row}
    ours, oracle = by_key.get((default, 0.9)), by_key.get(("ref-srtf", 0.9))
    report = {
        "trace": args.trace,
        "preemption_cost": PREEMPTION_COST,
        "default_policy": default,
        "default_over_ref_srtf_avg_jct_at_0.9": round(ours["avg_jct"] / oracle["avg_jct"], 3) if ours and oracle else None,
        "utilization_definitions": "window: first to last submit; queued: while jobs were pending (see README, Simulator)",
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "processes": args.processes},
    }
    print(markdown(rows) if args.markdown else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
