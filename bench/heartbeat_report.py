"""What bench/heartbeats.py measures and how it judges a step: CPU from /proc, the coordinator's
sampled ingest rate and lag, the generator's own figures, and the JSON of a step."""

from __future__ import annotations

import array
import contextlib
import math
import os
import platform
import statistics
import time
from pathlib import Path

import grpc

LAG_LIMIT_MS = 100.0
INGEST_TOLERANCE = 0.02
"""Ingest rate must be within this fraction of the send rate."""
GENERATOR_TOLERANCE = 0.01
"""The generator 'keeps up' when it sends at least (1 - this) of the intended rate."""
MAIN_THREAD_SATURATED = 0.9
"""The coordinator's event-loop thread this busy (fraction of a core) counts as saturated."""
MACHINE_SATURATED = 0.95
"""All cores together this busy counts as a saturated machine."""
COORDINATOR_STATS_WINDOW = 10.0
"""Seconds covered by GetClusterStatus's rate and lag (coordinator.cluster.HeartbeatStats)."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, live and exited), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread of a process, in seconds."""
    with open(f"/proc/{pid}/task/{tid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_snapshot(pid: int, generator_pids) -> dict[str, float]:
    """CPU seconds used so far by the coordinator (all threads and its main thread), the generators,
    this process and the whole machine, with the wall time: subtract two to get a window."""
    return {
        "coordinator": cpu_seconds(pid),
        "coordinator_main_thread": thread_cpu_seconds(pid, pid),
        "generators": proc_cpu(generator_pids),
        "bench": proc_cpu([os.getpid()]),
        "machine": machine_busy_seconds(),
        "wall": time.time(),
    }


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def quantile(sorted_values, q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def proc_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def describe_sample(sample: dict) -> str:
    if "error" in sample:
        return f"t={sample['t']:5.1f}s GetClusterStatus failed: {sample['error']}"
    return (
        f"t={sample['t']:5.1f}s ingest {sample['rate']:8.1f}/s lag p50 {sample['p50_ms']:7.2f} ms "
        f"p99 {sample['p99_ms']:7.2f} ms (GetClusterStatus took {sample['rpc_ms']:.0f} ms)"
    )


def summarize(agents, duration, warmup, window_s, registration_s, samples, before, after, results, lost, args) -> dict:
    intended = agents / args.interval
    status_errors = [sample for sample in samples if "error" in sample]
    samples = [sample for sample in samples if "error" not in sample]
    fatal = [r["fatal"] for r in results if "fatal" in r]
    sent_in_window = sum(r.get("sent_in_window", 0) for r in results)
    late = sorted(value for r in results for value in array.array("f", r.get("late_ms", b"")))
    writes = sorted(value for r in results for value in array.array("f", r.get("write_ms", b"")))
    send_rate = sent_in_window / duration if duration else 0.0

    # Ingest rate: samples whose trailing 10 s hold no registration (else the latest one).
    full = [s for s in samples if s["t"] + warmup >= COORDINATOR_STATS_WINDOW - 0.5]
    ingest_rate = statistics.fmean(s["rate"] for s in full) if full else (samples[-1]["rate"] if samples else 0.0)
    heartbeats = ingest_rate * window_s
    coordinator_cpu = after["coordinator"] - before["coordinator"]
    main_thread_cpu = after["coordinator_main_thread"] - before["coordinator_main_thread"]
    generator_cpu = after["generators"] - before["generators"]
    machine_cpu = after["machine"] - before["machine"]
    bench_cpu = after["bench"] - before["bench"]

    # Backlog: ingest keeps pace with sends, and lag does not climb through the window.
    thirds = max(1, len(samples) // 3)
    first, last = samples[:thirds], samples[-thirds:]
    p50_first = statistics.median(s["p50_ms"] for s in first) if first else 0.0
    p50_last = statistics.median(s["p50_ms"] for s in last) if last else 0.0
    p99_first = statistics.median(s["p99_ms"] for s in first) if first else 0.0
    p99_last = statistics.median(s["p99_ms"] for s in last) if last else 0.0
    ingest_ratio = ingest_rate / send_rate if send_rate else 0.0
    ingest_short = ingest_ratio < 1 - INGEST_TOLERANCE
    # A backlog shows in the median first (every heartbeat waits behind it); the p99 moves with
    # one-off stalls (GC pauses, GetClusterStatus) and has its own limit, LAG_LIMIT_MS.
    lag_climbing = (p50_last - p50_first) > max(10.0, 0.5 * p50_first)
    backlog_growing = bool(ingest_short or lag_climbing or lost)
    worst_p99 = max((s["p99_ms"] for s in samples), default=0.0)
    worst_p50 = max((s["p50_ms"] for s in samples), default=0.0)
    generator_keeps_up = send_rate >= (1 - GENERATOR_TOLERANCE) * intended and not fatal
    sustained = bool(
        generator_keeps_up and not backlog_growing and worst_p99 < LAG_LIMIT_MS and not lost and not status_errors and samples
    )
    main_thread_utilization = main_thread_cpu / window_s if window_s else 0.0
    machine_saturated = machine_cpu >= MACHINE_SATURATED * window_s * (os.cpu_count() or 1)
    if sustained:
        limited_by = None
    elif main_thread_utilization >= MAIN_THREAD_SATURATED:
        limited_by = "coordinator"  # its GIL-bound event loop is (nearly) always busy: the hard ceiling
    elif machine_saturated:
        limited_by = "machine-cpu"  # every core busy (coordinator + generator + whatever else runs here)
    elif not generator_keeps_up:
        limited_by = "generator"
    else:
        limited_by = "coordinator"
    return {
        "registration_s": round(registration_s, 2),
        "duration_s": round(window_s, 2),
        "heartbeats_per_s": round(ingest_rate, 1),
        "heartbeats_in_window": round(heartbeats),
        "generator_send_rate": round(send_rate, 1),
        "generator_sent_in_window": sent_in_window,
        "generator_keeps_up": generator_keeps_up,
        "ingest_to_send_ratio": round(ingest_ratio, 4),
        "coordinator_cpu_s": round(coordinator_cpu, 2),
        "coordinator_cpu_utilization": round(coordinator_cpu / window_s, 3) if window_s else None,
        "coordinator_cpu_s_per_1000_heartbeats": round(1000 * coordinator_cpu / heartbeats, 4) if heartbeats else None,
        "coordinator_cpu_us_per_heartbeat": round(1e6 * coordinator_cpu / heartbeats, 1) if heartbeats else None,
        # The asyncio thread holds the GIL for everything Python does (grpc.aio's per-message work, the
        # handlers); gRPC's C++ event-engine threads (socket I/O, HTTP/2) run beside it without the GIL.
        # The main thread reaching ~1.0 is the coordinator's hard ceiling, whatever the number of cores.
        "coordinator_main_thread_cpu_utilization": round(main_thread_cpu / window_s, 3) if window_s else None,
        "coordinator_other_threads_cpu_utilization": (
            round((coordinator_cpu - main_thread_cpu) / window_s, 3) if window_s else None
        ),
        "coordinator_main_thread_us_per_heartbeat": round(1e6 * main_thread_cpu / heartbeats, 1) if heartbeats else None,
        "lag_p50_ms": samples[-1]["p50_ms"] if samples else None,
        "lag_p99_ms": samples[-1]["p99_ms"] if samples else None,
        "lag_p50_worst_ms": worst_p50,
        "lag_p99_worst_ms": worst_p99,
        "lag_p50_first_third_ms": round(p50_first, 3),
        "lag_p50_last_third_ms": round(p50_last, 3),
        "lag_p99_first_third_ms": round(p99_first, 3),
        "lag_p99_last_third_ms": round(p99_last, 3),
        "backlog_growing": backlog_growing,
        "sustained": sustained,
        "limited_by": limited_by,
        "streams_lost": lost,
        "machine_cpu_saturated": machine_saturated,
        "status_rpc_ms_median": round(statistics.median(s["rpc_ms"] for s in samples), 2) if samples else None,
        "status_rpc_ms_max": max((s["rpc_ms"] for s in samples), default=None),
        "generator": {
            "procs": len(results),
            "channels": sum(r.get("channels", 0) for r in results),
            "agents_per_channel": args.agents_per_channel,
            "cpu_s": round(generator_cpu, 2),
            "cpu_utilization": round(generator_cpu / window_s, 3) if window_s else None,
            "schedule_late_p50_ms": round(quantile(late, 0.5), 3),
            "schedule_late_p99_ms": round(quantile(late, 0.99), 3),
            "schedule_late_max_ms": round(late[-1], 3) if late else 0.0,
            "write_p50_ms": round(quantile(writes, 0.5), 3),
            "write_p99_ms": round(quantile(writes, 0.99), 3),
            "skipped_slots": sum(r.get("skipped_slots", 0) for r in results),
            "write_errors": sum(r.get("write_errors", 0) for r in results),
            "launches_answered": sum(r.get("launches", 0) for r in results),
            "task_statuses_sent": sum(r.get("statuses_sent", 0) for r in results),
            "progress_reports_in_window": sum(r.get("progress_in_window", 0) for r in results),
            "errors": [e for r in results for e in r.get("errors", [])][:5] + fatal,
        },
        "machine_cpu_s": {
            "busy_total": round(machine_cpu, 2),
            "coordinator": round(coordinator_cpu, 2),
            "generators": round(generator_cpu, 2),
            "bench_main": round(bench_cpu, 2),
            "other_processes": round(machine_cpu - coordinator_cpu - generator_cpu - bench_cpu, 2),
            "capacity": round(window_s * (os.cpu_count() or 1), 2),
        },
        "status_samples": samples + status_errors,
        "status_errors": len(status_errors),
    }


def step_line(step: dict) -> str:
    return (
        f"{step['agents']} agents: sent {step.get('generator_send_rate')}/s (intended {step['intended_send_rate']}), "
        f"ingest {step.get('heartbeats_per_s')}/s, p99 worst {step.get('lag_p99_worst_ms')} ms, "
        f"coordinator cpu {step.get('coordinator_cpu_utilization')} core, backlog {step.get('backlog_growing')} -> "
        f"{'SUSTAINED' if step.get('sustained') else 'NOT sustained (' + str(step.get('limited_by')) + ')'}"
    )


def compact_step(step: dict) -> dict:
    """The facts of one --find-max step that decide it, for the summary."""
    keys = (
        "agents",
        "retry",
        "sustained",
        "limited_by",
        "generator_send_rate",
        "heartbeats_per_s",
        "ingest_to_send_ratio",
        "lag_p50_ms",
        "lag_p99_worst_ms",
        "lag_p50_first_third_ms",
        "lag_p50_last_third_ms",
        "backlog_growing",
        "streams_lost",
        "status_errors",
        "coordinator_cpu_utilization",
        "coordinator_main_thread_cpu_utilization",
        "coordinator_cpu_s_per_1000_heartbeats",
        "status_rpc_ms_median",
        "registration_s",
        "registration_retries",
    )
    compact = {key: step[key] for key in keys if key in step}
    if "generator" in step:
        compact["generator_cpu_utilization"] = step["generator"]["cpu_utilization"]
        compact["generator_write_p99_ms"] = step["generator"]["write_p99_ms"]
    if "machine_cpu_s" in step:
        compact["other_processes_cpu_s"] = step["machine_cpu_s"]["other_processes"]
    return compact


def machine_info() -> dict:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "protobuf": __import__("google.protobuf").protobuf.__version__,
    }
