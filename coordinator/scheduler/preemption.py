"""Which running jobs a blocked pending job may preempt, and the victims that free its shape of GPUs while
losing the fewest GPU-seconds of work.

A pending job may preempt a running, preemptible job that is not already stopping when
- a priority rule lets it (config.preemption: its priority >= min_priority, the victim's < preempts_below_priority), or
- under las, the victim sits in a later attained-service queue (the job's own by its service, not promoted),
  has no higher priority, and has run at least las_min_run_seconds (and preemption_cost_seconds) in its attempt,
  so that a resumed job makes progress before it can be preempted again, or
- under srtf, the victim's estimated remaining time exceeds the job's by more than preemption_cost_seconds.
The work a victim loses is its GPUs x (now - start_time) (what it ran since its attempt started, if it had not
checkpointed). Selection is greedy (cheapest per freed GPU first, or the cheapest single victim that suffices,
whichever costs less), then drops every victim the rest do without.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from coordinator.scheduler.capacity import _Pool
from coordinator.scheduler.ordering import las_queue, pending_remaining, running_attained, running_remaining
from coordinator.scheduler.types import JobRequest, NodeView, Preemption, RunningJob, SchedulerConfig

MAX_SEARCHES_PER_PASS = 8
"""Blocked jobs that look for victims in one pass (failures already seen for a shape do not count); the rest
look in a later pass. Bounds the pass's time."""


class _Candidate:
    """A running job that may be preempted, with what the choice needs of it (built for jobs that pass the
    cheap checks only: a pass may see thousands of running jobs)."""

    __slots__ = ("attained", "cost", "job", "layout", "queue", "ran", "remaining")

    def __init__(self, job: RunningJob, node_index: dict[str, int], now: float, config: SchedulerConfig) -> None:
        self.job = job
        self.ran = max(0.0, now - job.start_time)
        self.cost = job.gpus * self.ran
        self.attained = running_attained(job, now)
        self.queue = las_queue(self.attained, config)
        self.remaining = running_remaining(job, now, config) if config.policy == "srtf" else 0.0
        self.layout = [(node_index[s.node_id], s.gpu_uuids) for s in job.nodes if s.node_id in node_index]


