"""A pending job's reason, rendered from its fields: why it restarts (if it does), then why it waits now."""

from __future__ import annotations

from coordinator.model.jobs import JobEntry
from coordinator.rules import preemption
from gpuorch.v1 import job_pb2


def restart_text(job: job_pb2.Job) -> str:
    """What a restarting job's reason starts with; empty for a job that is not restarting."""
    if not job.pending_restart_reason:
        return ""
    if job.pending_restart_reason == preemption.PREEMPTED:
        return f"requeued after preemption (uses no restart: {job.restarts} of {job.spec.max_restarts} used)"
    return f"restart {job.restarts} of {job.spec.max_restarts} after {job.pending_restart_reason}"


def pending_reason(job: job_pb2.Job, detail: str) -> str:
    """A pending job's reason: why it restarts (if it does), then why it waits now."""
    head = restart_text(job)
    return f"{head}; {detail}" if head else detail


def waiting_for_previous(entry: JobEntry) -> str | None:
    """Why a restart must wait (ranks of an earlier attempt have not ended), or None if it may start:
    two attempts of one job never run at once, nor share a checkpoint directory."""
    if not entry.attempts:
        return None
    left = sum(attempt.ranks_left for attempt in entry.attempts.values())
    return f"waiting for {left} rank(s) of attempt {max(entry.attempts)} to end"
