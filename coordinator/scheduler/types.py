"""What the scheduler takes and gives: plain frozen records, no behaviour beyond validation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

POLICIES = ("priority", "fcfs", "sjf", "fair_share", "las")
"""The policies an operator may choose (scheduler_policy)."""
SIMULATOR_POLICIES = (*POLICIES, "srtf")
"""Also srtf, which orders by true remaining time: an oracle reference for the simulator, not for a live cluster."""

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
    excluded_gpus: frozenset[str] = frozenset()
    """GPUs (uuids) the job must not be placed on: stragglers it was restarted away from."""


@dataclass(frozen=True, slots=True)
class Quotas:
    """Caps on the GPUs that running jobs may hold at once, per owner and per group (0 or absent = no cap)."""

    max_gpus_per_owner: Mapping[str, int] = field(default_factory=dict)
    """Owner -> cap; the key "*" is the cap of every owner not named."""
    max_gpus_per_group: Mapping[str, int] = field(default_factory=dict)
    """Group -> cap; the key "*" is the cap of every group not named."""


@dataclass(frozen=True, slots=True)
class PreemptionRule:
    """Pending jobs of priority >= min_priority may preempt running preemptible jobs of priority < preempts_below_priority."""

    min_priority: int
    preempts_below_priority: int

    def __post_init__(self) -> None:
        if self.preempts_below_priority > self.min_priority:
            raise ValueError(
                f"a preemption rule lets priority {self.min_priority} preempt priorities below {self.preempts_below_priority}: "
                "a job may preempt only lower priorities"
            )


@dataclass(frozen=True, slots=True)
class Reservation:
    """The blocked head job of a pool and the nodes it holds, with the time it is estimated to start there."""

    job_id: str
    node_ids: tuple[str, ...]
    start_time: float
    """Estimated from running jobs' estimated ends (math.inf: no estimate is possible)."""
    pool: str = "default"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str = "priority"
    """One of SIMULATOR_POLICIES (live coordinators offer POLICIES)."""
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
    backfill: bool = True
    """Later jobs may start around a reservation (EASY backfill); False = nothing starts behind a blocked head
    job of the same pool (strict order)."""
    default_runtime_seconds: float = 3600.0
    """What the scheduler assumes of a job with no estimate (sjf order, srtf, estimated ends of running jobs)."""
    preemption: tuple[PreemptionRule, ...] = ()
    """Which priorities may preempt which (priority classes); empty = no preemption by priority."""
    preemption_cost_seconds: float = 60.0
    """What a preemption costs the victim (grace, requeue, restart): a job that would start by waiting this long
    preempts nobody, and las/srtf preempt only for a gain larger than it."""
    las_thresholds_gpu_seconds: tuple[float, ...] = (3600.0, 36000.0)
    """las queue boundaries in attained GPU-seconds: queue 0 below the first, and so on (ascending)."""
    las_min_run_seconds: float = 300.0
    """las preempts a running job only once its attempt has run this long (and preemption_cost_seconds)."""
    las_starve_limit_seconds: float = 3600.0
    """las: a pending job that waited this long (not running) is promoted to queue 0; 0 = never."""
    las_starve_factor: float = 8.0
    """las: ... and waited at least this many times as long as it already ran. Relative, as in Tiresias: a job that
    ran for days is not promoted after an hour's wait, only to be preempted again by the next arrival (churn that
    cost ~25% average JCT on the Philly trace); every job still gets its turn after a bounded wait."""
    sjf_aging: float = 1.0
    """sjf: seconds of estimated runtime forgiven per second waited (order key = estimate + aging x submit time),
    so no job waits forever behind a stream of shorter ones; 0 = pure sjf."""

    def __post_init__(self) -> None:
        if self.policy not in SIMULATOR_POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.default_runtime_seconds <= 0:
            raise ValueError(f"default_runtime_seconds must be > 0, got {self.default_runtime_seconds}")
        if self.preemption_cost_seconds < 0:
            raise ValueError(f"preemption_cost_seconds must be >= 0, got {self.preemption_cost_seconds}")
        thresholds = self.las_thresholds_gpu_seconds
        if any(t <= 0 for t in thresholds) or list(thresholds) != sorted(set(thresholds)):
            raise ValueError(f"las_thresholds_gpu_seconds must be positive and strictly ascending, got {thresholds}")
        if self.las_starve_limit_seconds < 0 or self.sjf_aging < 0 or self.las_min_run_seconds < 0 or self.las_starve_factor < 0:
            raise ValueError("las_starve_limit_seconds, las_starve_factor, las_min_run_seconds and sjf_aging must be >= 0")


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
    """Asked to stop (preempted, failed, cancelled) but some ranks have not confirmed their end: holds its GPUs
    until it ends (they free within the stop grace), is not preempted again, and its GPUs count as coming free
    for the job it was preempted for."""
    estimated_runtime_seconds: float = 0.0
    """The job's whole estimated runtime (srtf's remaining time); 0 = unknown."""

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
    reserved_start_time: float = 0.0
    """When reserved_for is estimated to start on reserved_nodes (0 = no reservation)."""
    reservations: tuple[Reservation, ...] = ()
    """Every pool's reservation (reserved_for/reserved_nodes are the first); pass it back as previous_reservations."""
