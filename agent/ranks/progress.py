"""Ranks' progress reports for the heartbeats: each rank's GPUORCH_PROGRESS_FILE, which gpuorch.worker's
report_progress() rewrites at most once a second with a small JSON document

    {"step": 120, "samples": 3840, "step_seconds": 0.41, "scalars": {"loss": 0.12}}

and whose mtime is the rank's progress stamp (hang detection). A file is read again only when its mtime
changed; one the rank left half-written, or filled with anything else, keeps the values read before: a
rank's own file can never make the agent fail or send more than a report's worth.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from agent.ranks.rank import RankKey
from gpuorch.v1 import agent_pb2

MAX_PROGRESS_BYTES = 4096
"""What is read of a progress file: gpuorch.worker writes a few hundred bytes."""
MAX_SCALARS = 16
MAX_SCALAR_NAME = 64


def parse_progress(text: str) -> dict | None:
    """The fields of one report (step, samples, step_seconds, scalars), None when it is not a valid one."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    step, samples, seconds = document.get("step", 0), document.get("samples", 0), document.get("step_seconds", 0.0)
    scalars = document.get("scalars", {})
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in (step, samples)):
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        return None
    if not isinstance(scalars, dict) or len(scalars) > MAX_SCALARS:
        return None
    kept = {}
    for name, value in scalars.items():
        if len(name) > MAX_SCALAR_NAME or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if math.isfinite(value):
            kept[name] = float(value)
    return {"step": step, "samples": samples, "step_seconds": float(seconds), "scalars": kept}


class ProgressReader:
    """Each running rank's latest report, re-read only when its file changed."""

    def __init__(self) -> None:
        self._known: dict[RankKey, tuple[int, dict]] = {}
        """Rank -> (mtime_ns of its file when read, the fields read then)."""

    def reports(self, ranks: Iterable[tuple[RankKey, Path]]) -> list[agent_pb2.RankProgress]:
        """A report for each of these (running) ranks that ever reported; ranks not given are forgotten."""
        known, kept, reports = self._known, {}, []
        for key, path in ranks:
            try:
                mtime_ns = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if not mtime_ns:  # created at launch dated 0: no report yet
                continue
            before = known.get(key)
            fields = before[1] if before is not None else {}
            if before is None or before[0] != mtime_ns:
                fields = self._read(path) or fields
            kept[key] = (mtime_ns, fields)
            job_id, attempt, rank = key
            report = agent_pb2.RankProgress(job_id=job_id, attempt=attempt, rank=rank)
            report.last_progress_time.FromNanoseconds(mtime_ns)
            if fields:
                report.step, report.samples, report.step_seconds = fields["step"], fields["samples"], fields["step_seconds"]
                if rank == 0 and fields["scalars"]:
                    report.scalars.update(fields["scalars"])
            reports.append(report)
        self._known = kept
        return reports

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_PROGRESS_BYTES + 1)
        except OSError:
            return None
        if not data or len(data) > MAX_PROGRESS_BYTES:
            return None
        return parse_progress(data.decode("utf-8", "replace"))
