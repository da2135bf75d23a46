"""One typed snapshot of the cluster and the queue: what the metrics (and later the dashboard) read.

`snapshot` runs on the event loop and copies references (per node, nothing per GPU); `Snapshot.resolve`
does the per-GPU and per-job work off the loop, in slices that let go of the GIL in between.
"""

from __future__ import annotations

import collections
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from coordinator.model.cluster import public_state
from coordinator.model.telemetry import HeartbeatStats
from coordinator.observe.rpc_metrics import RpcMetrics
from coordinator.rules.liveness import Liveness
from gpuorch.v1 import cluster_pb2

SLICE_ROWS = 1000
"""Series written between two pauses (~1 ms of work): a scrape's thread never holds the GIL long,
so the event loop, which needs it for every heartbeat, is never kept waiting long."""
PAUSE_SECONDS = 0.0002


def _pause() -> None:
    time.sleep(PAUSE_SECONDS)  # lets go of the GIL; the loop's waiting threads take it


def _slices(rows: list, size: int = SLICE_ROWS) -> Iterator[list]:
    for start in range(0, len(rows), size):
        if start:
            _pause()
        yield rows[start : start + size]


# -- the snapshot: copied on the event loop ------------------------------------------------------


@dataclass(slots=True)
class NodeRow:
    node_id: str
    hostname: str
    liveness: Liveness
    drained: bool
    last_heard_wall: float
    """Wall time of its last heartbeat (or registration)."""
    records: list
    """The node's DeviceRecords. Read off the loop: the fields read here (info, health, sample) are
    replaced whole, never changed in place, so a read sees the old value or the new one."""
    state: str = ""
    """Public state name (READY, SUSPECT, DOWN, DRAINING, DRAINED); set by Snapshot.resolve."""
    gpus: list[tuple] = field(default_factory=list)
    """(uuid, DeviceInfo, healthy, allocated, sample) per GPU, by index; set by Snapshot.resolve.
    `sample` is DeviceRecord.sample: the latest telemetry in SAMPLE_FIELDS order, or None."""


class JobTelemetryRow(NamedTuple):
    """A running job's step telemetry, copied for one scrape."""

    job_id: str
    owner: str
    step: int
    samples_per_second: float
    bucket_counts: list[int]
    """Steps per bucket of STEP_SECONDS_BUCKETS (not cumulative)."""
    steps_timed: int
    step_seconds_sum: float
    stragglers: int
    idle: bool


@dataclass(slots=True)
class Snapshot:
    now_wall: float
    epoch: int
    heartbeats: HeartbeatStats
    """A private copy of the cluster's HeartbeatStats."""
    allocations: dict[str, tuple[str, int]]
    nodes: list[NodeRow] = field(default_factory=list)
    job_entries: list = field(default_factory=list)
    """Every JobEntry (finished ones too: there may be 100,000s, so they are counted off the loop)."""
    job_states: dict[int, int] = field(default_factory=dict)
    """JobState value -> jobs in it; set by Snapshot.resolve."""
    pending_since: list[float] = field(default_factory=list)
    """Wall time each pending job has been waiting since (submission, or the end of its last attempt)."""
    pending_gpus: int = 0
    placements: int = 0
    restarts_by_reason: dict[str, int] = field(default_factory=dict)
    decision_seconds: list[float] = field(default_factory=list)
    launch_latencies: list[float] = field(default_factory=list)
    rpc_started: dict[str, int] = field(default_factory=dict)
    rpc_handled: dict[tuple[str, str], int] = field(default_factory=dict)
    rpc_types: dict[str, str] = field(default_factory=dict)
    job_owners: dict[str, str] = field(default_factory=dict)
    """Job id -> owner of each job holding a GPU; set by Snapshot.resolve."""
    held_seconds: float = 0.0
    """How long taking this snapshot held the event loop."""
    job_telemetry: list[JobTelemetryRow] = field(default_factory=list)
    """Every running job's step telemetry."""

    def resolve(self) -> Snapshot:
        """The per-node, per-GPU and per-job work, done off the loop: node states, GPU rows, job counts."""
        allocations = self.allocations
        self.nodes.sort(key=lambda node: node.node_id)
        done = 0
        for node in self.nodes:
            gpus = [
                (record.info.uuid, record.info, record.health.healthy, record.info.uuid in allocations, record.sample)
                for record in node.records
            ]
            gpus.sort(key=lambda gpu: gpu[1].index)
            busy = any(gpu[3] for gpu in gpus)
            node.state = _NODE_STATE_NAMES[public_state(node.liveness, node.drained, busy)]
            node.gpus = gpus
            done += len(gpus)
            if done >= SLICE_ROWS:
                done = 0
                _pause()
        # JobManager.jobs_by_state's count; a job's state is one field, read whole.
        job_states: collections.Counter = collections.Counter()
        for chunk in _slices(self.job_entries, 10 * SLICE_ROWS):
            job_states.update([entry.job.state for entry in chunk])
        self.job_states = dict(job_states)
        holding = {job_id for job_id, _attempt in allocations.values()}
        self.job_owners = {entry.job.job_id: entry.job.spec.owner for entry in self.job_entries if entry.job.job_id in holding}
        return self


def snapshot(coordinator, rpc: RpcMetrics | None) -> Snapshot:
    """Copies what the metrics need. Runs on the event loop between heartbeats, so it copies
    references, per node, and C-level copies of dicts; nothing per GPU, nothing formatted."""
    cluster = coordinator.cluster
    started = cluster.clock.monotonic()
    result = Snapshot(
        now_wall=cluster.clock.wall(),
        epoch=coordinator.epoch,
        heartbeats=copy.deepcopy(cluster.heartbeats),
        allocations=cluster.allocations.copy(),
    )
    result.nodes = [
        NodeRow(
            node_id,
            node.hostname,
            node.liveness.state,
            node.drained,
            node.last_heartbeat_wall or node.registered_wall,
            list(node.devices.values()),
        )
        for node_id, node in cluster.nodes.items()
    ]
    jobs = getattr(coordinator, "jobs", None)
    if jobs is not None:
        result.job_entries = list(jobs.jobs.values())
        for entry in jobs.pending.values():
            job = entry.job
            since = job.submit_time
            if job.attempts and job.attempts[-1].HasField("end_time"):
                since = job.attempts[-1].end_time
            result.pending_since.append(since.ToNanoseconds() / 1e9)
            result.pending_gpus += job.spec.gpus
        result.placements = jobs.placements
        result.restarts_by_reason = dict(jobs.restarts_by_reason)
        result.decision_seconds = list(jobs.decision_seconds)
        result.launch_latencies = list(jobs.launch_latencies)
    telemetry = getattr(coordinator, "job_telemetry", None)
    if telemetry is not None:
        result.job_telemetry = [
            JobTelemetryRow(job.job_id, job.spec.owner, state.step, state.samples_per_second, list(state.histogram.counts),
                            state.histogram.count, state.histogram.total_seconds, len(state.flagged), state.idle)
            for job, state in telemetry.running()
        ]  # fmt: skip
    if rpc is not None:
        result.rpc_started = dict(rpc.started)
        result.rpc_handled = dict(rpc.handled)
        result.rpc_types = dict(rpc.types)
    result.held_seconds = cluster.clock.monotonic() - started
    return result


_NODE_STATE_NAMES = {
    value: cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_") for value in cluster_pb2.NodeState.values()
}
