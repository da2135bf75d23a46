"""Traces for the simulator: the Philly CSV and the generic JSON-lines format, pools, load scaling.

A trace is a list of `TraceJob`s, submit times in seconds from the trace's start. Bad input raises
`TraceError` naming the file, the line and the field.

The generic format (`--format jsonl`): one JSON object per line, blank lines and lines starting
with `#` skipped. Fields: `submit_time` (seconds, required), `duration` (seconds of run time once
started, required, > 0), `gpus` (required, >= 1), `gpus_per_node` (0 = any shape), `owner`, `name`,
`pool` (default "default"), `priority` (integer, default 0), `rank_ends` (optional: one number per
GPU, the seconds after its start at which each rank of the job's first attempt ends, in rank order;
a replay of a recorded run gives them, so that its GPUs come free one by one as they did).
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

PHILLY_POOLS: dict[str, tuple[int, int]] = {
    "6214e9": (64, 8),
    "7f04ca": (32, 8),
    "11cb48": (16, 8),
    "b436b2": (64, 8),
    "ee9e8c": (64, 8),
    "e13805": (16, 8),
    "6c71a0": (32, 8),
    "2869ce": (16, 8),
    "ed69ec": (8, 8),
    "103959": (8, 8),
    "0e4a51": (32, 8),
}
"""Philly's virtual clusters as published comparisons size them: VC -> (nodes, GPUs per node); 2,816 GPUs."""

PHILLY_COLUMNS = ("timestamp", "duration", "num_gpus", "cluster")
GAP_SECONDS = 7 * 24 * 3600.0
"""A pause between two consecutive submits longer than this is a hole in the data (Philly's file lacks
October and November), not a quiet week: `close_gaps` removes it."""
JSONL_FIELDS = {"submit_time", "duration", "gpus", "gpus_per_node", "owner", "name", "pool", "priority", "rank_ends"}


class TraceError(ValueError):
    """A trace or a pool list that cannot be read; the message names the place and the field."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    submit_time: float
    """Seconds from the start of the trace."""
    duration: float
    """Seconds of run time once started (without queueing)."""
    gpus: int
    gpus_per_node: int = 0
    owner: str = ""
    name: str = ""
    pool: str = "default"
    priority: int = 0
    line: int = 0
    """Where the job was read from (for messages)."""
    rank_ends: tuple[float, ...] = ()
    """Seconds after its start at which each rank of the first attempt ends, by rank; () = all at `duration`
    (or rank_end_spacing apart)."""


@dataclass(frozen=True, slots=True)
class Gap:
    after_submit: float
    """Submit time (trace seconds, before closing) of the last job before the gap."""
    removed_seconds: float


def parse_pools(text: str) -> dict[str, tuple[int, int]]:
    """`NAME=NODESxGPUS,...` -> {name: (nodes, GPUs per node)}."""
    pools: dict[str, tuple[int, int]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, equals, size = item.partition("=")
        nodes, times, gpus = size.lower().partition("x")
        if not equals or not name or not times or not nodes.isdigit() or not gpus.isdigit():
            raise TraceError(f"--pools: {item!r} is not NAME=NODESxGPUS (e.g. a=64x8)")
        if int(nodes) < 1 or int(gpus) < 1:
            raise TraceError(f"--pools: {item!r} needs at least one node and one GPU per node")
        if name in pools:
            raise TraceError(f"--pools: pool {name!r} is given twice")
        pools[name] = (int(nodes), int(gpus))
    if not pools:
        raise TraceError("--pools is empty: give NAME=NODESxGPUS,...")
    return pools


def read_trace(path: str | Path, trace_format: str) -> list[TraceJob]:
    """Reads a trace, sorted by submit time (ties in file order)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise TraceError(f"cannot read trace {path}: {error.strerror or error}") from None
    if trace_format == "philly":
        jobs = _philly(path, text.splitlines())
    elif trace_format == "jsonl":
        jobs = _jsonl(path, text.splitlines())
    else:
        raise TraceError(f"unknown trace format {trace_format!r}: use philly or jsonl")
    if not jobs:
        raise TraceError(f"trace {path} has no jobs")
    return sorted(jobs, key=lambda job: (job.submit_time, job.line))


