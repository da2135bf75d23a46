"""Jobs and their attempts as the coordinator holds them in memory: plain data, no I/O.

The durable part of a job is its `gpuorch.v1.Job` (stored whole, coordinator/store/); what an
attempt's ranks are doing is known only in memory, rebuilt after a restart from the agents'
registrations. The rules that change these records are in coordinator/rules/job_machine.py.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Reversible
from dataclasses import dataclass, field

from gpuorch.clock import stamp_seconds
from gpuorch.v1 import job_pb2

FINAL_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})

RankKey = tuple[str, int, int]
"""(job id, attempt, rank)."""


class AttemptState(enum.Enum):
    """Where one attempt of a job stands (see the diagram in coordinator/rules/job_machine.py).

    LAUNCHING: placed, its devices taken, launches sent; not every rank has reported its start.
    RUNNING:   every rank has started.
    STOPPING:  over (it failed, was cancelled, or another rank's end ended the job) while some of
               its ranks have not reported their end; their devices stay taken until they do.
    An attempt whose every rank has ended (or was given up with its DOWN node) is forgotten.
    """

    LAUNCHING = "launching"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class RankOutcome:
    """How one rank ended, for its attempt."""

    failed: bool
    description: str


@dataclass(eq=False, slots=True)
class Attempt:
    """What the coordinator knows of one attempt's ranks. Where they run is the attempt's record in
    the job (`placement`, the same object): not copied here."""

    attempt: int
    placement: job_pb2.Placement
    state: AttemptState = AttemptState.LAUNCHING
    running: set[int] = field(default_factory=set)
    """Ranks whose process started."""
    ended: dict[int, RankOutcome] = field(default_factory=dict)
    """Ranks that ended, and how."""
    launched_at: float = 0.0
    """Monotonic time the attempt was launched."""
    node_sessions: dict[str, int] = field(default_factory=dict)
    """Node id -> the id of the node's stream when the attempt was placed (0: none). A registration
    judges only ranks placed before it began, on older streams: the agent's Register cannot know of others."""
    started_wall: float = 0.0
    last_progress_wall: float = 0.0
    """Latest progress any rank reported (wall clock), 0 if none."""
    all_started_at: float = 0.0
    """Monotonic time the last of its ranks reported its start (0: not all have)."""
    started_ranks: int = 0
    """Ranks whose start was reported, those that have ended since included: a quick rank may end before
    the last one starts, and the attempt still started whole."""
    stops_sent: dict[str, float] = field(default_factory=dict)
    """Node id -> monotonic time a stop of a preemption was last sent there (rules/preemption.py)."""
    stop_covers: dict[str, set[int]] = field(default_factory=dict)
    """Node id -> the ranks there that the preemption's stops are known to have reached (rules/preemption.py)."""
    _ranks: dict[int, tuple[str, str]] = field(default_factory=dict, repr=False)
    """Rank -> (node id, device uuid): an index over `placement`, built once (a placement never changes
    once made), because message fields are slow to walk for every rank's report."""
    _nodes: list[str] = field(default_factory=list, repr=False)
    """The placement's node ids in node-rank order (the same index)."""

    def __post_init__(self) -> None:
        ranks, nodes = self._ranks, self._nodes
        for node in self.placement.nodes:
            node_id = node.node_id
            nodes.append(node_id)
            first = node.first_rank  # a message field: read once per node, not per rank
            for local, uuid in enumerate(node.device_uuids):
                ranks[first + local] = (node_id, uuid)

    @property
    def world_size(self) -> int:
        return len(self._ranks)

    @property
    def ranks_left(self) -> int:
        """Ranks that have not reported their end."""
        return self.world_size - len(self.ended)

    def where(self, rank: int) -> tuple[str, str] | None:
        """(node id, device uuid) of the rank, or None if the attempt has no such rank."""
        return self._ranks.get(rank)

    def devices(self) -> list[tuple[str, str]]:
        """(node id, device uuid) of every rank, in rank order within each node."""
        return list(self._ranks.values())

    def node_of(self, rank: int) -> str | None:
        where = self._ranks.get(rank)
        return where[0] if where is not None else None

    def device_of(self, rank: int) -> str | None:
        where = self._ranks.get(rank)
        return where[1] if where is not None else None

    def places_on(self, node_id: str) -> bool:
        """Whether the placement has the node (a cheap test before ranks_on, which walks every rank)."""
        return node_id in self._nodes

    def ranks_on(self, node_id: str) -> list[int]:
        return [rank for rank, (node, _) in self._ranks.items() if node == node_id]

    def nodes(self) -> list[str]:
        """The attempt's nodes, in node-rank order."""
        return list(self._nodes)


@dataclass(eq=False, slots=True)
class JobEntry:
    """One job: its durable record and its attempts that may still have ranks somewhere."""

    sequence: int
    job: job_pb2.Job
    client_request_id: str = ""
    attempts: dict[int, Attempt] = field(default_factory=dict)
    """Attempts that may still have ranks somewhere, by number."""
    usage_settled: bool = False
    """Final, and its GPU-seconds added to the scheduler's settled fair-share usage (once: it leaves with the job)."""

    @property
    def final(self) -> bool:
        return self.job.state in FINAL_STATES

    @property
    def current(self) -> Attempt | None:
        return self.attempts.get(self.job.attempt)

    @property
    def restart_reason(self) -> str:
        """Why the next attempt is started (GPUORCH_RESTART_REASON); empty for the first. Kept in the
        stored job itself (Job.pending_restart_reason), so that it outlives a coordinator restart."""
        return self.job.pending_restart_reason

    @property
    def not_before(self) -> float:
        """Wall time before which the next attempt must not start (restart backoff); 0 if none."""
        return stamp_seconds(self.job.restart_not_before) if self.job.HasField("restart_not_before") else 0.0

    def record(self, attempt: int) -> job_pb2.Attempt | None:
        """The job's stored record of one attempt."""
        for record in reversed(self.job.attempts):
            if record.attempt == attempt:
                return record
        return None

    def node_of_rank(self, attempt: int, rank: int) -> str | None:
        """The node one rank of an attempt was placed on (from its stored record); None: no such rank."""
        record = self.record(attempt)
        for node in record.placement.nodes if record is not None else ():
            if node.first_rank <= rank < node.first_rank + len(node.device_uuids):
                return node.node_id
        return None


LIST_ENTRY_OVERHEAD_BYTES = 8
"""What one job adds to a ListJobsResponse beyond its own encoding: the field's tag and length."""


def job_page(
    entries: Reversible[JobEntry], states: Iterable[int], owner: str, page_size: int, page_token: str, max_bytes: int
) -> tuple[list[job_pb2.Job], str]:
    """Newest first: at most `page_size` jobs (default 100, at most 1000) and, with `max_bytes`,
    at most that many bytes encoded (but always one job), so that a page fits in one message
    however large its jobs are. The page token is the sequence number to continue below.
    `entries` are in submission order."""
    limit = min(page_size or 100, 1000)
    try:
        below = int(page_token) if page_token else math.inf
    except ValueError:
        raise ValueError(f"page_token {page_token[:32]!r} is not one this coordinator gave out") from None
    wanted = set(states)
    page: list[JobEntry] = []
    page_bytes = 0
    more = False
    for entry in reversed(entries):
        if entry.sequence >= below or (wanted and entry.job.state not in wanted) or (owner and entry.job.spec.owner != owner):
            continue
        job_bytes = entry.job.ByteSize() + LIST_ENTRY_OVERHEAD_BYTES if max_bytes else 0
        if len(page) == limit or (page and page_bytes + job_bytes > max_bytes > 0):
            more = True
            break
        page.append(entry)
        page_bytes += job_bytes
    return [entry.job for entry in page], (str(page[-1].sequence) if more else "")


def jobs_by_state(entries: Iterable[JobEntry]) -> dict[str, int]:
    """State name -> how many jobs are in it, every state named."""
    counts = {name: 0 for name in job_pb2.JobState.keys() if not name.endswith("UNSPECIFIED")}  # noqa: SIM118 - an enum wrapper, not a dict
    for entry in entries:
        counts[job_pb2.JobState.Name(entry.job.state)] += 1
    return counts
