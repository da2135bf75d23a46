"""What the scheduler takes and gives: plain frozen records, no behaviour beyond validation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

POLICIES = ("priority", "fcfs", "sjf", "fair_share")

_NO_USAGE: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class GpuView:
    """One GPU as the scheduler sees it this pass."""

    uuid: str
    index: int
    model: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float
    temperature_celsius: float
    healthy: bool
    free: bool
    """Held by no attempt."""


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the scheduler sees it this pass."""

    node_id: str
    schedulable: bool
    """READY and not drained."""
    gpus: tuple[GpuView, ...]
    pool: str = "default"
    """The node's pool (the agent's --pool)."""


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a pending job asks for."""

    job_id: str
    gpus: int
    gpus_per_node: int = 0
    """0: any shape; k: exactly gpus/k nodes with k GPUs each."""
    priority: int = 0
    submit_time: float = 0.0
    owner: str = ""
    estimated_runtime_seconds: float = 0.0
    """0 = unknown."""
    min_memory_per_gpu_bytes: int = 0
    gpu_model: str = ""
    """Case-insensitive substring of the GPU's model name; empty = any."""
    spread: bool = False
    """Use as many nodes as possible instead of packing."""
    pool: str = "default"
    """The node pool the job runs in: only nodes of this pool are eligible."""
    group: str = ""
    """The owner's group (quotas); empty = none."""
    preemptible: bool = True
    """Whether this job, once running, may be preempted for higher-ranked work."""
    attained_service_seconds: float = 0.0
    """GPU-seconds the job's earlier attempts already ran (least-attained-service policies)."""
    time_limit_seconds: float = 0.0
    """The user's upper bound on the runtime (enforced by the agent); 0 = none."""


@dataclass(frozen=True, slots=True)
class Quotas:
    """Caps on the GPUs that running jobs may hold at once, per owner and per group (0 or absent = no cap)."""

    max_gpus_per_owner: Mapping[str, int] = field(default_factory=dict)
    """Owner -> cap; the key "*" is the cap of every owner not named."""
    max_gpus_per_group: Mapping[str, int] = field(default_factory=dict)
    """Group -> cap; the key "*" is the cap of every group not named."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str = "priority"
    """One of POLICIES."""
    memory_weight: float = 0.6
    utilization_weight: float = 0.4
    temperature_threshold_celsius: float = 80.0
    temperature_penalty_per_degree: float = 0.02
    reservations: bool = True
    """Let the first blocked job that could fit hold nodes against later jobs (anti-starvation)."""
    reserve_after_seconds: float = 0.0
    """A job takes a reservation only once it has waited this long (now - submit_time)."""
    fair_share_default_runtime_seconds: float = 3600.0
    """fair_share charges a placed job gpus x runtime; this stands in for an unknown runtime."""
    quotas: Quotas = field(default_factory=Quotas)
    """Running-GPU caps per owner and group; a capped job waits with a reason naming the quota."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; known: {', '.join(POLICIES)}")


@dataclass(frozen=True, slots=True)
class NodeShare:
    node_id: str
    gpu_uuids: tuple[str, ...]
    """In local-rank order (by GPU index)."""


@dataclass(frozen=True, slots=True)
class Decision:
    job_id: str
    nodes: tuple[NodeShare, ...]
    """In node-rank order: node rank 0 first."""


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job with a live attempt, as the scheduler sees it: what holds GPUs and until when (backfill,
    start-time estimates) and what may be preempted."""

    job_id: str
    nodes: tuple[NodeShare, ...]
    """The GPUs the attempt holds."""
    start_time: float
    """Wall time the attempt was placed."""
    owner: str = ""
    group: str = ""
    pool: str = "default"
    priority: int = 0
    preemptible: bool = True
    estimated_end_time: float = 0.0
    """Wall time the attempt is predicted to end; 0 = unknown."""
    attained_service_seconds: float = 0.0
    """GPU-seconds of the job's earlier attempts (this attempt's own is gpus x (now - start_time))."""
    stopping: bool = False
    """The attempt is over (preempted, failed, cancelled) but some ranks have not confirmed their end: its GPUs
    are still held, they free within the stop grace, and it is no candidate for preemption."""

    @property
    def gpus(self) -> int:
        return sum(len(share.gpu_uuids) for share in self.nodes)


@dataclass(frozen=True, slots=True)
class Preemption:
    """A running job the pass asks to stop so that a higher-ranked pending job can start."""

    victim_job_id: str
    for_job_id: str
    """The pending job it makes room for."""
    reason: str
    """One line for the victim's history, e.g. "preempted for j-000123-abcdef (priority 10 > 0)"."""


@dataclass(frozen=True, slots=True)
class SchedulingResult:
    placed: tuple[Decision, ...]
    pending_reasons: dict[str, str]
    """job_id -> why it was not placed, for every pending job not placed."""
    reserved_for: str | None = None
    """The job holding a reservation this pass, if any."""
    reserved_nodes: tuple[str, ...] = ()
    """The nodes it holds."""
    preemptions: tuple[Preemption, ...] = ()
    """Running jobs to stop (with their grace) to make room; their GPUs are not reused in this pass."""
