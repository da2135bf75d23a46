"""The scheduler: which pending jobs start now, and on which GPUs.

Pure decisions over plain data (STYLE.md #4): frozen dataclasses in, frozen
dataclasses out, time injected as `now`, no I/O. The job manager builds a
`NodeView` per node and a `JobRequest` per pending job from its cluster view
each pass, calls `schedule`, and applies the `Decision`s; a simulator can
replay traces through the same function.

One pass:

1. Order the pending jobs by the policy (`order_jobs`): priority, fcfs, sjf
   or fair_share.
2. Walk them in that order, placing each all-or-nothing against the free
   capacity left by the jobs before it (`place` for one job alone). Eligible
   GPUs: on a schedulable node, healthy, free, with at least the job's memory
   and of its model. Placement packs onto as few nodes as possible with best
   fit (the node whose free count leaves the least over), so that whole nodes
   stay whole for large jobs; `gpus_per_node` fixes the shape; `spread` uses
   as many nodes as it can, evenly. On each node the best-scored GPUs
   (`score_gpu`: free memory, idleness, coolness) are taken, then given local
   ranks by index.
3. Anti-starvation (reservation with backfill): the first job in order that
   does not fit now but could fit the cluster as it stands (counting busy
   GPUs) reserves the nodes likeliest to satisfy it soonest, and later jobs
   this pass are placed only on the rest. Reserved nodes only gain free GPUs
   (nothing else starts there), so the next pass picks them again and the job
   starts once enough of their work has finished. A job that can never fit
   takes no reservation.

Every job not placed gets a one-line reason for operators.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType

POLICIES = ("priority", "fcfs", "sjf", "fair_share")

_GIB = 1 << 30
_MIB = 1 << 20
_NO_USAGE: Mapping[str, float] = MappingProxyType({})
_MAX_NAMES = 8


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
class SchedulingResult:
    placed: tuple[Decision, ...]
    pending_reasons: dict[str, str]
    """job_id -> why it was not placed, for every pending job not placed."""
    reserved_for: str | None = None
    """The job holding a reservation this pass, if any."""
    reserved_nodes: tuple[str, ...] = ()
    """The nodes it holds."""


# --- ordering -----------------------------------------------------------------------------------------------


_by_submit = attrgetter("submit_time", "job_id")
_by_priority = attrgetter("priority")
_by_index = attrgetter("index")
_by_runtime = attrgetter("estimated_runtime_seconds")


def _by_priority_order(jobs: Sequence[JobRequest]) -> list[JobRequest]:
    """Higher priority first, then earlier submit_time, then job_id (stable sorts, C-speed keys)."""
    ordered = sorted(jobs, key=_by_submit)
    ordered.sort(key=_by_priority, reverse=True)  # reverse keeps equal elements in order
    return ordered


def _sjf_order(jobs: Sequence[JobRequest]) -> list[JobRequest]:
    """Shortest known estimated runtime first, then unknown (<= 0) ones; ties by submit_time, job_id."""
    ordered = sorted(jobs, key=_by_submit)
    known = [job for job in ordered if job.estimated_runtime_seconds > 0]
    known.sort(key=_by_runtime)
    return known + [job for job in ordered if not job.estimated_runtime_seconds > 0]


class _FairShare:
    """Owners by usage, least first; each owner's jobs by priority, then submit time.

    Iterating yields one job at a time; `charge` a yielded job before asking for the next
    to add its cost to its owner's tally, so that owners interleave within one pass.
    """

    def __init__(self, jobs: Sequence[JobRequest], config: SchedulerConfig, usage: Mapping[str, float]) -> None:
        self._default_runtime = config.fair_share_default_runtime_seconds
        self._queues: dict[str, list[JobRequest]] = {}
        for job in jobs:
            self._queues.setdefault(job.owner, []).append(job)
        self.tally = {owner: float(usage.get(owner, 0.0)) for owner in self._queues}
        for owner, queue in list(self._queues.items()):
            self._queues[owner] = _by_priority_order(queue)[::-1]  # next job at the end
        self._heap = [self._entry(owner) for owner in self._queues]
        heapq.heapify(self._heap)

    def _entry(self, owner: str) -> tuple:
        head = self._queues[owner][-1]
        return (self.tally[owner], -head.priority, head.submit_time, head.job_id, owner)

    def charge(self, job: JobRequest) -> None:
        runtime = job.estimated_runtime_seconds if job.estimated_runtime_seconds > 0 else self._default_runtime
        self.tally[job.owner] += job.gpus * max(runtime, 1.0)

    def __iter__(self) -> Iterator[JobRequest]:
        heap, queues, tally = self._heap, self._queues, self.tally
        while heap:
            owner = heapq.heappop(heap)[-1]
            queue = queues[owner]
            while True:
                yield queue.pop()
                if not queue:
                    break
                head = queue[-1]
                entry = (tally[owner], -head.priority, head.submit_time, head.job_id, owner)
                if heap and heap[0] < entry:
                    heapq.heappush(heap, entry)
                    break


def order_jobs(
    jobs: Sequence[JobRequest], config: SchedulerConfig, usage_by_owner: Mapping[str, float] = _NO_USAGE
) -> list[JobRequest]:
    """The order in which a pass considers `jobs`.

    priority: higher first, then earlier submit_time, then job_id. fcfs: submit_time.
    sjf: shortest estimated runtime first, unknown (0) after all known. fair_share: the
    owner with the least usage (GPU-seconds) first, each job charged to its owner as it
    is taken so that owners interleave; within an owner by priority then submit_time.
    For fair_share this is the order if every job were placed; `schedule` charges only
    the jobs it actually places.
    """
    if config.policy == "priority":
        return _by_priority_order(jobs)
    if config.policy == "fcfs":
        return sorted(jobs, key=_by_submit)
    if config.policy == "sjf":
        return _sjf_order(jobs)
    if config.policy == "fair_share":
        queue = _FairShare(jobs, config, usage_by_owner)
        ordered = []
        for job in queue:
            queue.charge(job)
            ordered.append(job)
        return ordered
    raise ValueError(f"unknown scheduling policy {config.policy!r}; known: {', '.join(POLICIES)}")


# --- device scoring -----------------------------------------------------------------------------------------


def score_gpu(gpu: GpuView, config: SchedulerConfig) -> float:
    """Higher is better: free memory and idleness, less a penalty per degree above the threshold."""
    total = gpu.memory_total_bytes
    free_fraction = min(1.0, max(0.0, (total - gpu.memory_used_bytes) / total)) if total > 0 else 0.0
    idle_fraction = 1.0 - min(100.0, max(0.0, gpu.utilization_percent)) / 100.0
    over = gpu.temperature_celsius - config.temperature_threshold_celsius
    penalty = config.temperature_penalty_per_degree * over if over > 0 else 0.0
    return config.memory_weight * free_fraction + config.utilization_weight * idle_fraction - penalty


# --- capacity -----------------------------------------------------------------------------------------------


class _Pool:
    """Free capacity for one class of eligible GPUs, node by node, bucketed by free count.

    `free[i]` lists node i's free eligible GPUs, best score first; `buckets[c]` holds
    (in an insertion-ordered dict) the unreserved nodes with exactly c of them;
    `held` the reserved nodes and their free counts, which later jobs may not use.
    The lists are replaced, never changed in place, so pools may share them.
    """

    __slots__ = ("_exist_at_least", "buckets", "exist", "exist_total", "free", "held", "total_free")

    def __init__(self, free: list[list[GpuView]], exist: list[int], max_per_node: int, held: frozenset[int]) -> None:
        self.free = free
        self.exist = exist
        self.exist_total = sum(exist)
        self.buckets: list[dict[int, None]] = [{} for _ in range(max_per_node + 1)]
        self.total_free = 0
        self.held: dict[int, int] = {}
        self._exist_at_least: dict[int, int] = {}
        for i, gpus in enumerate(free):
            count = len(gpus)
            if i in held:
                self.held[i] = count
            elif count:
                self.buckets[count][i] = None
                self.total_free += count

    def remove(self, i: int, taken: set[str]) -> None:
        gpus = self.free[i]
        if not gpus:
            return
        kept = [g for g in gpus if g.uuid not in taken]
        old, new = len(gpus), len(kept)
        if old == new:
            return
        self.free[i] = kept
        if i in self.held:
            self.held[i] = new
            return
        del self.buckets[old][i]
        if new:
            self.buckets[new][i] = None
        self.total_free -= old - new

    def hold(self, i: int) -> None:
        if i in self.held:
            return
        count = len(self.free[i])
        self.held[i] = count
        if count:
            del self.buckets[count][i]
            self.total_free -= count

    def nodes_with_free(self, k: int) -> int:
        """Unreserved nodes with at least k free eligible GPUs."""
        return sum(len(b) for b in self.buckets[max(k, 1) :])

    def held_free(self) -> int:
        return sum(self.held.values())

    def nodes_with_exist(self, k: int) -> int:
        """Nodes with at least k eligible GPUs, free or busy."""
        n = self._exist_at_least.get(k)
        if n is None:
            n = self._exist_at_least[k] = sum(1 for e in self.exist if e >= k)
        return n


class _Pass:
    """The cluster's capacity during one pass; placing a job takes its GPUs out of every pool."""

    def __init__(self, nodes: Sequence[NodeView], config: SchedulerConfig) -> None:
        self.node_ids: list[str] = []
        self._type_counts: list[dict[tuple[int, str], int]] = []
        free_lists: list[list[GpuView]] = []
        types: set[tuple[int, str]] = set()
        max_per_node = 0
        memory_weight, utilization_weight = config.memory_weight, config.utilization_weight
        threshold, penalty = config.temperature_threshold_celsius, config.temperature_penalty_per_degree
        for node in nodes:
            if not node.schedulable:
                continue
            healthy = [g for g in node.gpus if g.healthy]
            if not healthy:
                continue
            self.node_ids.append(node.node_id)
            max_per_node = max(max_per_node, len(healthy))
            counts: dict[tuple[int, str], int] = {}
            for g in healthy:
                gpu_type = (g.memory_total_bytes, g.model)
                counts[gpu_type] = counts.get(gpu_type, 0) + 1
            self._type_counts.append(counts)
            types.update(counts)
            free = [g for g in healthy if g.free]
            if len(free) > 1:
                scored = []
                for n, g in enumerate(free):
                    # score_gpu, inlined: this runs for every free GPU in the cluster each pass.
                    total = g.memory_total_bytes
                    fraction = (total - g.memory_used_bytes) / total if total > 0 else 0.0
                    fraction = 0.0 if fraction < 0.0 else min(fraction, 1.0)
                    util = g.utilization_percent
                    util = 0.0 if util < 0.0 else min(util, 100.0)
                    over = g.temperature_celsius - threshold
                    score = memory_weight * fraction + utilization_weight * (1.0 - util / 100.0)
                    if over > 0:
                        score -= penalty * over
                    scored.append((-score, g.index, n, g))
                scored.sort()
                free = [entry[3] for entry in scored]
            free_lists.append(free)
        self.max_per_node = max_per_node
        self._types = types
        self._held: frozenset[int] = frozenset()
        self.plain = _Pool(free_lists, [sum(c.values()) for c in self._type_counts], max_per_node, self._held)
        self._pools: dict[frozenset | None, _Pool] = {None: self.plain}
        self._pool_of: dict[tuple[int, str], _Pool] = {(0, ""): self.plain}

    # pools

    def pool_for(self, job: JobRequest) -> _Pool:
        """The capacity the job may use. Requirements that admit the same GPU types share a pool."""
        req = (job.min_memory_per_gpu_bytes, job.gpu_model)
        pool = self._pool_of.get(req)
        if pool is None:
            min_memory, model = req[0], req[1].lower()
            eligible = frozenset(t for t in self._types if t[0] >= min_memory and (not model or model in t[1].lower()))
            pool = self._pool_of[req] = self._pool(None if eligible == self._types else eligible)
        return pool

    def _pool(self, key: frozenset | None) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            free, exist = [], []
            for counts, gpus in zip(self._type_counts, self.plain.free):
                eligible = sum(n for gpu_type, n in counts.items() if gpu_type in key)
                exist.append(eligible)
                if eligible == 0 or not gpus:
                    free.append([])
                elif len(counts) == 1:  # a node of one type, all eligible: share the list
                    free.append(gpus)
                else:
                    free.append([g for g in gpus if (g.memory_total_bytes, g.model) in key])
            pool = self._pools[key] = _Pool(free, exist, self.max_per_node, self._held)
        return pool

    def _take(self, i: int, gpus: list[GpuView]) -> NodeShare:
        taken = {g.uuid for g in gpus}
        for pool in self._pools.values():
            if pool.free[i]:
                pool.remove(i, taken)
        ordered = sorted(gpus, key=_by_index)
        return NodeShare(self.node_ids[i], tuple(g.uuid for g in ordered))

    def hold(self, nodes: Sequence[int]) -> None:
        self._held = self._held | frozenset(nodes)
        for pool in self._pools.values():
            for i in nodes:
                pool.hold(i)

    # placement

    def place(self, job: JobRequest, pool: _Pool) -> Decision | None:
        """Places `job` on the pool's unreserved free capacity, taking it; None if it does not fit."""
        g, k = job.gpus, job.gpus_per_node
        if pool.total_free < g:
            return None
        if k:
            shares = self._place_per_node(g // k, k, pool)
        elif job.spread:
            shares = self._place_spread(g, pool)
        else:
            shares = self._place_packed(g, pool)
        return Decision(job.job_id, tuple(shares)) if shares else None

    def _best_fit(self, g: int, pool: _Pool) -> int | None:
        buckets = pool.buckets
        for c in range(g, len(buckets)):
            if buckets[c]:
                return next(iter(buckets[c]))
        return None

    def _largest(self, pool: _Pool) -> int:
        buckets = pool.buckets
        for c in range(len(buckets) - 1, 0, -1):
            if buckets[c]:
                return c
        return 0

    def _place_packed(self, g: int, pool: _Pool) -> list[NodeShare]:
        # The caller checked pool.total_free >= g, so this always succeeds (the raise guards against a hang).
        i = self._best_fit(g, pool)
        if i is not None:
            return [self._take(i, pool.free[i][:g])]
        shares = []
        remaining = g
        while remaining:
            c = self._largest(pool)
            if not c:
                raise RuntimeError(f"scheduler capacity accounting is inconsistent: {remaining} of {g} GPUs unplaced")
            if c >= remaining:
                i = self._best_fit(remaining, pool)
                shares.append(self._take(i, pool.free[i][:remaining]))
                break
            i = next(iter(pool.buckets[c]))
            shares.append(self._take(i, pool.free[i]))
            remaining -= c
        return shares

    def _place_per_node(self, n: int, k: int, pool: _Pool) -> list[NodeShare] | None:
        if pool.nodes_with_free(k) < n:
            return None
        chosen: list[int] = []
        for bucket in pool.buckets[k:]:
            for i in bucket:
                chosen.append(i)
                if len(chosen) == n:
                    break
            if len(chosen) == n:
                break
        return [self._take(i, pool.free[i][:k]) for i in chosen]

    def _place_spread(self, g: int, pool: _Pool) -> list[NodeShare]:
        # Most free first: the least loaded nodes, and the most room to even out.
        chosen: list[int] = []
        for bucket in reversed(pool.buckets[1:]):
            for i in bucket:
                chosen.append(i)
                if len(chosen) == g:
                    break
            if len(chosen) == g:
                break
        caps = [len(pool.free[i]) for i in chosen]
        if sum(caps) < g:
            raise RuntimeError(f"scheduler capacity accounting is inconsistent: {sum(caps)} GPUs on the top nodes, {g} needed")
        alloc = [0] * len(chosen)
        remaining = g
        while remaining:  # water-fill: one more GPU to each node that has room, round by round
            for j, cap in enumerate(caps):
                if alloc[j] < cap:
                    alloc[j] += 1
                    remaining -= 1
                    if not remaining:
                        break
        return [self._take(i, pool.free[i][:a]) for i, a in zip(chosen, alloc)]

    # reservations

    def fits_ever(self, job: JobRequest, pool: _Pool) -> bool:
        """Whether the job would fit if every eligible GPU on a schedulable node were free."""
        k = job.gpus_per_node
        if k:
            return pool.nodes_with_exist(k) >= job.gpus // k
        return pool.exist_total >= job.gpus

    def reserve(self, job: JobRequest, pool: _Pool) -> list[int]:
        """Chooses and holds the nodes likeliest to satisfy `job` soonest: the most free first."""
        free, exist = pool.free, pool.exist
        k = job.gpus_per_node
        if k:
            candidates = [i for i, e in enumerate(exist) if e >= k]
            candidates.sort(key=lambda i: (-min(len(free[i]), k), -len(free[i]), i))
            chosen = candidates[: job.gpus // k]
        else:
            candidates = [i for i, e in enumerate(exist) if e]
            candidates.sort(key=lambda i: (-len(free[i]), -exist[i], i))
            chosen, total = [], 0
            for i in candidates:
                chosen.append(i)
                total += exist[i]
                if total >= job.gpus:
                    break
        self.hold(chosen)
        return chosen

    def fits_with_held(self, job: JobRequest, pool: _Pool) -> bool:
        """Whether the job would fit now, by count, if the reserved nodes' free GPUs were open to it."""
        k = job.gpus_per_node
        if k:
            return pool.nodes_with_free(k) + sum(1 for c in pool.held.values() if c >= k) >= job.gpus // k
        return pool.total_free + pool.held_free() >= job.gpus


# --- reasons ------------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_bytes(n: int) -> str:
    unit, name = (_GIB, "GiB") if n >= _GIB else (_MIB, "MiB")
    value = n / unit
    return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"


def _requirements(job: JobRequest) -> str:
    text = ""
    if job.min_memory_per_gpu_bytes > 0:
        text += f" with >= {_fmt_bytes(job.min_memory_per_gpu_bytes)}"
    if job.gpu_model:
        text += f" matching {job.gpu_model!r}"
    return text


def _names(ids: Sequence[str]) -> str:
    if len(ids) <= _MAX_NAMES:
        return ", ".join(ids)
    return f"{', '.join(ids[:_MAX_NAMES])} and {len(ids) - _MAX_NAMES} more"


def _invalid(job: JobRequest) -> str | None:
    if job.gpus <= 0:
        return f"asks for {job.gpus} GPUs; needs at least 1"
    if job.gpus_per_node < 0:
        return f"gpus_per_node is {job.gpus_per_node}; must be 0 (any) or positive"
    if job.gpus_per_node and job.gpus % job.gpus_per_node:
        return f"gpus ({job.gpus}) is not a multiple of gpus_per_node ({job.gpus_per_node})"
    return None


def _capacity_reason(job: JobRequest, pool: _Pool) -> str:
    req = _requirements(job)
    k = job.gpus_per_node
    if k:
        n = job.gpus // k
        free_nodes = pool.nodes_with_free(k) + sum(1 for c in pool.held.values() if c >= k)
        has = "node has" if free_nodes == 1 else "nodes have"
        head = f"needs {_plural(k, 'GPU')} per node on {_plural(n, 'node')}{req}; "
        exist_nodes = pool.nodes_with_exist(k)
        if exist_nodes < n:
            has_all = "node has" if exist_nodes == 1 else "nodes have"
            return head + f"only {exist_nodes} {has_all} {k} at all ({free_nodes} with {k} free)"
        return head + f"only {free_nodes} {has} {k} free"
    free = pool.total_free + pool.held_free()
    return (
        f"needs {_plural(job.gpus, 'GPU')}{req}; {free} {'is' if free == 1 else 'are'} free, "
        f"{pool.exist_total} {'exists' if pool.exist_total == 1 else 'exist'}"
    )


# --- capacity at submit ---------------------------------------------------------------------------------


def request_of_spec(spec) -> JobRequest:
    """The scheduler's view of a submitted JobSpec (gpuorch.v1.JobSpec), before it has an id."""
    return JobRequest(
        job_id="",
        gpus=spec.gpus,
        gpus_per_node=spec.gpus_per_node,
        min_memory_per_gpu_bytes=spec.requirements.min_memory_per_gpu_bytes,
        gpu_model=spec.requirements.gpu_model,
    )


def too_big_for_cluster(job: JobRequest, nodes: Sequence[NodeView]) -> str | None:
    """Why `job` can never run on the known cluster, naming the numbers; None if it could, or if no
    node has registered yet (a coordinator that just started knows nothing of its cluster).

    Capacity is every GPU of every registered node, whatever its state: unhealthy GPUs, drained,
    SUSPECT and DOWN nodes count, because they may come back; only the job's own requirements
    (model, minimum memory, GPUs per node) narrow the pool. So this refuses what no repair or
    resume could ever place, and the scheduler's pending reason covers what waits for capacity.
    """
    if not nodes or job.gpus <= 0 or job.gpus_per_node < 0 or (job.gpus_per_node and job.gpus % job.gpus_per_node):
        return None  # no cluster known yet, or a spec validation will refuse with its own reason
    model = job.gpu_model.lower()
    eligible = [
        sum(
            1
            for g in node.gpus
            if g.memory_total_bytes >= job.min_memory_per_gpu_bytes and (not model or model in g.model.lower())
        )
        for node in nodes
    ]
    total, req, k = sum(eligible), _requirements(job), job.gpus_per_node
    if k:
        wide_enough = sum(1 for count in eligible if count >= k)
        if wide_enough < job.gpus // k:
            widest = max(eligible)
            return (
                f"needs {_plural(k, 'GPU')}{req} per node on {_plural(job.gpus // k, 'node')}, but only {wide_enough} of the "
                f"{_plural(len(nodes), 'known node')} {'has' if wide_enough == 1 else 'have'} {k} (the most on one node is {widest})"
            )
        return None
    if total < job.gpus:
        all_gpus = sum(len(node.gpus) for node in nodes)
        of_which = "" if total == all_gpus else f" of {all_gpus}"
        have = "has" if len(nodes) == 1 else "have"
        such = " such" if req else ""
        return f"needs {_plural(job.gpus, 'GPU')}{req}, but the {_plural(len(nodes), 'known node')} {have} {total}{of_which}{such} GPUs in all"
    return None


# --- elastic sizing and usage --------------------------------------------------------------------------


def elastic_sizes(gpus: int, min_gpus: int, gpus_per_node: int) -> list[int]:
    """World sizes to try, largest first: `gpus` down to `min_gpus`, multiples of gpus_per_node."""
    floor = min_gpus or gpus
    step = gpus_per_node or 1
    return [size for size in range(gpus, floor - 1, -1) if size % step == 0]


def decayed_usage(intervals: Iterable[tuple[str, int, float, float]], now: float, half_life_seconds: float) -> dict[str, float]:
    """Each owner's GPU-seconds from (owner, GPUs, start, end) intervals, each weighted down by how long
    ago it ended (halved every `half_life_seconds`): fair_share's `usage_by_owner`."""
    usage: dict[str, float] = {}
    for owner, gpus, start, end in intervals:
        weight = 0.5 ** (max(0.0, now - end) / half_life_seconds)
        usage[owner] = usage.get(owner, 0.0) + gpus * max(0.0, end - start) * weight
    return usage


# --- the pass -----------------------------------------------------------------------------------------------


def place(job: JobRequest, nodes: Sequence[NodeView], config: SchedulerConfig) -> Decision | None:
    """Places one job alone against the nodes' free capacity (no reservations); None if it does not fit."""
    if _invalid(job):
        return None
    state = _Pass(nodes, config)
    return state.place(job, state.pool_for(job))


def schedule(
    nodes: Sequence[NodeView],
    pending: Sequence[JobRequest],
    config: SchedulerConfig,
    *,
    now: float,
    usage_by_owner: Mapping[str, float] = _NO_USAGE,
) -> SchedulingResult:
    """One scheduling pass: the jobs to start now and where, and why each other job waits.

    `usage_by_owner` (GPU-seconds used, by owner) matters to fair_share only. `now` is
    compared with submit times for `reserve_after_seconds`.
    """
    state = _Pass(nodes, config)
    if config.policy == "fair_share":
        fair = _FairShare(pending, config, usage_by_owner)
        jobs: Iterator[JobRequest] | list[JobRequest] = fair
    else:
        fair = None
        jobs = order_jobs(pending, config)

    placed: list[Decision] = []
    reasons: dict[str, str] = {}
    holder: JobRequest | None = None
    reserved: tuple[str, ...] = ()
    waiting = ""
    cached: dict[tuple, str] = {}

    plain = state.plain
    reserve_after = config.reserve_after_seconds
    for job in jobs:
        g, k = job.gpus, job.gpus_per_node
        if g <= 0 or k < 0 or (k and g % k):
            reasons[job.job_id] = _invalid(job) or ""
            continue
        pool = state.pool_for(job) if job.min_memory_per_gpu_bytes or job.gpu_model else plain
        if pool.total_free >= g:
            decision = state.place(job, pool)
            if decision is not None:
                placed.append(decision)
                if fair is not None:
                    fair.charge(job)
                cached.clear()
                continue
        if (
            holder is None
            and config.reservations
            and (reserve_after <= 0 or now - job.submit_time >= reserve_after)
            and state.fits_ever(job, pool)
        ):
            holder = job
            chosen = state.reserve(job, pool)
            reserved = tuple(state.node_ids[i] for i in chosen)
            so_far = sum(min(pool.held[i], k) for i in chosen) if k else min(pool.held_free(), g)
            reasons[job.job_id] = f"reserving {_names(reserved)}: {so_far} of {g} GPUs free so far"
            waiting = f"waiting behind {job.job_id}, which holds a reservation on {_names(reserved)}"
            cached.clear()
            continue
        # Jobs of one shape wait for the same reason until capacity changes: cheap rejections when full.
        shape = (g, k, job.min_memory_per_gpu_bytes, job.gpu_model)
        reason = cached.get(shape)
        if reason is None:
            if holder is not None and state.fits_with_held(job, pool):
                reason = waiting
            else:
                reason = _capacity_reason(job, pool)
            cached[shape] = reason
        reasons[job.job_id] = reason

    return SchedulingResult(tuple(placed), reasons, holder.job_id if holder else None, reserved)
