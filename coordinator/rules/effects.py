"""What the job rules ask the I/O around them to do: plain records, applied in order by
coordinator/control/job_manager.py (and, for placements, coordinator/control/scheduling_loop.py).

The rules change the in-memory model themselves (it is plain data); an effect is whatever reaches
beyond it: a message to an agent, a store write, a watcher, the scheduler, the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpuorch.v1 import agent_pb2


@dataclass(frozen=True, slots=True)
class Launch:
    """Send this launch to the node's agent."""

    node_id: str
    message: agent_pb2.CoordinatorMessage
    """The message to send: its `launch_task`."""

    @property
    def launch(self) -> agent_pb2.LaunchTask:
        return self.message.launch_task


@dataclass(frozen=True, slots=True)
class Stop:
    """Ask the node's agent to stop the attempt's ranks there: SIGTERM, then SIGKILL after the grace."""

    node_id: str
    job_id: str
    attempt: int
    grace_seconds: float
    reason: str


@dataclass(frozen=True, slots=True)
class AttemptOver:
    """Every rank of the attempt is accounted for: the node's agent may forget it."""

    node_id: str
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Fence:
    """A rank runs that the coordinator does not run: stop it, and hold the GPU it may be on until it is gone."""

    node_id: str
    job_id: str
    attempt: int
    rank: int
    device_uuid: str | None
    """The GPU it was placed on, when the coordinator knows its attempt; None: any of the node's."""
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    """The attempt is over: its rendezvous port on its rank-0 node is free again."""

    node_id: str
    port: int


@dataclass(frozen=True, slots=True)
class Save:
    """Write the job durably (in the order of the effects)."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell the job's watchers it changed."""

    job_id: str


@dataclass(frozen=True, slots=True)
class QueueChanged:
    """The job entered or left PENDING: the queue of jobs waiting for placement follows its state."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Wake:
    """Something was freed or queued: run a scheduling pass soon."""


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """For the log and the metrics: an attempt failed, and the job restarts (`restart`) or not."""

    job_id: str
    attempt: int
    kind: str
    """The failure code's kind: rank_exit, rank_start, start_failed, time_limit, node_down, gpu_unhealthy, hang,
    launch_timeout."""
    code: str
    reason: str
    restart: bool


@dataclass(frozen=True, slots=True)
class Preempted:
    """For the log and the metrics: the attempt was preempted for higher-ranked work; the job is requeued
    without using a restart."""

    job_id: str
    attempt: int
    for_job_id: str
    """The pending job it makes room for."""
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """For the log: the job reached a final state."""

    job_id: str
    state: int
    reason: str


@dataclass(frozen=True, slots=True)
class AllStarted:
    """For the metrics: every rank of the attempt started, this long after its launch."""

    job_id: str
    seconds: float


Effect = (
    Launch
    | Stop
    | AttemptOver
    | Fence
    | Release
    | Save
    | Notify
    | QueueChanged
    | Wake
    | AttemptFailed
    | Preempted
    | Finished
    | AllStarted
)
