"""A job's life as pure decisions: (the job's records, an event, now) -> (records changed, effects).

No I/O and no clock of its own: every function takes `now` and changes only the plain data of
coordinator/model/ (the job entry, its attempts, the device allocations); what reaches beyond that —
messages to agents, store writes, watchers, the scheduler — comes back as effects
(coordinator/rules/effects.py) for coordinator/control/ to apply, in order.

The job (JobState, protos/gpuorch/v1/job.proto):

    submit --> PENDING --placed, launched (place)--> RUNNING
               ^   |                                   |
               |   |                                   +--every rank exited 0 (rank_reported)--> SUCCEEDED
               |   |                                   |
               |   |                                   +--a rank failed, its node DOWN, a GPU unhealthy, a hang
               |   |                                   |  (rank_reported, node_lost, device_unhealthy, detect_hangs):
               |   |                                   |  every rank stopped, then
               |   |                                   |     restarts left --> PENDING (restart backoff; the next
               +---|-----------------------------------+        attempt waits for every rank of this one to end)
                   |                                   |     none left, a start failure a restart would repeat, or a rank
                   |                                   |     stopped at the job's time limit --> FAILED
                   |                                   |
                   |                                   +--preempted for higher-ranked work (preempt): SIGTERM, the
                   |                                   |  preemption grace, SIGKILL; PENDING at once (no restart used,
                   |                                   |  no backoff; the next attempt waits for every rank to end)
                   |                                   |
                   +--cancel-------------------------> CANCELLED <--cancel (ranks stopped)--+

    SUCCEEDED, FAILED and CANCELLED are final.

An attempt (AttemptState, coordinator/model/jobs.py):

    place --> LAUNCHING --every rank started--> RUNNING
    LAUNCHING/RUNNING --failed, cancelled, or the job ended--> STOPPING
    any --every rank ended or given up with its DOWN node--> forgotten (agents told: AttemptOver)

A rank reported running that belongs to no attempt the coordinator runs (an old attempt, a
forgotten job) is fenced: stopped, its GPU held until its end is confirmed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.model.cluster import Allocations
from coordinator.model.jobs import Attempt, AttemptState, JobEntry, RankOutcome
from coordinator.rules import job_rules, preemption, recovery
from coordinator.rules.effects import (
    AllStarted,
    AttemptFailed,
    AttemptOver,
    Effect,
    Fence,
    Finished,
    Launch,
    Notify,
    Preempted,
    QueueChanged,
    Release,
    Save,
    Stop,
    Wake,
)
from coordinator.rules.job_reasons import restart_text
from coordinator.rules.recovery import FailureCode
from gpuorch.v1 import agent_pb2, job_pb2


class Now(NamedTuple):
    """The time of an event: wall (stored, shown, backoffs and hangs) and monotonic (durations). A named tuple,
    not a frozen dataclass: one is made for every rank's report, and a frozen dataclass's __init__ costs 3 times as much."""

    wall: float
    monotonic: float


@dataclass(frozen=True, slots=True)
class MachineConfig:
    recovery_policy: recovery.RecoveryPolicy = field(default_factory=recovery.RecoveryPolicy)
    stop_grace_seconds: float = 10.0
    checkpoint_root: str = ""
    """Each job's GPUORCH_CHECKPOINT_DIR is <checkpoint_root>/<job id>; empty: none."""
    preemption_grace_seconds: float = 30.0
    """SIGTERM to SIGKILL for a preempted attempt's ranks: their time to checkpoint."""
    launch_timeout_seconds: float = 0.0
    """An attempt with a rank not started this long after its launch fails (rules/launch_timeout.py); 0: never."""


