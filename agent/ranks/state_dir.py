"""The agent's state dir: what a restarted agent needs to find its ranks again.

jobs/<job_id>/job.json                  highest attempt seen, and the ranks launched for it
jobs/<job_id>/work/                     default working directory
jobs/<job_id>/attempt-<n>/rank-<r>.log  stdout + stderr of the rank (rotated to rank-<r>.log.1 past max_log_bytes)
jobs/<job_id>/attempt-<n>/rank-<r>.pid  rank pid, written by the shim
jobs/<job_id>/attempt-<n>/rank-<r>.exit exit status, written by the shim
jobs/<job_id>/attempt-<n>/rank-<r>.progress  touched by the rank (gpuorch.worker.report_progress)
ranks/<job_id>@<n>@<r>.json             record of a rank not yet forgotten (what recover() reads)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpuorch.logs import get_logger

log = get_logger("agent.state_dir")


def invalid_job_id(job_id: str) -> str:
    """Why a job id cannot name a directory under the state dir; empty if it can."""
    if not job_id:
        return "empty job id"
    if job_id in (".", "..") or "/" in job_id or "\0" in job_id or len(job_id) > 200:
        return f"job id {job_id!r} cannot be used as a directory name"
    return ""


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_exit_file(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@dataclass
class RankRecord:
    """What the state dir keeps about one rank, enough for a later agent to find it again."""

    job_id: str
    attempt: int
    rank: int
    local_rank: int
    shim_pid: int
    shim_start_time: int | None
    rank_pid: int
    rank_start_time: int | None
    log_path: str
    pid_path: str
    exit_path: str
    cgroup: str = ""
    """The rank's cgroup directory; empty = none (no cgroups on this node, or a record of an older agent)."""
    pids_max: int = 0
    memory_max_bytes: int = 0
    """The limits of its cgroup, re-applied by a restarted agent (see cgroups.RankCgroups.release_controllers)."""
    working_dir: str = ""
    """The directory the rank runs in, as the shim reported it."""
    time_limit_seconds: float = 0.0
    stop_grace_seconds: float = 0.0
    """The job's time limit (0 = none) and the grace between SIGTERM and SIGKILL at it (LaunchTask)."""
    deadline_wall: float = 0.0
    """Wall time the rank must have ended by: its start plus the time limit; 0 = none. Recorded so that a
    restarted agent still enforces it on the ranks it re-attaches to."""
    time_limited: bool = False
    """The agent stopped the rank at its time limit (reported with its end, also by a restarted agent)."""

    def read_pid_file(self) -> int:
        try:
            return int(Path(self.pid_path).read_text())
        except (OSError, ValueError):
            return 0


@dataclass
class JobRecord:
    """jobs/<job_id>/job.json: recorded before anything starts, so a rank starts at most once, even
    across an agent crash, and an older attempt is refused."""

    highest_attempt: int = 0
    launched_ranks: list[int] = field(default_factory=list)


class StateDir:
    """Paths and records under the agent's state dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "ranks"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, JobRecord] = {}

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def default_working_dir(self, job_id: str) -> str:
        return str(self.job_dir(job_id) / "work")

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"attempt-{attempt}"

    def rank_base(self, job_id: str, attempt: int, rank: int) -> Path:
        """The rank's files, without their suffix (.log, .pid, .exit, .progress)."""
        return self.attempt_dir(job_id, attempt) / f"rank-{rank}"

    def record_path(self, job_id: str, attempt: int, rank: int) -> Path:
        return self.records_dir / f"{job_id}@{attempt}@{rank}.json"

    # ---- jobs ----------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            try:
                stored = json.loads((self.job_dir(job_id) / "job.json").read_text())
                job = JobRecord(int(stored["highest_attempt"]), [int(rank) for rank in stored["launched_ranks"]])
            except (OSError, ValueError, KeyError, TypeError):
                job = JobRecord()
            self._jobs[job_id] = job
        return job

    def save_job(self, job_id: str) -> None:
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(job_dir / "job.json", json.dumps(asdict(self.job(job_id))))

    # ---- rank records --------------------------------------------------------------------------

    def save_record(self, record: RankRecord, path: Path) -> None:
        try:
            write_atomically(path, json.dumps(asdict(record)))
        except OSError as error:
            # The rank runs regardless; only an agent restart would lose track of it.
            log.error("cannot save the rank record", path=str(path), error=str(error))

    def load_records(self) -> Iterator[tuple[RankRecord, Path]]:
        """Every readable rank record (an unreadable one is logged and skipped)."""
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                record = RankRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as error:
                log.warning("ignoring unreadable rank record", path=str(path), error=str(error))
                continue
            yield record, path

    @staticmethod
    def remove_record(path: Path) -> None:
        if path != Path():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
