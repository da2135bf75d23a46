"""Reconciliation: what the store and a (re-)registered agent say against what the coordinator expects.

A rank the coordinator runs is adopted; one it does not run is fenced (stopped, and the GPUs it may
be on held until its end is confirmed); one the coordinator expected on the node but the agent no
longer lists is gone. Runs in the step that registered the node, before anything can be placed there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.control.node_links import stop_message
from coordinator.model.jobs import Attempt, AttemptState, JobEntry, RankKey
from coordinator.rules import job_machine
from coordinator.rules.effects import Fence, Launch
from coordinator.store.api import StoredState
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = get_logger("coordinator.jobs")

LOST_ON_REGISTRATION = "its agent re-registered without it; its process is gone"
LAUNCH_LOST = "its agent re-registered knowing nothing of the attempt: the launch never reached it"


def restore(manager: JobManager, state: StoredState) -> None:
    """After a coordinator restart: every stored job indexed, and the attempts that may still have ranks
    restored with their GPUs held, until their agents re-register with what they run (or stay away
    past the grace)."""
    now = manager.now()
    running, restarting = [], []
    highest = 0
    for stored in state.jobs:
        entry = JobEntry(stored.sequence, stored.job, stored.client_request_id)
        highest = max(highest, stored.sequence)
        manager.restored(entry, highest)
        if stored.job.state == job_pb2.JOB_STATE_PENDING and stored.job.attempts:
            restarting.append(entry)
        if stored.job.state == job_pb2.JOB_STATE_RUNNING:
            running.append(entry)
    # Single rank ends are not stored, so two stored attempts may name one GPU: the later one got it
    # after the earlier one's rank there ended, so the later one owns it. A restarting job's last attempt
    # may still have ranks in their stop grace: its restart waits until the agents report them ended, or
    # their nodes stay away past the grace. Restored first, so that a running attempt on the same GPUs
    # (placed after those ranks ended) owns them.
    manager.scheduling.estimates.learn_history(manager.jobs.values())  # the predictor learns the finished jobs' runtimes
    running.sort(key=lambda entry: entry.job.start_time.ToNanoseconds())
    for entry in restarting + running:
        record = entry.job.attempts[-1]
        job_machine.restore(entry, record, now, manager.cluster.allocations)
        manager.scheduling.running.track(entry)
        if record.placement.nodes:
            manager.scheduling.ports.note(record.placement.nodes[0].node_id, record.placement.master_port)
        for node in record.placement.nodes:
            manager.expected_nodes.setdefault(node.node_id, now.wall + manager.node_grace_period)


def reconcile(manager: JobManager, node_id: str, register: agent_pb2.Register) -> None:
    """Judges only ranks placed before this registration began (on an older stream of the node):
    a rank placed since is one the agent could not list in its Register."""
    manager.expected_nodes.pop(node_id, None)
    allocations = manager.cluster.allocations
    node = manager.cluster.nodes.get(node_id)
    registration = node.session.session_id if node is not None and node.session is not None else 0
    reported: set[RankKey] = set()
    for status in register.tasks:
        reported.add((status.job_id, status.attempt, status.rank))
        manager.on_task_status(node_id, status)
    for key in allocations.fenced_on(node_id):
        if key not in reported and allocations.fence_confirmed(node_id, key):  # the agent no longer runs it
            manager.scheduling.wake.set()
    for entry in list(manager.jobs.values()):
        for attempt in list(entry.attempts.values()):
            # Every registration walks every job: the test of the node comes first (a cluster's jobs are mostly elsewhere).
            if not attempt.places_on(node_id) or attempt.node_sessions.get(node_id, 0) >= registration > 0:
                continue
            unlisted = [rank for rank in attempt.ranks_on(node_id) if (entry.job.job_id, attempt.attempt, rank) not in reported]
            if (
                unlisted
                and not any(key[:2] == (entry.job.job_id, attempt.attempt) for key in reported)
                and launch_again(manager, entry, attempt, node_id)
            ):
                continue
            for rank in attempt.ranks_on(node_id):
                if rank not in attempt.ended and (entry.job.job_id, attempt.attempt, rank) not in reported:
                    lost = agent_pb2.TaskStatus(
                        job_id=entry.job.job_id,
                        attempt=attempt.attempt,
                        rank=rank,
                        state=agent_pb2.TASK_STATE_EXITED,
                        signal=9,
                        message=LOST_ON_REGISTRATION,
                    )
                    manager.on_task_status(node_id, lost)
    manager.scheduling.wake.set()


def launch_again(manager: JobManager, entry: JobEntry, attempt: Attempt, node_id: str) -> bool:
    """The agent lists none of the running attempt's ranks on this node: its launch was lost (on a stream that
    broke, or with a coordinator killed between the placement's write and the launch). That attempt never ran
    there, so it has not failed: the launch goes again. The agent starts a rank at most once per attempt; one it
    launched before and has since forgotten it reports as gone, and the attempt fails then. False (judge the ranks
    gone) for an attempt that no longer runs, or one of which a rank here was heard running or ended: the agent
    had the launch and lost the rank (its state wiped)."""
    live = entry.job.state == job_pb2.JOB_STATE_RUNNING and attempt.attempt == entry.job.attempt
    heard = any(rank in attempt.ended or rank in attempt.running for rank in attempt.ranks_on(node_id))
    if not live or attempt.state is AttemptState.STOPPING or heard:
        return False
    launches = [effect for effect in manager.arrays.launches(entry) if isinstance(effect, Launch) and effect.node_id == node_id]
    for effect in launches:
        log.warning("launch sent again", job=entry.job.job_id, attempt=attempt.attempt, node=node_id, why=LAUNCH_LOST)
        manager.links.send(node_id, effect.message)
    return bool(launches)


def fence(manager: JobManager, effect: Fence) -> None:
    """Stops a running rank the coordinator does not run, and keeps its GPU from being placed until
    its end is confirmed: the rank holds the device until then, whatever the coordinator thought."""
    manager.links.send(effect.node_id, stop_message(effect.job_id, effect.attempt, 0.0, effect.reason))
    key = (effect.job_id, effect.attempt, effect.rank)
    allocations = manager.cluster.allocations
    node = manager.cluster.nodes.get(effect.node_id)
    if allocations.fenced(key) or node is None:
        return
    uuid = effect.device_uuid
    # A rank whose GPU is not known (a job this coordinator forgot) may be on any of the node's GPUs.
    candidates = (uuid,) if uuid is not None and uuid in node.devices else tuple(node.devices)
    held, conflicts = allocations.hold_for_fenced(key, effect.node_id, candidates, known_device=uuid is not None)
    for gpu in conflicts:
        holder = allocations.get(gpu)
        log.error(
            "stale rank runs on a GPU given to another attempt",
            job=effect.job_id,
            attempt=effect.attempt,
            rank=effect.rank,
            node=effect.node_id,
            gpu=gpu,
            holder=f"{holder[0]} attempt {holder[1]}" if holder else "",
        )
    if held:
        log.info(
            "GPUs held until a fenced rank is gone",
            job=effect.job_id,
            attempt=effect.attempt,
            rank=effect.rank,
            node=effect.node_id,
            gpus=held,
        )