def stamp(wall: float) -> Timestamp:
    return Timestamp(seconds=(nanoseconds := int(wall * 1e9)) // 1_000_000_000, nanos=nanoseconds % 1_000_000_000)


# -- placement -------------------------------------------------------------------------------------


def attempt_environment(job: job_pb2.Job, checkpoint_root: str) -> dict[str, str]:
    """What the coordinator adds to the current attempt's environment."""
    env = {"GPUORCH_RESTART_REASON": job.attempts[-1].restart_reason if job.attempts else ""}
    if checkpoint_root:
        env["GPUORCH_CHECKPOINT_DIR"] = str(Path(checkpoint_root) / job.job_id)
    return env


def place(
    entry: JobEntry,
    placement: job_pb2.Placement,
    now: Now,
    allocations: Allocations,
    node_sessions: dict[str, int],
    config: MachineConfig,
) -> list[Effect]:
    """PENDING -> RUNNING: a new attempt on `placement`, its devices taken. The caller makes the write
    durable, then sends `launches`."""
    job = entry.job
    job.attempt += 1
    job.placement.CopyFrom(placement)
    job.state = job_pb2.JOB_STATE_RUNNING
    size = "" if placement.world_size == job.spec.gpus else f" on {placement.world_size} of {job.spec.gpus} GPUs (elastic)"
    job.reason = f"attempt {job.attempt} running{size} on {len(placement.nodes)} node(s)"
    job.start_time.CopyFrom(stamp(now.wall))
    job.ClearField("restart_not_before")
    record = job.attempts.add(attempt=job.attempt, start_time=job.start_time, restart_reason=job.pending_restart_reason)
    record.placement.CopyFrom(placement)
    job.pending_restart_reason = ""
    attempt = _take(entry, record, now, allocations, node_sessions, restoring=False)
    attempt.started_wall = now.wall
    return [QueueChanged(job.job_id), Save(job.job_id)]


def launches(
    entry: JobEntry,
    config: MachineConfig,
    allocations: Allocations,
    rank_capacities: Sequence[float] = (),
    results_json: str = "",
) -> list[Effect]:
    """The launches of the job's current attempt (with its ranks' capacities, a dependent's `results_json`), one per
    node, then its watchers told: sent once the placement is durable, only while the job still runs. A job cancelled or
    restarting meanwhile (a GPU unhealthy, a hang) had nothing launched: no agent will report those ranks; they end here."""
    job = entry.job
    if job.state != job_pb2.JOB_STATE_RUNNING:
        return never_launched(entry, allocations)
    environment = attempt_environment(job, config.checkpoint_root)
    messages = job_rules.launch_envelopes(job, environment, config.stop_grace_seconds, rank_capacities, results_json)
    return [*(Launch(node_id, message) for node_id, message in messages.items()), Notify(job.job_id)]


def never_launched(entry: JobEntry, allocations: Allocations) -> list[Effect]:
    """The job's placed attempt ended before its launch was sent: each rank ends, its GPU given back."""
    attempt = entry.attempts.get(entry.job.attempt)
    if attempt is None:
        return []
    effects: list[Effect] = []
    outcome = RankOutcome(True, "never launched: its attempt ended before the launch was sent")
    for rank in range(attempt.world_size):
        if rank not in attempt.ended:
            effects += rank_ended(entry, attempt, rank, outcome, allocations)
    return effects


def restore(entry: JobEntry, record: job_pb2.Attempt, now: Now, allocations: Allocations) -> Attempt:
    """After a coordinator restart: the stored attempt may still have ranks; its devices stay taken
    until the agents say otherwise (a later stored attempt on the same devices owns them)."""
    attempt = _take(entry, record, now, allocations, {}, restoring=True)
    if entry.job.state == job_pb2.JOB_STATE_RUNNING and record.attempt == entry.job.attempt:
        attempt.started_wall = attempt.last_progress_wall = now.wall
    else:
        attempt.state = AttemptState.STOPPING  # its job restarts or ended: what ranks are left were being stopped
    return attempt


def _take(
    entry: JobEntry, record: job_pb2.Attempt, now: Now, allocations: Allocations, node_sessions: dict[str, int], restoring: bool
) -> Attempt:
    attempt = Attempt(record.attempt, record.placement, launched_at=now.monotonic)
    # From the attempt's own index of the placement, not the message again: its fields are slow to walk.
    for node_id in attempt.nodes():
        attempt.node_sessions.setdefault(node_id, node_sessions.get(node_id, 0))
    allocations.take_all(attempt.devices(), (entry.job.job_id, record.attempt), restoring)
    entry.attempts[record.attempt] = attempt
    return attempt


# -- what agents report ----------------------------------------------------------------------------


def rank_reported(
    entry: JobEntry | None, node_id: str, status: agent_pb2.TaskStatus, now: Now, allocations: Allocations, config: MachineConfig
) -> list[Effect]:
    """A rank's state as its agent reports it (a TaskStatus, or one listed in a registration)."""
    number, rank = status.attempt, status.rank  # message fields: read once
    attempt = entry.attempts.get(number) if entry is not None else None
    running = status.state == agent_pb2.TASK_STATE_RUNNING
    if entry is None or attempt is None or attempt.node_of(rank) != node_id:
        if running:
            return [_fence(entry, node_id, status, "fenced: attempt not run by the coordinator")]
        return []
    live = entry.job.state == job_pb2.JOB_STATE_RUNNING and number == entry.job.attempt
    if running:
        if not live:
            if preemption.being_preempted(entry, status.attempt):  # in its grace: not killed at once
                grace = config.preemption_grace_seconds
                return preemption.stop_again(entry, attempt, node_id, rank, now.wall, now.monotonic, grace)
            return [_fence(entry, node_id, status, "fenced: attempt superseded")]
        if status.starting:  # its agent is still starting it (listed in a Register): known, not started (launch timeout)
            return []
        if (working_dir := status.working_dir) and (record := entry.record(number)) is not None:
            record.working_dirs[node_id] = working_dir
        if rank in attempt.running or rank in attempt.ended:  # said again, or a stale report of a rank that ended
            return []
        attempt.running.add(rank)
        attempt.started_ranks += 1
        if attempt.started_ranks == attempt.world_size and not attempt.all_started_at:
            attempt.all_started_at = now.monotonic
            if attempt.state is AttemptState.LAUNCHING:
                attempt.state = AttemptState.RUNNING
            return [AllStarted(entry.job.job_id, attempt.all_started_at - attempt.launched_at)]
        return []
    if rank in attempt.ended:
        return []
    outcome = job_rules.rank_outcome(status, node_id)
    effects = rank_ended(entry, attempt, rank, outcome, allocations)
    if not live:
        return effects
    if outcome.failed:
        return effects + attempt_failed(entry, recovery.failure_code(status), outcome.description, now, config)
    if not entry.attempts.get(number):  # every rank ended, each with code 0
        reason = f"all {attempt.world_size} ranks exited with code 0"
        _end_record(entry, reason, now)
        return effects + finish(entry, job_pb2.JOB_STATE_SUCCEEDED, reason, now)
    return effects


def _fence(entry: JobEntry | None, node_id: str, status: agent_pb2.TaskStatus, reason: str) -> Fence:
    record = entry.record(status.attempt) if entry is not None else None
    device = None
    if record is not None:
        for node in record.placement.nodes:
            if node.node_id == node_id and node.first_rank <= status.rank < node.first_rank + len(node.device_uuids):
                device = node.device_uuids[status.rank - node.first_rank]
    return Fence(node_id, status.job_id, status.attempt, status.rank, device, reason)


def rank_ended(entry: JobEntry, attempt: Attempt, rank: int, outcome: RankOutcome, allocations: Allocations) -> list[Effect]:
    """One rank is gone: its device is given back; the attempt is forgotten once every rank is."""
    attempt.ended[rank] = outcome
    attempt.running.discard(rank)
    effects: list[Effect] = []
    where = attempt.where(rank)
    released = where is not None and allocations.release(where[1], (entry.job.job_id, attempt.attempt), where[0])
    if released:
        effects.append(Wake())
    if attempt.ranks_left == 0:
        # Every rank is accounted for: agents may forget this attempt, and so may we.
        nodes = attempt.nodes()
        effects += [AttemptOver(node, entry.job.job_id, attempt.attempt) for node in dict.fromkeys(nodes)]
        del entry.attempts[attempt.attempt]
        if not released:
            effects.append(Wake())  # a restart waiting for this attempt's end may go now
        if nodes:
            effects.append(Release(nodes[0], attempt.placement.master_port))
    return effects


# -- failures --------------------------------------------------------------------------------------


def attempt_failed(entry: JobEntry, code: FailureCode, description: str, now: Now, config: MachineConfig) -> list[Effect]:
    """RUNNING -> PENDING (a restart, after its backoff) or FAILED: the current attempt cannot go on."""
    job = entry.job
    if job.state != job_pb2.JOB_STATE_RUNNING:
        return []
    effects = stop_attempt(entry, job.attempt, description, config)
    _end_record(entry, description, now)
    history = [record.end_reason for record in job.attempts]
    decision = recovery.decide(job.spec.max_restarts, job.restarts, history, config.recovery_policy, code)
    failed = AttemptFailed(job.job_id, job.attempt, code.kind, str(code), description, isinstance(decision, recovery.Restart))
    effects.append(failed)
    if isinstance(decision, recovery.GiveUp):
        return effects + finish(entry, job_pb2.JOB_STATE_FAILED, decision.reason, now)
    job.restarts = decision.restart_number
    job.state = job_pb2.JOB_STATE_PENDING
    job.pending_restart_reason = str(code)
    job.reason = restart_text(job)
    if decision.delay_seconds:
        job.restart_not_before.CopyFrom(stamp(now.wall + decision.delay_seconds))
    return [*effects, QueueChanged(job.job_id), Notify(job.job_id), Save(job.job_id), Wake()]


def stop_attempt(entry: JobEntry, number: int, reason: str, config: MachineConfig, grace: float | None = None) -> list[Effect]:
    attempt = entry.attempts.get(number)
    if attempt is None:
        return []
    attempt.state = AttemptState.STOPPING
    grace = config.stop_grace_seconds if grace is None else grace
    return [Stop(node, entry.job.job_id, number, grace, reason) for node in dict.fromkeys(attempt.nodes())]


def preempt(entry: JobEntry, for_job_id: str, reason: str, now: Now, config: MachineConfig) -> list[Effect]:
    """RUNNING -> PENDING: the current attempt makes room for `for_job_id`. Its ranks get SIGTERM and the
    preemption grace to checkpoint, then SIGKILL; their GPUs stay held until each end is confirmed (the next
    attempt waits for them: waiting_for_previous). Not a failure: no restart used, no backoff, and the next
    attempt starts with GPUORCH_RESTART_REASON=preempted. A job not running, or not preemptible, is left alone."""
    job = entry.job
    attempt = entry.current
    if job.state != job_pb2.JOB_STATE_RUNNING or attempt is None or job.spec.non_preemptible:
        return []
    if not reason.startswith(preemption.PREEMPTED):
        reason = f"{preemption.PREEMPTED}: {reason}"
    if for_job_id not in reason:
        reason += f" (for {for_job_id})"
    effects = stop_attempt(entry, job.attempt, reason, config, config.preemption_grace_seconds)
    attempt.stops_sent = dict.fromkeys(attempt.nodes(), now.monotonic)
    attempt.stop_covers = {node: {rank for rank in attempt.ranks_on(node) if rank in attempt.running} for node in attempt.nodes()}
    _end_record(entry, reason, now)
    job.state = job_pb2.JOB_STATE_PENDING
    job.pending_restart_reason = preemption.PREEMPTED
    job.reason = restart_text(job)
    job.ClearField("restart_not_before")
    effects.append(Preempted(job.job_id, job.attempt, for_job_id, reason))
    return [*effects, QueueChanged(job.job_id), Notify(job.job_id), Save(job.job_id), Wake()]


def _end_record(entry: JobEntry, end_reason: str, now: Now) -> None:
    if entry.job.attempts and not entry.job.attempts[-1].end_reason:
        entry.job.attempts[-1].end_time.CopyFrom(stamp(now.wall))
        entry.job.attempts[-1].end_reason = end_reason


def finish(entry: JobEntry, state: job_pb2.JobState, reason: str, now: Now) -> list[Effect]:
    """Makes the job final. Its write comes before anything placed onto the GPUs it gave back."""
    if entry.final:
        return []
    job = entry.job
    job.state = state
    job.reason = reason
    job.end_time.CopyFrom(stamp(now.wall))
    job.ClearField("restart_not_before")
    job.pending_restart_reason = ""
    for attempt in entry.attempts.values():
        attempt.state = AttemptState.STOPPING
    return [QueueChanged(job.job_id), Finished(job.job_id, state, reason), Wake(), Notify(job.job_id), Save(job.job_id)]


def cancel(entry: JobEntry, now: Now, config: MachineConfig, reason: str = "cancelled by user") -> list[Effect]:
    """PENDING or RUNNING -> CANCELLED (the caller refuses a final job)."""
    effects: list[Effect] = []
    if entry.job.state == job_pb2.JOB_STATE_RUNNING:
        effects += stop_attempt(entry, entry.job.attempt, "cancelled", config)
        _end_record(entry, reason, now)
    return effects + finish(entry, job_pb2.JOB_STATE_CANCELLED, reason, now)


def node_lost(
    entries: Iterable[JobEntry], node_id: str, reason: str, now: Now, allocations: Allocations, config: MachineConfig
) -> list[Effect]:
    """Ranks on a lost node are gone: their devices are free and their attempts fail."""
    effects: list[Effect] = []
    for entry in list(entries):
        for attempt in list(entry.attempts.values()):
            lost = [rank for rank in attempt.ranks_on(node_id) if rank not in attempt.ended]
            if not lost:
                continue
            current = entry.job.state == job_pb2.JOB_STATE_RUNNING and attempt.attempt == entry.job.attempt
            for rank in lost:
                effects += rank_ended(entry, attempt, rank, RankOutcome(True, f"rank {rank}: {reason}"), allocations)
            if current:
                effects += attempt_failed(entry, FailureCode("node_down", (node_id,)), reason, now, config)
    return effects


def device_unhealthy(entry: JobEntry, node_id: str, uuid: str, why: str, now: Now, config: MachineConfig) -> list[Effect]:
    """A GPU of the job's current attempt turned unhealthy."""
    description = f"GPU {uuid} on node {node_id} turned unhealthy: {why}"
    return attempt_failed(entry, FailureCode("gpu_unhealthy", (uuid,)), description, now, config)


def hung(entries: Iterable[JobEntry], now: Now) -> list[JobEntry]:
    """The running jobs whose current attempt has had no rank report progress within the job's progress timeout."""
    found = []
    for entry in entries:
        timeout, attempt = entry.job.spec.progress_timeout_seconds, entry.current
        if not timeout or attempt is None or entry.job.state != job_pb2.JOB_STATE_RUNNING:
            continue
        if recovery.hung(timeout, attempt.started_wall, attempt.last_progress_wall, now.wall):
            found.append(entry)
    return found


def detect_hangs(entries: Iterable[JobEntry], now: Now, config: MachineConfig) -> list[Effect]:
    """Attempts no rank of which reported progress within the job's progress timeout fail as hung."""
    effects: list[Effect] = []
    for entry in hung(list(entries), now):
        timeout = entry.job.spec.progress_timeout_seconds
        effects += attempt_failed(entry, FailureCode("hang"), f"no rank reported progress for {timeout}s (hang)", now, config)
    return effects