def _number(path: Path, line: int, field: str, value: object, *, integer: bool = False, minimum: float | None = None) -> float:
    where = f"{path}:{line}: field {field!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TraceError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise TraceError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TraceError(f"{where} must be finite, got {value!r}")
    if integer and number != int(number):
        raise TraceError(f"{where} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise TraceError(f"{where} must be >= {minimum:g}, got {value!r}")
    return number


def _philly(path: Path, lines: list[str]) -> list[TraceJob]:
    rows = csv.reader(lines)
    header = next(rows, None)
    if header is None:
        raise TraceError(f"{path}:1: empty file; a Philly trace starts with the header {','.join(PHILLY_COLUMNS)}")
    missing = [column for column in PHILLY_COLUMNS if column not in header]
    if missing:
        raise TraceError(f"{path}:1: the header lacks column(s) {', '.join(missing)} (has {','.join(header)})")
    at = {column: header.index(column) for column in PHILLY_COLUMNS}
    jobs = []
    origin: datetime.datetime | None = None
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise TraceError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        stamp = row[at["timestamp"]]
        try:
            submitted = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            raise TraceError(f"{path}:{line}: field 'timestamp' must be YYYY-MM-DD HH:MM:SS, got {stamp!r}") from None
        origin = origin or submitted
        duration = _number(path, line, "duration", row[at["duration"]], minimum=0)
        gpus = _number(path, line, "num_gpus", row[at["num_gpus"]], integer=True, minimum=1)
        pool = row[at["cluster"]]
        if not pool:
            raise TraceError(f"{path}:{line}: field 'cluster' is empty")
        jobs.append(
            TraceJob(
                submit_time=(submitted - origin).total_seconds(),
                duration=max(duration, 1.0),  # a 0 s job still holds its GPUs for an instant; count it as a second
                gpus=int(gpus),
                owner=pool,
                name=f"philly-{line}",
                pool=pool,
                line=line,
            )
        )
    if jobs:
        first = min(job.submit_time for job in jobs)
        jobs = [replace(job, submit_time=job.submit_time - first) for job in jobs]
    return jobs


def _jsonl(path: Path, lines: list[str]) -> list[TraceJob]:
    jobs = []
    for line, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise TraceError(f"{path}:{line}: not JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}:{line}: a job is a JSON object, got {type(record).__name__}")
        unknown = sorted(set(record) - JSONL_FIELDS)
        if unknown:
            raise TraceError(f"{path}:{line}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(JSONL_FIELDS))}")
        for required in ("submit_time", "duration", "gpus"):
            if required not in record:
                raise TraceError(f"{path}:{line}: field {required!r} is missing")
        for text_field in ("owner", "name", "pool"):
            if not isinstance(record.get(text_field, ""), str):
                raise TraceError(f"{path}:{line}: field {text_field!r} must be a string, got {record[text_field]!r}")
        gpus = int(_number(path, line, "gpus", record["gpus"], integer=True, minimum=1))
        per_node = int(_number(path, line, "gpus_per_node", record.get("gpus_per_node", 0), integer=True, minimum=0))
        if per_node and gpus % per_node:
            raise TraceError(f"{path}:{line}: field 'gpus_per_node' ({per_node}) does not divide 'gpus' ({gpus})")
        rank_ends = record.get("rank_ends", [])
        if not isinstance(rank_ends, list) or (rank_ends and len(rank_ends) != gpus):
            raise TraceError(f"{path}:{line}: field 'rank_ends' must be a list of one number per GPU ({gpus}), got {rank_ends!r}")
        jobs.append(
            TraceJob(
                submit_time=_number(path, line, "submit_time", record["submit_time"], minimum=0),
                duration=_number(path, line, "duration", record["duration"], minimum=0.001),
                gpus=gpus,
                gpus_per_node=per_node,
                owner=record.get("owner", ""),
                name=record.get("name", "") or f"job-{line}",
                pool=record.get("pool", "") or "default",
                priority=int(_number(path, line, "priority", record.get("priority", 0), integer=True)),
                line=line,
                rank_ends=tuple(_number(path, line, "rank_ends", end, minimum=0.001) for end in rank_ends),
            )
        )
    return jobs


def close_gaps(jobs: list[TraceJob], longest: float = GAP_SECONDS) -> tuple[list[TraceJob], list[Gap]]:
    """Removes every pause between consecutive submits longer than `longest`: the jobs after it are moved
    earlier so that the first of them comes one mean inter-arrival (of the pauses kept) after the last before."""
    if len(jobs) < 2:
        return jobs, []
    pauses = [later.submit_time - earlier.submit_time for earlier, later in itertools.pairwise(jobs)]
    kept = [pause for pause in pauses if pause <= longest]
    mean = sum(kept) / len(kept) if kept else 0.0
    gaps, shift, moved = [], 0.0, [jobs[0]]
    for pause, earlier, job in zip(pauses, jobs, jobs[1:], strict=False):
        if pause > longest:
            gaps.append(Gap(earlier.submit_time, pause - mean))
            shift += pause - mean
        moved.append(replace(job, submit_time=job.submit_time - shift) if shift else job)
    return moved, gaps


def offered_load(jobs: Iterable[TraceJob], pool_gpus: int) -> float:
    """sum(gpus x duration) / (pool GPUs x span of the submits); 0 for a trace without a span."""
    jobs = list(jobs)
    if len(jobs) < 2 or pool_gpus <= 0:
        return 0.0
    span = max(job.submit_time for job in jobs) - min(job.submit_time for job in jobs)
    return sum(job.gpus * job.duration for job in jobs) / (pool_gpus * span) if span > 0 else 0.0


def scale_load(jobs: list[TraceJob], pool_gpus: dict[str, int], load: float) -> list[TraceJob]:
    """Stretches or compresses each pool's inter-arrival times (around its first submit) so that its
    offered load is `load`. Pools with fewer than two jobs, or none of those GPUs, stay as they are."""
    if not load > 0 or not math.isfinite(load):
        raise TraceError(f"--load must be a number > 0, got {load!r}")
    by_pool: dict[str, list[TraceJob]] = {}
    for job in jobs:
        by_pool.setdefault(job.pool, []).append(job)
    factors, origins = {}, {}
    for pool, members in by_pool.items():
        current = offered_load(members, pool_gpus.get(pool, 0))
        if current > 0:
            factors[pool] = current / load
            origins[pool] = min(job.submit_time for job in members)
    scaled = [
        replace(job, submit_time=origins[job.pool] + (job.submit_time - origins[job.pool]) * factors[job.pool])
        if job.pool in factors
        else job
        for job in jobs
    ]
    return sorted(scaled, key=lambda job: (job.submit_time, job.line))
