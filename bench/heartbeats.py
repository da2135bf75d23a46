"""Heartbeat ingest benchmark: a real coordinator, thousands of simulated agents on loopback.

    python bench/heartbeats.py                        # 2000 agents (16,000 GPUs), 60 s steady window
    python bench/heartbeats.py --agents 4000 --duration 30
    python bench/heartbeats.py --find-max             # step the agent count up until the coordinator falls behind
    python bench/heartbeats.py --agents 2000 --duration 30 --progress   # every agent runs an 8-rank job

What runs:

* a real `gpuorch-coordinator` process on 127.0.0.1:<free port> with a temporary state dir;
* a light load generator in `--procs` processes (multiprocessing, spawn), each running
  grpc.aio. Every simulated agent speaks the real `gpuorch.v1.AgentService/Connect`
  protocol: it opens a stream, sends a Register with 8 devices (unique uuids), waits for
  the RegisterAck, then sends a Heartbeat every interval (sequence, sent_time set just
  before the write, 8 DeviceTelemetry samples). Send times are staggered evenly across
  the interval over all agents (agent i sends at k*interval + i/N*interval, wall clock),
  so the coordinator sees a smooth N/interval heartbeats per second, as from a real fleet
  whose agents started at random moments.

  Messages are built once per agent; a send only updates sequence, sent_time and the
  temperature/utilisation of each sample (temperature changes, as on real GPUs, so the
  coordinator's health re-assessment runs as it would in production; --static-telemetry
  turns that off).

  Channels: by default one channel (= one TCP/HTTP2 connection, forced with
  grpc.use_local_subchannel_pool, since gRPC would otherwise share one connection among
  identical channels of a process) per agent, as in production where every node has its
  own connection: the coordinator pays per-connection costs (one read syscall and one
  HTTP/2 frame per heartbeat, keepalive pings, flow-control updates) that multiplexing
  many agents on one connection would hide. --agents-per-channel N multiplexes N agents
  per connection instead. Channel options are the real agent's (agent.agent.CHANNEL_OPTIONS,
  incl. 5 s keepalive pings).

--progress (bench/heartbeat_progress.py): every simulated agent runs one 8-rank job, so every heartbeat
also carries step telemetry for 8 ranks. Before the agents start the bench submits one job of 8 GPUs
on one node (gpus=8, gpus_per_node=8, argv ["true"]) per agent; each agent answers the LaunchTask
it is sent with a TaskStatus RUNNING per rank (never executing anything), and from then on every
heartbeat carries 8 RankProgress with the launch's job id and attempt: step +1 per heartbeat, samples
+32 per step, step_seconds 0.9-1.1 s, last_progress_time = the send time, scalars {"loss", "lr"} on
rank 0. The warm-up starts once the coordinator reports every job RUNNING; after the window a few jobs'
telemetry (GetJob) is read back into "progress_check" to show it was ingested. Without --progress
no job is submitted (the baseline); mode says which ("steady" or "steady-progress").

What is measured, over a steady window that starts --warmup seconds after the last agent
registered:

* ingest rate and lag from `gpuorch.v1.ClusterService/GetClusterStatus` (the
  coordinator's own 10 s window; lag = coordinator wall time when applied - sent_time),
  sampled every --sample-every seconds (default 10: each call walks every GPU on the
  coordinator's event loop and stalls heartbeat ingest meanwhile, so a sample's lag
  includes the stall of the sample before it; one call is made just before the window so
  that the first sample carries one stall as well);
* coordinator CPU seconds (utime+stime of /proc/<pid>/stat, all threads) over the window,
  per 1,000 heartbeats ingested, and how much of it is the asyncio (GIL-holding) main
  thread, whose saturation is the coordinator's ceiling whatever the number of cores;
* the generator's achieved send rate vs the intended agents/interval, how late its sends
  were against the schedule and how long its writes took (if the generator falls behind,
  that is a generator limit, not a coordinator one, and the output says so), and the CPU
  that every other process on the machine used meanwhile (the machine may be shared);
* "backlog": growing when the ingest rate is more than 2% below the send rate, when the
  median lag climbs from the first to the last third of the window, or when a stream is lost.

A count is "sustained" when the generator kept up, the worst sampled p99 lag stayed below
100 ms and no backlog grew. --find-max steps up 500, 1000, 2000, 3000, ... (fresh
coordinator per step), retries a failed step once, then bisects below the first count
that was not sustained.

The load generator is bench/heartbeat_load.py; what is measured and how a step is judged,
bench/heartbeat_report.py; the coordinator process, bench/heartbeat_coordinator.py; this file starts
them, runs the steps and prints the result.

Prints exactly one JSON object on stdout at the end; progress goes to stderr. Every
process it starts is stopped at the end, on errors and on Ctrl-C/SIGTERM (and, should
this process be SIGKILLed, by the kernel through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench.heartbeat_coordinator import Coordinator  # noqa: E402
from bench.heartbeat_load import DEVICES_PER_AGENT, Generators, log, raise_fd_limit  # noqa: E402
from bench.heartbeat_progress import progress_check, submit_jobs, wait_running  # noqa: E402
from bench.heartbeat_report import (  # noqa: E402
    COORDINATOR_STATS_WINDOW,
    GENERATOR_TOLERANCE,
    INGEST_TOLERANCE,
    LAG_LIMIT_MS,
    compact_step,
    cpu_snapshot,
    describe_sample,
    machine_info,
    open_fds,
    rss_mb,
    step_line,
    summarize,
)

STATUS_TIMEOUT = 30.0
FIND_MAX_LADDER = (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000)


def run_step(agents: int, duration: float, args, workdir: Path, cleanup: list) -> dict:
    """Starts a fresh coordinator and `agents` simulated agents, measures a steady window, stops all."""
    intended = agents / args.interval
    coordinator = Coordinator(workdir, args.interval)
    cleanup.append(coordinator.stop)
    generators: Generators | None = None
    step: dict = {"agents": agents, "gpus": agents * DEVICES_PER_AGENT, "intended_send_rate": round(intended, 1)}
    try:
        coordinator.start()
        pid = coordinator.process.pid
        log(f"[{agents} agents] coordinator pid {pid} on {coordinator.target}; starting {args.procs} generator process(es)")
        if args.progress:  # one 8-rank job per agent, queued before the agents come
            submitted, job_ids = submit_jobs(coordinator, agents, log)
            step.update(submitted)
        generators = Generators(coordinator.target, agents, args.procs, args)
        cleanup.append(generators.stop)
        started = time.monotonic()
        generators.start()
        # With --progress every registering node wakes a scheduling pass over the queued jobs: slower to fill.
        registration_timeout = 60 + agents / (10 if args.progress else 50)
        last_report = 0.0
        while generators.registered() < agents:
            if generators.dead():
                raise RuntimeError(f"generator process(es) died during registration: {generators.dead()}")
            if generators.failed():
                raise RuntimeError(f"{generators.failed()} agent(s) failed to register (see above)")
            if coordinator.process.poll() is not None:
                raise RuntimeError(f"coordinator exited with {coordinator.process.returncode}:\n{coordinator.log_tail()}")
            elapsed = time.monotonic() - started
            if elapsed > registration_timeout:
                raise RuntimeError(f"only {generators.registered()}/{agents} agents registered after {registration_timeout:.0f}s")
            if elapsed - last_report >= 5:
                last_report = elapsed
                log(f"[{agents} agents] registered {generators.registered()}/{agents} ({generators.retries()} retried)")
            time.sleep(0.05)
        registration_s = time.monotonic() - started
        step["registration_retries"] = generators.retries()
        # The coordinator's rate and lag cover its last 10 s: make sure that is all steady state.
        warmup = max(args.warmup, COORDINATOR_STATS_WINDOW - duration)
        step["warmup_s"] = warmup
        log(f"[{agents} agents] all registered in {registration_s:.1f}s; warm-up {warmup:.0f}s, then {duration:.0f}s measured")
        if args.progress:  # all RUNNING before the warm-up starts
            step.update(wait_running(coordinator, agents, log, timeout=120 + agents / 10))
        start_wall = time.time() + warmup
        end_wall = start_wall + duration
        generators.set_window(start_wall, end_wall)
        # One GetClusterStatus just before the window, so that every sample's 10 s hold exactly one
        # call's stall of the event loop (the previous sample's), the first one included.
        time.sleep(max(0.0, start_wall - 0.5 - time.time()))
        baseline = sample_status(coordinator, start_wall)
        step["status_baseline"] = baseline
        time.sleep(max(0.0, start_wall - time.time()))
        before = cpu_snapshot(pid, generators.pids)
        loadavg_start = os.getloadavg()
        samples = []
        next_sample = start_wall + args.sample_every
        while True:
            now = time.time()
            if now >= end_wall - 1e-3:
                break
            time.sleep(max(0.0, min(next_sample, end_wall) - now))
            if time.time() >= end_wall - 1e-3:
                break
            samples.append(sample_status(coordinator, start_wall))
            log(f"[{agents} agents] {describe_sample(samples[-1])}")
            next_sample += args.sample_every
        after = cpu_snapshot(pid, generators.pids)
        samples.append(sample_status(coordinator, start_wall))  # after the CPU window; its 10 s end with it
        log(f"[{agents} agents] final: {describe_sample(samples[-1])}")
        window_s = after["wall"] - before["wall"]
        coordinator_rss = rss_mb(pid)
        coordinator_fds = open_fds(pid)
        loadavg_end = os.getloadavg()
        lost = generators.lost()
        if args.progress:
            step["progress_check"] = progress_check(coordinator, job_ids)
        results = generators.stop()
        cleanup.remove(generators.stop)
        generators = None
        step.update(summarize(agents, duration, warmup, window_s, registration_s, samples, before, after, results, lost, args))
        step.update(
            {
                "coordinator_rss_mb": coordinator_rss,
                "coordinator_open_fds": coordinator_fds,
                "loadavg_start": [round(value, 2) for value in loadavg_start],
                "loadavg_end": [round(value, 2) for value in loadavg_end],
            }
        )
        return step
    finally:
        if generators is not None:
            generators.stop(timeout=10)
            with contextlib.suppress(ValueError):
                cleanup.remove(generators.stop)
        code = coordinator.stop()
        with contextlib.suppress(ValueError):
            cleanup.remove(coordinator.stop)
        step["coordinator_exit_code"] = code
        step["coordinator_log_lines"] = coordinator.log_lines()


def sample_status(coordinator: Coordinator, start_wall: float) -> dict:
    asked = time.monotonic()
    try:
        status = coordinator.status(timeout=STATUS_TIMEOUT)
    except grpc.RpcError as error:  # an overloaded coordinator: a result in itself, not a crash of the bench
        return {"t": round(time.time() - start_wall, 2), "error": f"{error.code().name}: {error.details()}"}
    return {
        "t": round(time.time() - start_wall, 2),
        "rate": round(status.heartbeats_per_second, 1),
        "p50_ms": round(status.heartbeat_lag_p50_ms, 3),
        "p99_ms": round(status.heartbeat_lag_p99_ms, 3),
        "nodes_ready": status.nodes_by_state.get("NODE_STATE_READY", 0),
        "rpc_ms": round((time.monotonic() - asked) * 1000, 2),
    }


def find_max(args, workdir: Path, cleanup: list) -> tuple[dict | None, list[dict], int | None, str | None]:
    steps: list[dict] = []
    best: dict | None = None
    failed_at: int | None = None
    limit_reason: str | None = None

    def attempt(agents: int) -> dict:
        step = run_step(agents, args.step_seconds, args, workdir, cleanup)
        log(step_line(step))
        steps.append(step)
        for retry in range(args.retries):
            if step["sustained"] or step["limited_by"] == "generator":
                break
            log(f"[{agents} agents] not sustained; retry {retry + 1} (the machine is shared: one stall should not decide)")
            step = run_step(agents, args.step_seconds, args, workdir, cleanup)
            step["retry"] = retry + 1
            log(step_line(step))
            steps.append(step)
        return step

    ladder = [n for n in FIND_MAX_LADDER if n <= args.max_agents]
    for agents in ladder:
        step = attempt(agents)
        if step["sustained"]:
            best = step
            continue
        failed_at, limit_reason = agents, step["limited_by"]
        break
    # Bisect between the last sustained count and the first that was not (a generator limit says
    # nothing about the coordinator, so it ends the search).
    if failed_at is not None and limit_reason != "generator":
        low = best["agents"] if best else 0
        for _ in range(args.refine):
            middle = int(round((low + failed_at) / 2 / args.resolution) * args.resolution)
            if middle <= low or middle >= failed_at:
                break
            step = attempt(middle)
            if step["sustained"]:
                low, best = middle, step
            else:
                failed_at, limit_reason = middle, step["limited_by"]
                if limit_reason == "generator":
                    break
    return best, steps, failed_at, limit_reason


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=2000, help="simulated agents, 8 GPUs each (default 2000)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds of the steady run (default 60)")
    parser.add_argument("--find-max", action="store_true", help="step the agent count up; report the largest sustained")
    parser.add_argument("--step-seconds", type=float, default=20.0, help="measured seconds per --find-max step (default 20)")
    parser.add_argument("--max-agents", type=int, default=16000, help="highest count --find-max tries (default 16000)")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the first unsustained count (default 2)")
    parser.add_argument("--resolution", type=int, default=250, help="agent-count granularity of the bisection (default 250)")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a --find-max step the coordinator failed (default 1)")
    parser.add_argument("--procs", type=int, default=2, help="generator processes (default 2)")
    parser.add_argument("--agents-per-channel", type=int, default=1, help="agents sharing one channel/connection (default 1)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval in seconds (default 1)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds from the last registration to the window (default 5)")
    parser.add_argument(
        "--sample-every",
        type=float,
        default=COORDINATOR_STATS_WINDOW,
        help="seconds between GetClusterStatus samples (default 10, the coordinator's stats window; each call "
        "blocks the coordinator's event loop while it walks every GPU, so polling faster inflates the lag it measures)",
    )
    parser.add_argument("--register-concurrency", type=int, default=64, help="registrations in flight per process (default 64)")
    parser.add_argument(
        "--static-telemetry", action="store_true", help="send identical telemetry (skips the coordinator's health re-check)"
    )
    parser.add_argument(
        "--progress", action="store_true", help="every agent runs one 8-rank job; each heartbeat carries 8 RankProgress"
    )
    args = parser.parse_args(argv)
    if args.agents < 1 or args.procs < 1 or args.agents_per_channel < 1 or args.interval <= 0:
        parser.error("--agents, --procs and --agents-per-channel must be >= 1 and --interval > 0")
    if args.duration <= 0 or args.step_seconds <= 0 or args.sample_every <= 0:
        parser.error("--duration, --step-seconds and --sample-every must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["heartbeats.py", *argv])
    fd_limit = raise_fd_limit()
    needed = (args.max_agents if args.find_max else args.agents) / args.agents_per_channel + 200
    if needed > fd_limit:
        log(f"warning: the open-file limit {fd_limit} may be too low for {int(needed)} connections")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    cleanup: list = []
    workdir = Path(tempfile.mkdtemp(prefix="gpuorch-bench-heartbeats-"))
    started = time.time()
    keep = False
    try:
        if args.find_max:
            best, steps, failed_at, limit_reason = find_max(args, workdir, cleanup)
            head = best or (steps[0] if steps else {})
            result = {
                "benchmark": "heartbeats",
                "mode": "find-max",
                **{key: value for key, value in head.items() if key not in ("status_samples",)},
                "max_sustained_agents": best["agents"] if best else 0,
                "max_sustained_gpus": best["gpus"] if best else 0,
                "first_unsustained_agents": failed_at,
                "search_capped_by_max_agents": failed_at is None,
                "limited_by": limit_reason,
                "criteria": {
                    "lag_p99_ms_below": LAG_LIMIT_MS,
                    "ingest_within_fraction_of_send": INGEST_TOLERANCE,
                    "generator_within_fraction_of_intended": GENERATOR_TOLERANCE,
                },
                "top_level_metrics_from": "the largest sustained step" if best else "the first step (none was sustained)",
                "steps": [compact_step(step) for step in steps],
            }
        else:
            step = run_step(args.agents, args.duration, args, workdir, cleanup)
            log(step_line(step))
            mode = "steady-progress" if args.progress else "steady"
            result = {"benchmark": "heartbeats", "mode": mode, **step, "max_sustained_agents": None}
        result.update(
            {
                "devices_per_agent": DEVICES_PER_AGENT,
                "heartbeat_interval_s": args.interval,
                "telemetry_varies": not args.static_telemetry,
                "progress": args.progress,
                "progress_per_heartbeat": DEVICES_PER_AGENT if args.progress else 0,
                "sample_every_s": args.sample_every,
                "wall_s": round(time.time() - started, 1),
                "machine": machine_info(),
                "command": command,
            }
        )
        print(json.dumps(result, indent=2))
        return 0
    except KeyboardInterrupt as interrupt:
        log(f"interrupted ({str(interrupt) or 'Ctrl-C'}); stopping everything")
        return 130
    except Exception as error:  # noqa: BLE001 - any failure is the run's result; finally stops every process
        log(f"error: {error}")
        keep = True
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up even if Ctrl-C is pressed again
        for stop in reversed(cleanup):
            with contextlib.suppress(Exception):
                stop()
        if keep:
            log(f"coordinator logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
