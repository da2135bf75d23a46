"""When an interactive job ends for want of a client: nobody attached for longer than its grace.

An interactive job (JobSpec.interactive) is meant to be used from a terminal; one whose user has
gone (closed the laptop, lost the network) must not hold its GPUs forever. The clock of a job
starts when it is first seen RUNNING with no client attached, stops while one is, and starts
again when the last one leaves; past the grace the job is cancelled. A coordinator restart
starts every clock afresh (no client can be attached to a coordinator that just started).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

DEFAULT_ATTACH_GRACE_SECONDS = 60.0


def attach_grace(spec_seconds: int, default_seconds: float) -> float:
    """The job's own grace (JobSpec.attach_grace_seconds), else the coordinator's."""
    return float(spec_seconds) if spec_seconds > 0 else default_seconds


def sweep(
    running: Mapping[str, float], attached: Collection[str], unattached_since: Mapping[str, float], now: float
) -> tuple[dict[str, float], list[str]]:
    """One look at the running interactive jobs (job id -> its grace in seconds) and those with a client
    attached: returns when each unattached job's clock started, and the jobs whose grace is over."""
    since: dict[str, float] = {}
    expired: list[str] = []
    for job_id, grace in running.items():
        if job_id in attached:
            continue
        started = unattached_since.get(job_id, now)
        if now - started > grace:
            expired.append(job_id)
        else:
            since[job_id] = started
    return since, expired


def expiry_reason(grace: float) -> str:
    return f"interactive job: no client attached for {grace:g}s (reconnect within the grace with `gpuctl attach`)"
