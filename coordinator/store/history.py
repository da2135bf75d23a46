"""What every store computes from a job for history reads: its submit and end times, and whether a
`JobQuery` matches it. One definition, so that every backend selects the same jobs."""

from __future__ import annotations

from coordinator.store.api import JobQuery
from gpuorch.clock import stamp_seconds
from gpuorch.v1 import job_pb2

FINAL_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})
"""A job in one of these never changes again: it is history once it leaves the coordinator's memory."""
NOT_FINAL_STATES = tuple(sorted(set(job_pb2.JobState.values()) - FINAL_STATES))


def submitted_at(job: job_pb2.Job) -> float:
    """Wall seconds of the submission (0 if unknown)."""
    return stamp_seconds(job.submit_time) if job.HasField("submit_time") else 0.0


def ended_at(job: job_pb2.Job) -> float:
    """Wall seconds the job ended, 0 while it is not final. A final job without an end time (none is
    written so; a hand-made record) counts as ended when it was submitted, or at the epoch's first second."""
    if job.state not in FINAL_STATES:
        return 0.0
    if job.HasField("end_time"):
        return max(stamp_seconds(job.end_time), 1e-9)
    return submitted_at(job) or 1.0


def matches(query: JobQuery, owner: str, state: int, submitted: float, ended: float) -> bool:
    """Whether a job with these columns is one `query` wants (below_sequence and limit aside)."""
    if query.owner and owner != query.owner:
        return False
    if query.states and state not in query.states:
        return False
    if query.active_until and submitted > query.active_until:
        return False
    return not (query.active_since and 0 < ended < query.active_since)


def validate(query: JobQuery) -> None:
    """Raises ValueError naming what is wrong with a query."""
    if query.limit < 1:
        raise ValueError(f"limit must be at least 1, not {query.limit}")
    if query.active_since and query.active_until and query.active_until < query.active_since:
        raise ValueError("active_until is before active_since")
