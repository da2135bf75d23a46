"""Which running jobs a blocked pending job may preempt, and the victims that free its shape of GPUs while
losing the fewest GPU-seconds of work.

A pending job may preempt a running, preemptible job that is not already stopping when
- a priority rule lets it (config.preemption: its priority >= min_priority, the victim's < preempts_below_priority), or
- under las, the victim sits in a later attained-service queue, has no higher priority, and has run at least
  preemption_cost_seconds in its attempt (so that jobs do not thrash), or
- under srtf, the victim's estimated remaining time exceeds the job's by more than preemption_cost_seconds.
The work a victim loses is its GPUs x (now - start_time) (what it ran since its attempt started, if it had not
checkpointed). Selection is greedy (cheapest per freed GPU first, or the cheapest single victim that suffices,
whichever costs less), then drops every victim the rest do without.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from coordinator.scheduler.capacity import _Pool
from coordinator.scheduler.ordering import las_queue, pending_las_queue, pending_remaining, running_attained, running_remaining
from coordinator.scheduler.types import JobRequest, NodeView, Preemption, RunningJob, SchedulerConfig

MAX_SEARCHES_PER_PASS = 16
"""Blocked jobs that look for victims in one pass (failures already seen for a shape do not count); the rest
look in a later pass. Bounds the pass's time."""


class _Candidate:
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
        self.config, self.now, self._nodes = config, now, nodes
        self.enabled = bool(config.preemption) or config.policy in ("las", "srtf")
        self.candidates: list[_Candidate] = []
        self.stopping: dict[int, list[tuple[str, ...]]] = {}
        """Node index -> the GPUs of stopping jobs there (coming free, for whoever needs them first)."""
        self.searches = 0
        self.failed: set[tuple] = set()
        self._eligible: dict[tuple[int, str], frozenset[str]] = {}
        if not self.enabled:
            return
        for job in running:
            if job.stopping:
                for share in job.nodes:
                    i = node_index.get(share.node_id)
                    if i is not None:
                        self.stopping.setdefault(i, []).append(share.gpu_uuids)
            elif job.preemptible:
                self.candidates.append(_Candidate(job, node_index, now, config))

    def _bound(self, job: JobRequest) -> int | None:
        """The priority below which the job may preempt by the rules, if any rule applies."""
        bounds = [rule.preempts_below_priority for rule in self.config.preemption if job.priority >= rule.min_priority]
        return max(bounds) if bounds else None

    def _why(self, job: JobRequest, c: _Candidate, bound: int | None, queue: int, remaining: float) -> str | None:
        victim, config = c.job, self.config
        if bound is not None and victim.priority < bound:
            return f"priority {job.priority} preempts priority {victim.priority}"
        if victim.priority > job.priority:
            return None
        if config.policy == "las" and c.queue > queue and c.ran >= config.preemption_cost_seconds:
            return f"las queue {queue} before queue {c.queue}, {c.attained:.0f} GPU-seconds attained"
        if config.policy == "srtf" and c.remaining > remaining + config.preemption_cost_seconds:
            return f"srtf: {remaining:.0f} s remaining before {c.remaining:.0f} s"
        return None

    def _eligible_uuids(self, job: JobRequest) -> frozenset[str] | None:
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

    def find(self, job: JobRequest, pool: _Pool, closed: frozenset[int]) -> tuple[list[tuple[RunningJob, str]], bool] | None:
        """Victims (each with why) that let `job` fit once they stop, or ([], True) when GPUs already stopping are
        enough for it, or None when preempting cannot make it fit. `closed`: nodes held for another job."""
        if not self.enabled:
            return None
        bound = self._bound(job)
        queue = pending_las_queue(job, self.config, self.now) if self.config.policy == "las" else 0
        remaining = pending_remaining(job, self.config) if self.config.policy == "srtf" else 0.0
        key = (job.gpus, job.gpus_per_node, job.min_memory_per_gpu_bytes, job.gpu_model, job.pool, bound, queue, job.priority)
        if self.config.policy != "srtf" and key in self.failed:
            return None
        if self.searches >= MAX_SEARCHES_PER_PASS:
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
        allowed: list[tuple[_Candidate, str, dict[int, int]]] = []
        for c in self.candidates:
            why = self._why(job, c, bound, queue, remaining)
            if why is None:
                continue
            freed: dict[int, int] = {}
            for i, uuids in c.layout:
                if exist[i] and i not in closed:
                    n = count(uuids)
                    if n:
                        freed[i] = freed.get(i, 0) + n
            if freed:
                allowed.append((c, why, freed))
        chosen = self._choose(job, have, exist, allowed)
        if chosen is None:
            self.failed.add(key)
            return None
        if not chosen:
            for i in list(self.stopping):  # the stopping GPUs are this job's now, not the next one's
                if exist[i] and i not in closed:
                    del self.stopping[i]
            return [], True
        return [(c.job, why) for c, why, _ in chosen], False

    def _choose(self, job: JobRequest, have: list[int], exist: list[int], allowed: list) -> list | None:
        g, k = job.gpus, job.gpus_per_node
        if k:
            n = g // k

            def satisfied(picked: list) -> bool:
                freed: dict[int, int] = {}
                for _, _, f in picked:
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
                picked, got = [], 0
                for entry in sorted(by_node.get(i, ()), key=lambda en: (en[0].cost / en[2][i], en[0].cost)):
                    picked.append(entry)
                    got += entry[2][i]
                    if got >= deficit:
                        options.append((sum(en[0].cost for en in picked), i, picked))
                        break
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
                return sum(sum(f.values()) for _, _, f in picked) >= need

            if need <= 0:
                return []
            if sum(sum(f.values()) for _, _, f in allowed) < need:
                return None
            greedy, got = [], 0
            for entry in sorted(allowed, key=lambda en: (en[0].cost / sum(en[2].values()), en[0].cost)):
                greedy.append(entry)
                got += sum(entry[2].values())
                if got >= need:
                    break
            singles = [en for en in allowed if sum(en[2].values()) >= need]
            single = min(singles, key=lambda en: en[0].cost, default=None)
            chosen = greedy
            if single is not None and single[0].cost < sum(en[0].cost for en in greedy):
                chosen = [single]
        if not satisfied(chosen):
            return None
        for entry in sorted(chosen, key=lambda en: -en[0].cost):  # drop every victim the others do without
            rest = [en for en in chosen if en is not entry]
            if satisfied(rest):
                chosen = rest
        return chosen

    def take(self, victims: Iterable[RunningJob]) -> None:
        gone = {v.job_id for v in victims}
        self.candidates = [c for c in self.candidates if c.job.job_id not in gone]


def preemption_records(job: JobRequest, victims: Sequence[tuple[RunningJob, str]]) -> tuple[Preemption, ...]:
    return tuple(Preemption(v.job_id, job.job_id, f"preempted for {job.job_id} ({why})") for v, why in victims)