class _Preemptor:
    """The pass's preemption candidates; `find` chooses victims for one blocked job, `take` commits them."""

    def __init__(
        self,
        running: Sequence[RunningJob],
        nodes: Sequence[NodeView],
        node_index: dict[str, int],
        config: SchedulerConfig,
        now: float,
    ) -> None:
        self.config, self.now, self._nodes, self._node_index = config, now, nodes, node_index
        self.policy = config.policy if config.policy in ("las", "srtf") else ""
        self.jobs = sorted((job for job in running if job.preemptible and not job.stopping), key=_youngest_first)
        """Youngest first: a victim's cost per GPU is the time it has run, so the cheapest per GPU come first."""
        self._candidates: dict[str, _Candidate] = {}
        self._by_queue: dict[int, list[_Candidate]] | None = None
        self.gone: set[str] = set()
        """Victims chosen this pass."""
        self.stopping: dict[int, list[tuple[str, ...]]] = {}
        """Node index -> the GPUs of stopping jobs there (coming free, for whoever needs them first)."""
        self.searches = 0
        self.failed: set[tuple] = set()
        self._eligible: dict[tuple[int, str], frozenset[str]] = {}
        for job in running:
            if job.stopping:
                for share in job.nodes:
                    i = node_index.get(share.node_id)
                    if i is not None:
                        self.stopping.setdefault(i, []).append(share.gpu_uuids)

    def bound(self, job: JobRequest) -> int | None:
        """The priority below which the job may preempt by the rules, if any rule applies."""
        bounds = [rule.preempts_below_priority for rule in self.config.preemption if job.priority >= rule.min_priority]
        return max(bounds) if bounds else None

    def may_search(self, job: JobRequest) -> bool:
        """Cheap: whether looking for victims for this job is allowed at all now."""
        return self.searches < MAX_SEARCHES_PER_PASS and bool(self.policy or self.bound(job) is not None)

    def _candidate(self, job: RunningJob) -> _Candidate:
        c = self._candidates.get(job.job_id)
        if c is None:
            c = self._candidates[job.job_id] = _Candidate(job, self._node_index, self.now, self.config)
        return c

    def _allowed(self, job: JobRequest, bound: int | None, queue: int, remaining: float) -> Iterator[tuple[_Candidate, tuple]]:
        """The candidates this job may preempt, each with why (see _why_text), cheapest per GPU first (by rule,
        then by policy)."""
        if bound is not None:
            for victim in self.jobs:
                if victim.priority < bound:
                    yield self._candidate(victim), ("priority", job.priority, victim.priority)
        if not self.policy:
            return
        by_queue = self._policy_candidates()
        gone, min_ran = self.gone, self.config.preemption_cost_seconds
        for q in sorted(by_queue) if self.policy == "las" else [0]:
            if self.policy == "las" and q <= queue:
                continue
            for c in by_queue[q]:
                victim = c.job
                if victim.job_id in gone or victim.priority > job.priority or (bound is not None and victim.priority < bound):
                    continue
                if self.policy == "las":
                    yield c, ("las", queue, q, c.attained)
                elif c.remaining > remaining + min_ran:
                    yield c, ("srtf", remaining, c.remaining)

    def _policy_candidates(self) -> dict[int, list[_Candidate]]:
        """las: the candidates that ran at least preemption_cost_seconds, by queue (youngest first); srtf: all, as
        queue 0. Built once per pass: a blocked job looks only at the queues after its own."""
        if self._by_queue is None:
            self._by_queue = {}
            config = self.config
            min_ran = max(config.las_min_run_seconds, config.preemption_cost_seconds) if self.policy == "las" else 0.0
            for victim in self.jobs:
                if self.now - victim.start_time >= min_ran:
                    c = self._candidate(victim)
                    self._by_queue.setdefault(c.queue if self.policy == "las" else 0, []).append(c)
        return self._by_queue

    def _eligible_uuids(self, job: JobRequest) -> frozenset[str] | None:
        if job.excluded_gpus:
            every = self._eligible_by_model(replace(job, excluded_gpus=frozenset()))
            return (every or frozenset(g.uuid for node in self._nodes for g in node.gpus)) - job.excluded_gpus
        return self._eligible_by_model(job)

    def _eligible_by_model(self, job: JobRequest) -> frozenset[str] | None:
        if not job.min_memory_per_gpu_bytes and not job.gpu_model:
            return None
        key = (job.min_memory_per_gpu_bytes, job.gpu_model.lower())
        found = self._eligible.get(key)
        if found is None:
            found = self._eligible[key] = frozenset(
                g.uuid
                for node in self._nodes
                for g in node.gpus
                if g.memory_total_bytes >= key[0] and (not key[1] or key[1] in g.model.lower())
            )
        return found

    def find(
        self, job: JobRequest, pool: _Pool, closed: frozenset[int]
    ) -> tuple[list[tuple[RunningJob, str]], bool, list[int]] | None:
        """Victims (each with why) that let `job` fit once they stop, or ([], True, ...) when GPUs already stopping
        are enough for it, with the nodes it will use; None when preempting cannot make it fit. `closed`: nodes
        held for another job."""
        if not self.may_search(job):
            return None
        bound = self.bound(job)
        # By attained service alone: a job promoted for having starved goes first in order (and so gets the
        # next free GPUs and the reservation), but preempts only as its service says; else promoted jobs,
        # once preempted, would promote and preempt in turn.
        queue = las_queue(job.attained_service_seconds, self.config) if self.policy == "las" else 0
        remaining = pending_remaining(job, self.config) if self.policy == "srtf" else 0.0
        key = (job.gpus, job.gpus_per_node, job.min_memory_per_gpu_bytes, job.gpu_model, job.pool, bound, queue, job.priority,
               job.excluded_gpus)  # fmt: skip
        if self.policy != "srtf" and key in self.failed:
            return None
        self.searches += 1
        eligible = self._eligible_uuids(job)
        exist = pool.exist

        def count(uuids: Iterable[str]) -> int:
            return sum(1 for u in uuids if u in eligible) if eligible is not None else len(tuple(uuids))

        have = [0 if i in closed else len(free) for i, free in enumerate(pool.free)]
        for i, groups in self.stopping.items():
            if exist[i] and i not in closed:
                have[i] += sum(count(u) for u in groups)
        allowed: list[tuple[_Candidate, tuple, dict[int, int], int]] = []
        per_node = job.gpus_per_node > 0
        # Any shape: once the cheapest per GPU cover what is missing twice over (and a few more), a costlier
        # victim could only be the single one that suffices alone; the scan stops there. A shape per node scans all.
        missing, collected = job.gpus - sum(h for i, h in enumerate(have) if exist[i]), 0
        for c, why in self._allowed(job, bound, queue, remaining):
            if not per_node and collected >= 2 * missing and len(allowed) >= _ENOUGH_ENTRIES:
                break
            freed: dict[int, int] = {}
            total = 0
            for i, uuids in c.layout:
                if exist[i] and i not in closed:
                    n = count(uuids)
                    if n and per_node:
                        freed[i] = freed.get(i, 0) + n
                    total += n
            if total:
                allowed.append((c, why, freed, total))
                collected += total
        chosen = self._choose(job, have, exist, allowed)
        if chosen is None:
            self.failed.add(key)
            return None
        nodes = self._nodes_used(job, pool, have, chosen, closed)
        if not chosen:
            for i in list(self.stopping):  # the stopping GPUs are this job's now, not the next one's
                if exist[i] and i not in closed:
                    del self.stopping[i]
            return [], True, nodes
        return [(c.job, _why_text(why)) for c, why, _, _ in chosen], False, nodes

    def _nodes_used(self, job: JobRequest, pool: _Pool, have: list[int], chosen: list, closed: frozenset[int]) -> list[int]:
        """The nodes the job will start on once its victims (or the jobs already stopping) have stopped: held
        for it, so that nothing else takes the free GPUs it counts on (else two jobs could preempt in turn)."""
        exist, free = pool.exist, pool.free
        freed: dict[int, int] = {}
        for c, _, _, _ in chosen:
            for i, uuids in c.layout:
                if exist[i] and i not in closed:
                    freed[i] = freed.get(i, 0) + len(uuids)
        k = job.gpus_per_node
        if not k:
            return sorted(i for i in range(len(exist)) if exist[i] and (have[i] > 0 or i in freed))
        ready = [i for i, e in enumerate(exist) if e >= k and have[i] + freed.get(i, 0) >= k]
        ready.sort(key=lambda i: (-freed.get(i, 0), -(have[i] - len(free[i])), i))  # victims' and stopping nodes first
        return sorted(ready[: job.gpus // k])

    def _choose(self, job: JobRequest, have: list[int], exist: list[int], allowed: list) -> list | None:
        g, k = job.gpus, job.gpus_per_node
        if k:
            n = g // k

            def satisfied(picked: list) -> bool:
                freed: dict[int, int] = {}
                for _, _, f, _ in picked:
                    for i, m in f.items():
                        freed[i] = freed.get(i, 0) + m
                return sum(1 for i, e in enumerate(exist) if e >= k and have[i] + freed.get(i, 0) >= k) >= n

            if satisfied([]):
                return []
            by_node: dict[int, list] = {}
            for entry in allowed:
                for i in entry[2]:
                    by_node.setdefault(i, []).append(entry)
            options: list[tuple[float, int, list]] = []
            for i, e in enumerate(exist):
                if e < k:
                    continue
                deficit = k - have[i]
                if deficit <= 0:
                    options.append((0.0, i, []))
                    continue
                picked = _cover(by_node.get(i, []), deficit, partial(_on_node, i))
                if picked is not None:
                    options.append((sum(en[0].cost for en in picked), i, picked))
            if len(options) < n:
                return None
            options.sort(key=lambda o: (o[0], o[1]))
            union: dict[int, tuple] = {}
            for _, _, picked in options[:n]:
                for entry in picked:
                    union[id(entry)] = entry
            chosen = list(union.values())
        else:
            need = g - sum(h for i, h in enumerate(have) if exist[i])

            def satisfied(picked: list) -> bool:
                return sum(en[3] for en in picked) >= need

            if need <= 0:
                return []
            picked = _cover(allowed, need, _total)
            if picked is None:
                return None
            chosen = picked
        if not satisfied(chosen):
            return None
        for entry in sorted(chosen, key=lambda en: -en[0].cost):  # drop every victim the others do without
            rest = [en for en in chosen if en is not entry]
            if satisfied(rest):
                chosen = rest
        return chosen

    def take(self, victims: Iterable[RunningJob]) -> None:
        gone = {v.job_id for v in victims}
        self.gone |= gone
        self.jobs = [job for job in self.jobs if job.job_id not in gone]


_COVER_SHORTLIST = 64
_ENOUGH_ENTRIES = 16


def _youngest_first(job: RunningJob) -> float:
    return -job.start_time


def _on_node(i: int, entry: tuple) -> int:
    return entry[2][i]


def _total(entry: tuple) -> int:
    return entry[3]


def _why_text(why: tuple) -> str:
    if why[0] == "priority":
        return f"priority {why[1]} preempts priority {why[2]}"
    if why[0] == "las":
        return f"las queue {why[1]} before queue {why[2]}, {why[3]:.0f} GPU-seconds attained"
    return f"srtf: {why[1]:.0f} s remaining before {why[2]:.0f} s"


def _cover(entries: list, need: int, size: Callable[[Any], int]) -> list | None:
    """Victims freeing at least `need` GPUs at a low cost: greedy on cost per GPU that still counts (a victim
    freeing more than is missing counts only what is missing), over the cheapest per GPU and the cheapest
    outright; then the cheapest single victim that suffices, if it costs less. None if all together fall short."""
    if sum(size(en) for en in entries) < need:
        return None
    shortlist = {id(en): en for en in heapq.nsmallest(_COVER_SHORTLIST, entries, key=lambda en: en[0].cost / size(en))}
    shortlist.update((id(en), en) for en in heapq.nsmallest(_COVER_SHORTLIST, entries, key=lambda en: en[0].cost))
    left, picked, missing = list(shortlist.values()), [], need
    while missing > 0 and left:
        best = min(left, key=lambda en: (en[0].cost / min(size(en), missing), -size(en)))
        left.remove(best)
        picked.append(best)
        missing -= size(best)
    if missing > 0:
        picked = sorted(entries, key=lambda en: en[0].cost / size(en))  # the shortlist fell short: all, cheapest first
    single = min((en for en in entries if size(en) >= need), key=lambda en: en[0].cost, default=None)
    if single is not None and single[0].cost < sum(en[0].cost for en in picked):
        return [single]
    return picked


def preemption_records(job: JobRequest, victims: Sequence[tuple[RunningJob, str]]) -> tuple[Preemption, ...]:
    return tuple(Preemption(v.job_id, job.job_id, f"preempted for {job.job_id} ({why})") for v, why in victims)
