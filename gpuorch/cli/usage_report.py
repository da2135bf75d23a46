"""gpuctl usage: the cost report (JobService/GetUsage): GPU-hours, mean utilisation and peak memory of the
attempts that ran in a range, by owner, pool or job; `--history` shows the cluster's usage over time instead."""

from __future__ import annotations

import argparse
import csv
import io
import json
import time

from gpuorch.cli.history import parse_when, when_argument
from gpuorch.cli.printing import GIB, as_json, table
from gpuorch.cli.views import format_usage

COLUMNS = ("jobs", "attempts", "gpu_seconds", "gpu_hours", "mean_gpu_utilization_percent", "peak_memory_bytes")


def add_usage_arguments(usage: argparse.ArgumentParser) -> None:
    usage.add_argument("--by", choices=("owner", "pool", "job"), default="owner", help="one row per owner (default), pool or job")
    usage.add_argument("--since", "-S", type=when_argument, default="7d", metavar="WHEN",
                       help="from WHEN: 7d, 12h, 30m back from now, or an ISO date/time (default 7d)")  # fmt: skip
    usage.add_argument("--until", "-E", type=when_argument, default=None, metavar="WHEN", help="until WHEN (default: now)")
    usage.add_argument("--user", "-u", default="", metavar="USER", help="only jobs of this owner")
    usage.add_argument("--history", action="store_true", help="the cluster's usage over time instead (GetUsageHistory)")
    usage.add_argument("--days", type=float, default=1.0, help="with --history: how far back, in days (default 1)")
    usage.add_argument("--hourly", action="store_true", help="with --history: hourly points, kept 90 days")


def row_dict(row, by_job: bool) -> dict:
    values = {
        "key": row.key, "jobs": row.jobs, "attempts": row.attempts, "gpu_seconds": round(row.gpu_seconds, 3),
        "gpu_hours": round(row.gpu_seconds / 3600, 4), "mean_gpu_utilization_percent": round(row.mean_gpu_utilization_percent, 2),
        "peak_memory_bytes": row.peak_memory_bytes,
    }  # fmt: skip
    return {**values, "owner": row.owner, "pool": row.pool} if by_job else values


def format_report(response, by: str, output: str) -> str:
    by_job = by == "job"
    rows = [row_dict(row, by_job) for row in response.rows]
    total = row_dict(response.total, False)
    if output == "json":
        return json.dumps({"by": by, "since": response.since.ToJsonString(), "until": response.until.ToJsonString(),
                           "rows": rows, "total": total}, indent=2)  # fmt: skip
    fields = ["key", *(("owner", "pool") if by_job else ()), *COLUMNS]
    if output == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([by if name == "key" else name for name in fields])
        writer.writerows([[row[name] for name in fields] for row in [*rows, {**total, "owner": "", "pool": ""}]])
        return out.getvalue().rstrip("\n")
    headers = (by.upper(), *(("OWNER", "POOL") if by_job else ()), "JOBS", "ATTEMPTS", "GPU-HOURS", "MEAN UTIL", "PEAK MEM")

    def cells(row: dict, extra: tuple) -> tuple:
        peak = f"{row['peak_memory_bytes'] / GIB:.1f} GiB" if row["peak_memory_bytes"] else "-"
        return (row["key"], *extra, row["jobs"], row["attempts"], f"{row['gpu_hours']:.2f}",
                f"{row['mean_gpu_utilization_percent']:.1f}%", peak)  # fmt: skip

    lines = [cells(row, (row["owner"], row["pool"]) if by_job else ()) for row in rows]
    lines.append(cells({**total, "key": "total"}, ("", "") if by_job else ()))
    return table(headers, lines)


def run_usage(args: argparse.Namespace, client) -> None:
    if args.history:
        if args.days <= 0:
            raise ValueError(f"--days must be > 0, got {args.days}")
        end = time.time()
        usage = client.usage_history("hour" if args.hourly else "minute", start=end - args.days * 86400, end=end)
        print(json.dumps(as_json(usage), indent=2) if args.output == "json" else format_usage(usage))
        return
    since = parse_when(args.since)
    until = parse_when(args.until) if args.until else None
    if until is not None and until < since:
        raise ValueError(f"--until {args.until} is before --since {args.since}")
    response = client.usage(by=args.by, since=since, until=until, owner=args.user)
    print(format_report(response, args.by, args.output))
