"""What a replay is given and keeps: its settings, the simulated agents' attempts, each job's record, each
pool's coordinator parts (a cell), and the outcome the report reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.control.node_links import AgentSession
from coordinator.rules.recovery import RecoveryPolicy
from coordinator.scheduler import SchedulerConfig
from coordinator.settings import CoordinatorSettings
from coordinator.sim.traces import TraceJob


@dataclass(frozen=True, slots=True)
class SimSettings:
    pools: dict[str, tuple[int, int]]
    """Pool -> (nodes, GPUs per node)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    """The rest of what the coordinator would run with: runtime prediction, quotas."""
    oracle: bool = False
    """Give the scheduler each job's true duration as its runtime estimate."""
    preemption_cost: float = 0.0
    """Seconds an attempt after a preemption runs before it makes progress again."""
    seed: int = 0
    rank_end_spacing: float = 0.0
    """0: an attempt's ranks all exit at once. s > 0: rank r exits r x s seconds after rank 0, each end its own
    event (as a real cluster sees ranks' processes end one by one; for comparing with one)."""


@dataclass(eq=False, slots=True)
class AttemptRun:
    """An attempt as the simulated agents run it."""

    cell: Cell
    job_id: str
    attempt: int
    start: float
    overhead: float
    """Seconds of this attempt spent restoring before it makes progress (the preemption cost)."""
    ranks: dict[str, list[int]] = field(default_factory=dict)
    """Node id -> ranks still running there."""
    gpus: int = 0
    end: float | None = None
    stopped: bool = False
    rank_ends: dict[int, float] = field(default_factory=dict)
    """Rank -> the simulated time it ends, where the trace gives them (TraceJob.rank_ends); empty = the model."""


@dataclass(slots=True)
class JobRecord:
    """What the simulator measures of one trace job."""

    trace: TraceJob
    submit: float
    first_start: float | None = None
    end: float | None = None
    work_left: float = 0.0
    attempts: int = 0
    preemptions: int = 0
    runs: list[tuple[float, float, int]] = field(default_factory=list)
    """(start, end, GPUs) of each attempt: GPUs allocated."""


@dataclass(eq=False)
class Cell:
    """One pool's coordinator state: a cluster view and a job manager over it."""

    pool: str
    cluster: ClusterView
    manager: JobManager
    sessions: list[AgentSession]
    gpus: int
    busy: int = 0
    """GPUs the simulated agents run ranks on now."""
    timeline: list[tuple[float, bool, int]] = field(default_factory=list)
    """(time, whether jobs are pending, busy GPUs) at every change, from the first event on."""


@dataclass
class Refusal:
    job: TraceJob
    kind: str
    """unknown_pool, larger_than_pool or invalid (what the coordinator refused at submit)."""
    reason: str


@dataclass
class Outcome:
    records: list[JobRecord]
    refused: list[Refusal]
    pools: dict[str, tuple[int, int]]
    timelines: dict[str, list[tuple[float, bool, int]]]
    scheduler_cpu_seconds: float
    passes: int
    placements: int
    simulated_until: float
