"""The cluster's free capacity during one pass: pools of eligible GPUs by node and free count, and
all-or-nothing gang placement (packed, per node, spread) and reservations against them."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from coordinator.scheduler.types import Decision, GpuView, JobRequest, NodeShare, NodeView, SchedulerConfig

_by_index = attrgetter("index")


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

    def release(self, i: int) -> None:
        """Opens a held node's free GPUs to every job again."""
        count = self.held.pop(i, None)
        if count:
            self.buckets[count][i] = None
            self.total_free += count

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
        node_pools: list[str] = []
        known_pools: set[str] = set()
        self._type_counts: list[dict[tuple[int, str], int]] = []
        self._healthy: list[list[GpuView]] = []
        """Each eligible node's healthy GPUs (for the pools of jobs that exclude some)."""
        free_lists: list[list[GpuView]] = []
        types: set[tuple[int, str]] = set()
        max_per_node = 0
        memory_weight, utilization_weight = config.memory_weight, config.utilization_weight
        threshold, penalty = config.temperature_threshold_celsius, config.temperature_penalty_per_degree
        for node in nodes:
            known_pools.add(node.pool)
            if not node.schedulable:
                continue
            healthy = [g for g in node.gpus if g.healthy]
            if not healthy:
                continue
            self._healthy.append(healthy)
            self.node_ids.append(node.node_id)
            node_pools.append(node.pool)
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
                    fraction = 0.0 if fraction < 0.0 else 1.0 if fraction > 1.0 else fraction
                    util = g.utilization_percent
                    util = 0.0 if util < 0.0 else 100.0 if util > 100.0 else util
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
        self.known_pools = known_pools
        """The pools of every node given, schedulable or not (for pending reasons)."""
        self._node_pools = node_pools
        eligible_pools = set(node_pools)
        self.only_pool: str | None = eligible_pools.pop() if len(eligible_pools) == 1 else None
        """The one pool every eligible node is in, if there is one: `plain` is that pool's capacity. With
        several pools (or none) no job uses `plain`: every job goes through `pool_for`."""
        self._pools: dict[tuple[str | None, frozenset | None, frozenset[str]], _Pool] = {(None, None, frozenset()): self.plain}
        self._pool_of: dict[tuple[int, str, str, frozenset[str]], _Pool] = {}
        if self.only_pool is not None:
            self._pool_of[(0, "", self.only_pool, frozenset())] = self.plain

    # pools

    def pool_for(self, job: JobRequest) -> _Pool:
        """The capacity the job may use: its node pool's nodes only. Requirements that admit the same GPU
        types in the same node pool share a capacity pool."""
        req = (job.min_memory_per_gpu_bytes, job.gpu_model, job.pool, job.excluded_gpus)
        pool = self._pool_of.get(req)
        if pool is None:
            min_memory, model = req[0], req[1].lower()
            eligible = frozenset(t for t in self._types if t[0] >= min_memory and (not model or model in t[1].lower()))
            node_pool = None if job.pool == self.only_pool else job.pool
            key = None if eligible == self._types else eligible
            pool = self._pool_of[req] = self._pool(node_pool, key, job.excluded_gpus)
        return pool

    def _pool(self, node_pool: str | None, key: frozenset | None, excluded: frozenset[str] = frozenset()) -> _Pool:
        """The capacity of the given GPU types (None: all) on the nodes of `node_pool` (None: every node),
        without the `excluded` GPUs; nodes of other pools have no free and no existing GPUs in it."""
        pool = self._pools.get((node_pool, key, excluded))
        if pool is None and excluded:
            pool = self._without(self._pool(node_pool, key), key, excluded)
            self._pools[(node_pool, key, excluded)] = pool
        if pool is None:
            types = self._types if key is None else key
            free: list[list[GpuView]] = []
            exist: list[int] = []
            for counts, gpus, in_pool in zip(self._type_counts, self.plain.free, self._node_pools, strict=True):
                if node_pool is not None and in_pool != node_pool:
                    exist.append(0)
                    free.append([])
                    continue
                eligible = sum(n for gpu_type, n in counts.items() if gpu_type in types)
                exist.append(eligible)
                if eligible == 0 or not gpus:
                    free.append([])
                elif len(counts) == 1:  # a node of one type, all eligible: share the list
                    free.append(gpus)
                else:
                    free.append([g for g in gpus if (g.memory_total_bytes, g.model) in types])
            pool = self._pools[(node_pool, key, excluded)] = _Pool(free, exist, self.max_per_node, self._held)
        return pool

    def _without(self, base: _Pool, key: frozenset | None, excluded: frozenset[str]) -> _Pool:
        """`base` less the excluded GPUs, free or busy (only jobs that exclude some pay for this walk)."""
        free, exist = [], []
        for i, gpus in enumerate(base.free):
            gone = sum(
                1 for g in self._healthy[i] if g.uuid in excluded and (key is None or (g.memory_total_bytes, g.model) in key)
            )
            exist.append(max(0, base.exist[i] - gone) if gone else base.exist[i])
            free.append([g for g in gpus if g.uuid not in excluded] if gone else gpus)
        return _Pool(free, exist, self.max_per_node, self._held)

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

    def release(self, nodes: Sequence[int]) -> None:
        self._held = self._held - frozenset(nodes)
        for pool in self._pools.values():
            for i in nodes:
                pool.release(i)

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
                fit = self._best_fit(remaining, pool)
                if fit is None:  # a node with c >= remaining free exists: unreachable
                    raise RuntimeError(f"scheduler capacity accounting is inconsistent: no node with {remaining} free")
                shares.append(self._take(fit, pool.free[fit][:remaining]))
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
        return [self._take(i, pool.free[i][:a]) for i, a in zip(chosen, alloc, strict=True)]

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
