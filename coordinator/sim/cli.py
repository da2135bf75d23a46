"""gpuorch-sim: replays a job trace through the coordinator's scheduling path on simulated time.

    gpuorch-sim --trace FILE [--format philly|jsonl] [--pools NAME=NODESxGPUS,...] [--policy P]
                [--load RHO] [--preemption-cost S] [--oracle] [--seed N] [-o json]

Prints one JSON object (-o json) or a short summary of it. See README.md, "Simulator".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from coordinator.settings import CoordinatorSettings
from coordinator.sim import traces
from coordinator.sim.engine import Replay
from coordinator.sim.policies import UnsupportedPolicy, policy_names, resolve
from coordinator.sim.records import SimSettings
from coordinator.sim.report import report


@dataclass(frozen=True)
class Options:
    trace: str
    trace_format: str = ""
    """philly or jsonl; empty = from the file name (.csv is philly)."""
    pools: str = ""
    """NAME=NODESxGPUS,...; empty = Philly's published VC sizes (philly format only)."""
    policy: str | None = None
    load: float | None = None
    preemption_cost: float = 0.0
    oracle: bool = False
    seed: int = 0
    keep_gaps: bool = False
    per_job: bool = False
    """Add every job's submit, start and end to the report."""
    rank_end_spacing: float = 0.0
    """Seconds between the ends of one attempt's ranks (0: together); see SimSettings."""


def simulate(options: Options, cpu_timer: Callable[[], float] = time.process_time) -> dict:
    """Runs one replay; returns the report. Raises TraceError or UnsupportedPolicy for bad input."""
    trace_format = options.trace_format or ("philly" if options.trace.endswith(".csv") else "jsonl")
    jobs = traces.read_trace(options.trace, trace_format)
    if options.pools:
        pools = traces.parse_pools(options.pools)
    elif trace_format == "philly":
        pools = dict(traces.PHILLY_POOLS)
    else:
        raise traces.TraceError("--pools is required for a jsonl trace (NAME=NODESxGPUS,...)")
    if options.rank_end_spacing < 0:
        raise traces.TraceError(f"--rank-end-spacing must be >= 0 seconds, got {options.rank_end_spacing}")
    if options.preemption_cost < 0:
        raise traces.TraceError(f"--preemption-cost must be >= 0 seconds, got {options.preemption_cost}")
    gaps: list[traces.Gap] = []
    if trace_format == "philly" and not options.keep_gaps:
        jobs, gaps = traces.close_gaps(jobs)
    pool_gpus = {name: nodes * per_node for name, (nodes, per_node) in pools.items()}
    offered = {
        name: round(traces.offered_load([job for job in jobs if job.pool == name], gpus), 4) for name, gpus in pool_gpus.items()
    }
    if options.load is not None:
        jobs = traces.scale_load(jobs, pool_gpus, options.load)
    config, reference_oracle = resolve(options.policy)
    oracle = options.oracle or reference_oracle
    settings = SimSettings(
        pools=pools,
        scheduler=config,
        recovery=CoordinatorSettings().recovery_policy(),
        oracle=oracle,
        preemption_cost=options.preemption_cost,
        seed=options.seed,
        rank_end_spacing=options.rank_end_spacing,
    )
    outcome = asyncio.run(Replay(jobs, settings, cpu_timer).run())
    return report(
        outcome,
        {
            "policy": options.policy or f"default ({config.policy})",
            "scheduler_policy": config.policy,
            "oracle": oracle,
            "load": options.load,
            "offered_load_before_scaling": offered,
            "preemption_cost": options.preemption_cost,
            "seed": options.seed,
            "gaps_closed": [{"after_submit": gap.after_submit, "removed_seconds": gap.removed_seconds} for gap in gaps],
        },
        jobs=options.per_job,
    )


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="gpuorch-sim", description="Replay a job trace through gpuorch's scheduler on simulated time."
    )
    parse.add_argument("--trace", required=True, help="the trace file")
    parse.add_argument("--format", dest="trace_format", choices=("philly", "jsonl"), default="", help="default: philly for .csv")
    parse.add_argument("--pools", default="", help="NAME=NODESxGPUS,... (default for philly: the published VC sizes)")
    parse.add_argument("--policy", choices=policy_names(), default=None, help="default: the coordinator's default settings")
    parse.add_argument("--load", type=float, default=None, help="scale inter-arrival times so each pool's offered load is RHO")
    parse.add_argument("--preemption-cost", type=float, default=0.0, help="seconds a preempted job loses on each resume")
    parse.add_argument("--oracle", action="store_true", help="give the scheduler the true durations as runtime estimates")
    parse.add_argument("--seed", type=int, default=0)
    parse.add_argument("--keep-gaps", action="store_true", help="philly: keep the Oct-Nov hole in submit times")
    parse.add_argument("--rank-end-spacing", type=float, default=0.0, help="seconds between one attempt's ranks' ends")
    parse.add_argument("--per-job", action="store_true", help="add each job's submit, start and end times (-o json)")
    parse.add_argument("-o", "--output", choices=("json", "text"), default="text")
    return parse


def _text(result: dict) -> str:
    lines = [
        f"policy {result['policy']}  load {result['load']}  jobs {result['jobs']}  refused {result['refused']}",
        f"JCT avg {result['avg_jct']:.0f}s p50 {result['p50_jct']:.0f}s p99 {result['p99_jct']:.0f}s",
        f"queueing avg {result['avg_queueing_delay']:.0f}s p99 {result['p99_queueing_delay']:.0f}s",
        f"utilisation {result['utilization_window']:.3f} (first to last submit), {result['utilization_makespan']:.3f} (makespan)",
        f"makespan {result['makespan']:.0f}s; preemptions {result['preemptions']}",
        f"scheduler CPU {result['scheduler_cpu_seconds']:.1f}s over {result['passes']} passes",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The coordinator's per-job info logs would dominate a replay's time; warnings and errors still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    options = Options(
        trace=args.trace,
        trace_format=args.trace_format,
        pools=args.pools,
        policy=args.policy,
        load=args.load,
        preemption_cost=args.preemption_cost,
        oracle=args.oracle,
        seed=args.seed,
        keep_gaps=args.keep_gaps,
        per_job=args.per_job,
        rank_end_spacing=args.rank_end_spacing,
    )
    try:
        result = simulate(options)
    except (traces.TraceError, UnsupportedPolicy) as error:
        print(f"gpuorch-sim: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.output == "json" else _text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
