"""gpuctl history: ended and running jobs over a time window, like Slurm's sacct, paged through ListJobs."""

from __future__ import annotations

import argparse
import datetime
import json

from gpuorch.cli.printing import TIME_ZONE, as_json, duration, job_state_name, stamp, table
from gpuorch.durations import parse_duration

DEFAULT_SINCE = "1d"
HISTORY_PAGE_SIZE = 500


def parse_when(text: str, now: datetime.datetime | None = None) -> float:
    """Wall seconds of `text`: "now", a duration back from now (7d, 12h, 30m, 1h30m), or an ISO date or time
    (2026-01-31, 2026-01-31T08:00, with or without a zone; local time unless --utc or a zone says otherwise).
    Raises ValueError saying what is accepted."""
    now = now or datetime.datetime.now(datetime.UTC)
    value = text.strip()
    if value.lower() == "now":
        return now.timestamp()
    try:
        return now.timestamp() - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration back from now (7d, 12h, 30m) nor an ISO date or time (2026-01-31, 2026-01-31T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC) if TIME_ZONE["utc"] else moment.astimezone()
    return moment.timestamp()


def when_argument(text: str) -> str:
    """argparse's check of --since/--until (argparse names the flag); the value is read again once --utc is known."""
    try:
        parse_when(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_history_arguments(history: argparse.ArgumentParser, states: str) -> None:
    history.add_argument("--user", "-u", default="", metavar="USER", help="only jobs of this owner (default: everyone's)")
    history.add_argument(
        "--since", "-S", type=when_argument, default=DEFAULT_SINCE, metavar="WHEN",
        help=f"jobs still in the system at or after WHEN: 7d, 12h, 30m back from now, or an ISO date/time "
        f"(default {DEFAULT_SINCE})",
    )  # fmt: skip
    history.add_argument(
        "--until", "-E", type=when_argument, default=None, metavar="WHEN",
        help="jobs submitted at or before WHEN (same forms as --since; default: now)",
    )  # fmt: skip
    history.add_argument("--state", "-s", action="append", default=[], help=f"only jobs in this state (repeatable): {states}")
    history.add_argument(
        "--limit", "-n", type=_positive, default=1000, help="at most this many jobs, newest first (default 1000)"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def gpus_of(job) -> int:
    placed = sum(len(node.device_uuids) for node in job.placement.nodes)
    return placed or job.spec.gpus


def elapsed(job, now: float) -> str:
    if not job.HasField("start_time"):
        return "-"
    end = job.end_time.ToNanoseconds() / 1e9 if job.HasField("end_time") else now
    return duration(max(0, int(end - job.start_time.ToNanoseconds() / 1e9)))


def format_history(jobs, now: float) -> str:
    rows = [
        (
            job.job_id,
            job.spec.name or "-",
            job.spec.owner or "-",
            job_state_name(job.state),
            gpus_of(job),
            stamp(job.submit_time),
            stamp(job.start_time),
            stamp(job.end_time),
            elapsed(job, now),
            job.reason or "-",
        )
        for job in jobs
    ]
    return table(("JOB", "NAME", "OWNER", "STATE", "GPUS", "SUBMIT", "START", "END", "ELAPSED", "REASON"), rows)


def run_history(args: argparse.Namespace, client) -> int:
    since = parse_when(args.since)
    until = parse_when(args.until) if args.until else None
    if until is not None and until < since:
        raise ValueError(f"--until {args.until} is before --since {args.since}")
    found = []
    for job in client.iter_jobs(
        page_size=min(args.limit, HISTORY_PAGE_SIZE), states=args.state, owner=args.user, since=since, until=until
    ):
        found.append(job)
        if len(found) == args.limit:
            break
    if args.output == "json":
        print(json.dumps({"jobs": [as_json(job) for job in found]}, indent=2))
    else:
        print(format_history(found, datetime.datetime.now(datetime.UTC).timestamp()))
    return 0
