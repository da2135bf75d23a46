"""What a preemption means after its stop was sent: pure decisions over a job's records.

A preempted attempt's ranks get SIGTERM and the preemption grace to checkpoint, then SIGKILL
(coordinator/rules/job_machine.preempt sends that stop). The preemption is durable: the job is stored
PENDING with the restart reason "preempted" and the attempt's end time, the moment it was preempted.
A rank of that attempt reported running again (its agent re-registered, or this coordinator restarted
during the grace) is not fenced at once like other superseded ranks, which would kill it mid-checkpoint:
its node is sent the stop again with what is left of the grace, measured from that stored end time.
"""

from __future__ import annotations

from coordinator.model.jobs import Attempt, JobEntry
from coordinator.rules.effects import Effect, Stop
from gpuorch.v1 import job_pb2

PREEMPTED = "preempted"
"""The restart reason (GPUORCH_RESTART_REASON) of the attempt after a preempted one."""
MIN_STOP_GRACE_SECONDS = 0.1
"""The least grace a repeated stop carries: a zero grace means "stop, then forget" to agents (router.py)."""
REPEAT_STOP_AFTER_SECONDS = 1.0
"""A node is sent the stop again only this long after the last one: a registration lists every rank of
the attempt on the node, and one stop covers them all."""


def being_preempted(entry: JobEntry, attempt: int) -> bool:
    """Whether `attempt` is the job's last one and was preempted: the job waits for its ranks to end."""
    job = entry.job
    return job.state == job_pb2.JOB_STATE_PENDING and job.pending_restart_reason == PREEMPTED and attempt == job.attempt


def grace_left(entry: JobEntry, attempt: int, now_wall: float, grace_seconds: float) -> float:
    """Seconds of the preemption grace left to the attempt's ranks (from the stored moment it was preempted)."""
    record = entry.record(attempt)
    if record is None or not record.HasField("end_time"):
        return grace_seconds
    return max(MIN_STOP_GRACE_SECONDS, record.end_time.ToNanoseconds() / 1e9 + grace_seconds - now_wall)


def stop_again(
    entry: JobEntry, attempt: Attempt, node_id: str, rank: int, now_wall: float, now_monotonic: float, grace: float
) -> list[Effect]:
    """A rank of a preempted attempt is reported running on `node_id`: its node is sent the stop again, with
    the grace left, unless a stop sent there covers the rank and was sent just now (a registration lists every
    rank of the node, and one stop covers them all). A stop covers the ranks its agent already had: those
    reported running before it was sent, and, for the first stop a coordinator sends a node (after its own
    restart), every rank the agent lists. A rank that was still launching when its attempt was preempted is not
    covered: its agent may have taken the stop before the launch, so it is sent one of its own."""
    sent = attempt.stops_sent.get(node_id)
    covered = attempt.stop_covers.get(node_id)
    if covered is not None and rank in covered and sent is not None and now_monotonic - sent < REPEAT_STOP_AFTER_SECONDS:
        return []
    if sent is None:
        attempt.stop_covers[node_id] = set(attempt.ranks_on(node_id))
    else:
        attempt.stop_covers.setdefault(node_id, set()).add(rank)
    attempt.stops_sent[node_id] = now_monotonic
    left = grace_left(entry, attempt.attempt, now_wall, grace)
    return [Stop(node_id, entry.job.job_id, attempt.attempt, left, f"{PREEMPTED}; {left:.1f}s of the grace left")]
