"""What `gpuctl job` says of a job's step telemetry: throughput, rank 0's scalars, per-rank step times,
stragglers and idleness (Job.telemetry, kept by the coordinator from the ranks' report_progress)."""

from __future__ import annotations

from gpuorch.cli.printing import printable, stamp, table


def telemetry_lines(job) -> list[str]:
    """Nothing for a job whose ranks never reported a step, was never idle and had no straggler."""
    shown = job.telemetry
    lines = []
    if shown.step or shown.steps_per_second:
        rate = f"{shown.steps_per_second:.3g} steps/s" if shown.steps_per_second else "rate not yet known"
        samples = f", {shown.samples_per_second:.4g} samples/s" if shown.samples_per_second else ""
        lines.append(f"Progress:   step {shown.step}, {rate}{samples} (updated {stamp(shown.update_time)})")
    if shown.scalars:
        lines.append("Scalars:    " + ", ".join(f"{name}={value:.6g}" for name, value in sorted(shown.scalars.items())))
    if shown.idle:
        since, now = stamp(shown.low_utilization_since), shown.gpu_utilization_percent
        lines.append(f"Idle:       its GPUs have been under the idle threshold since {since} ({now:.1f}% now)")
    for straggler in shown.stragglers:
        lines.append(
            f"Straggler:  rank {straggler.rank} on {straggler.node_id} (GPU {straggler.device_uuid}), "
            f"attempt {straggler.attempt}: "
            f"{straggler.step_seconds:.3g} s a step against the median {straggler.median_step_seconds:.3g} s, "
            f"flagged {stamp(straggler.flag_time)}"
        )
    lines = [printable(line) for line in lines]
    if len(shown.ranks) > 1 or any(rank.step_seconds for rank in shown.ranks):
        rows = [
            (rank.rank, rank.node_id, rank.device_uuid, rank.step, f"{rank.step_seconds:.4g}" if rank.step_seconds else "-",
             rank.slow_windows or "-")
            for rank in shown.ranks
        ]  # fmt: skip
        # A line per row: the job view escapes each line it prints, and the table's newlines would be escaped too.
        lines += table(("RANK", "NODE", "GPU", "STEP", "STEP SECONDS", "SLOW WINDOWS"), rows).splitlines()
    return lines
