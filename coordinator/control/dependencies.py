"""Dependencies between jobs, applied: who waits for whom, judging them as their targets change, and what
a dependent's launch carries (its dependencies' results), with every rank's GPU capacity.

The decisions are coordinator/rules/dependencies.py's; this keeps the index (model/arrays.py) as jobs
change state (`state_changed`, from the manager's queue bookkeeping), judges the jobs whose targets
changed once per scheduling pass (`settle`), and writes what it decided in one store write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from coordinator.model.arrays import ArrayRecord, DependencyIndex
from coordinator.model.jobs import JobEntry
from coordinator.rules import job_machine
from coordinator.rules.dependencies import MAX_DEPENDENCIES, Progress, Verdict, decide, dependency_cycle, outcome
from coordinator.rules.effects import Effect
from coordinator.rules.job_rules import InvalidSpec
from gpuorch.arrays import condition_name
from gpuorch.logs import get_logger
from gpuorch.sharding import DEFAULT_DEVICE_CAPACITY, capacity_of
from gpuorch.v1 import job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = get_logger("coordinator.jobs")

MAX_DEPENDENCY_RESULTS_BYTES = 2 * 1024 * 1024
"""Most bytes of results a launch carries (GPUORCH_DEPENDENCY_RESULTS); beyond, the file says it is truncated and
the rest is read through the SDK (Client.array_results)."""
CONDITIONS = (
    job_pb2.DEPENDENCY_CONDITION_OK,
    job_pb2.DEPENDENCY_CONDITION_FAIL,
    job_pb2.DEPENDENCY_CONDITION_ANY,
)


class DependencyNeverMet(InvalidSpec):
    """A dependency given at submit can already never be met; the message says which and why."""


def targets(job: job_pb2.Job) -> list[str]:
    return [dependency.job_id for dependency in job.spec.after]


class _DependsOn(Mapping[str, list[str]]):
    """Job, task or array id -> the ids it waits for, read from the jobs as the cycle check walks."""

    def __init__(self, jobs: Mapping[str, JobEntry], arrays: Mapping[str, ArrayRecord]) -> None:
        self.jobs, self.arrays = jobs, arrays

    def __getitem__(self, key: str) -> list[str]:
        entry = self.jobs.get(key)
        if entry is None and (record := self.arrays.get(key)) is not None and record.tasks:
            entry = record.tasks[0]  # every task of an array waits for the same
        if entry is None:
            raise KeyError(key)
        return targets(entry.job)

    def __iter__(self) -> Iterator[str]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


class Dependencies:
    def __init__(self, manager: JobManager, arrays: Mapping[str, ArrayRecord]) -> None:
        self.manager = manager
        self.arrays = arrays
        """Array id -> its record (control/arrays.py keeps it)."""
        self.index = DependencyIndex()
        self.capacities: Mapping[str, float] = DEFAULT_DEVICE_CAPACITY
        """GPU model -> relative throughput (the [device_capacity] setting over gpuorch.sharding's table)."""
        self._capacity_by_uuid: tuple[Mapping[str, float], dict[str, float]] = (self.capacities, {})
        """(the table it was read from, GPU uuid -> its capacity): every launch asks it of every GPU it uses, and a
        GPU's model (its name) is the GPU's for life."""

    def progress_of(self, target: str) -> Progress | None:
        """Where a job, task or array stands; None if the coordinator does not know it."""
        record = self.arrays.get(target)
        if record is not None:
            return Progress(
                total=record.size,
                pending=record.count(job_pb2.JOB_STATE_PENDING),
                running=record.count(job_pb2.JOB_STATE_RUNNING),
                succeeded=record.count(job_pb2.JOB_STATE_SUCCEEDED),
                failed=record.count(job_pb2.JOB_STATE_FAILED),
                cancelled=record.count(job_pb2.JOB_STATE_CANCELLED),
                array=True,
            )
        entry = self.manager.jobs.get(target)
        return Progress.of_job(entry.job.state) if entry is not None else None

    def check_at_submit(self, spec: job_pb2.JobSpec, job_id: str) -> None:
        """Refuses (InvalidSpec, naming the entry) dependencies on unknown jobs, ones that can already never be met,
        and any that would close a cycle. Sets an unspecified condition to ok."""
        if len(spec.after) > MAX_DEPENDENCIES:
            raise InvalidSpec(f"spec.after has {len(spec.after)} entries; the limit is {MAX_DEPENDENCIES}")
        for position, dependency in enumerate(spec.after):
            where = f"spec.after[{position}]"
            if dependency.condition == job_pb2.DEPENDENCY_CONDITION_UNSPECIFIED:
                dependency.condition = job_pb2.DEPENDENCY_CONDITION_OK
            if dependency.condition not in CONDITIONS:
                raise InvalidSpec(f"{where}.condition {dependency.condition} is unknown: use ok, fail or any")
            if not dependency.job_id:
                raise InvalidSpec(f"{where}.job_id is empty")
            progress = self.progress_of(dependency.job_id)
            if progress is None:
                raise InvalidSpec(f"{where}: job {dependency.job_id[:128]!r} does not exist")
            result = outcome(dependency.condition, progress)
            if result.verdict is Verdict.NEVER:
                spelled = f"{dependency.job_id}:{condition_name(dependency.condition)}"
                raise DependencyNeverMet(f"{where}: --after {spelled} can never be met: {result.detail}")
        cycle = dependency_cycle(job_id, [d.job_id for d in spec.after], _DependsOn(self.manager.jobs, self.arrays))
        if cycle is not None:
            raise InvalidSpec(f"spec.after would make a cycle: {' -> '.join(cycle)}")

    # -- following the jobs --

    def state_changed(self, entry: JobEntry) -> None:
        """A job was indexed or changed state: a pending dependent with an unmet dependency waits; every job that
        waits for this one (or its array) is judged again at the next pass."""
        job = entry.job
        job_id = job.job_id
        if job.spec.after:
            waiting = job_id in self.index.waiting
            if job.state == job_pb2.JOB_STATE_PENDING and not waiting:
                if not set(targets(job)) <= set(job.dependencies_met):  # a released job that restarts waits no more
                    self.index.add(job_id, targets(job))
            elif job.state != job_pb2.JOB_STATE_PENDING and waiting:
                self.index.remove(job_id, targets(job))
        self.index.changed(job_id)
        if job.HasField("array_task"):
            self.index.changed(job.array_task.array_id)

    def waiting(self, job_id: str) -> bool:
        return job_id in self.index.waiting

    def settle(self) -> None:
        """Judges the waiting jobs whose targets changed: releases those whose every dependency is met and
        cancels those with one that can never be, in one store write; the rest keep waiting with the reason."""
        index = self.index
        if not index.to_check:
            return
        manager = self.manager
        checking, index.to_check = index.to_check, set()
        now = manager.now()
        effects: list[Effect] = []
        for job_id in checking:
            entry = manager.jobs.get(job_id)
            if entry is None or job_id not in index.waiting or entry.job.state != job_pb2.JOB_STATE_PENDING:
                continue
            job = entry.job
            decision = decide(job.spec.after, job.dependencies_met, self.progress_of)
            if decision.met:
                job.dependencies_met.extend(decision.met)
                manager.writes.ask(entry)
            if decision.verdict is Verdict.WAITING:
                job.reason = decision.reason  # in memory: it is rendered again as targets change
                continue
            index.remove(job_id, targets(job))
            if decision.verdict is Verdict.MET:
                job.reason = decision.reason
                manager.writes.ask(entry)
                manager.scheduling.wake.set()
                log.info("dependencies met", job=job_id)
            else:
                log.info("job cancelled: a dependency can never be met", job=job_id, reason=decision.reason)
                effects += job_machine.finish(entry, job_pb2.JOB_STATE_CANCELLED, f"cancelled: {decision.reason}", now)
        manager.apply(effects)  # with the jobs asked for above: one write

    # -- what a launch carries --

    def launches(self, entry: JobEntry) -> list[Effect]:
        """The job rules' launches of the entry's attempt, with every rank's GPU capacity (GPUORCH_DEVICE_CAPACITY,
        GPUORCH_DEVICE_CAPACITIES, for gpuorch.worker.shard) and, for a dependent, its dependencies' results."""
        job, manager = entry.job, self.manager
        if job.state != job_pb2.JOB_STATE_RUNNING:  # nothing launched: the attempt ended before its placement was durable
            return job_machine.launches(entry, manager.machine, manager.cluster.allocations)
        capacities = self._rank_capacities(job.placement)
        results = self.results_document(job) if job.spec.after else ""
        return job_machine.launches(entry, manager.machine, manager.cluster.allocations, capacities, results)

    def _rank_capacities(self, placement: job_pb2.Placement) -> list[float]:
        capacities = [1.0] * placement.world_size
        nodes = self.manager.cluster.nodes
        table, by_uuid = self._capacity_by_uuid
        if table is not self.capacities:
            table, by_uuid = self._capacity_by_uuid = (self.capacities, {})
        for share in placement.nodes:
            first = share.first_rank
            for local, uuid in enumerate(share.device_uuids):
                capacity = by_uuid.get(uuid)
                if capacity is None:
                    node = nodes.get(share.node_id)
                    device = node.devices.get(uuid) if node is not None else None
                    if device is None:
                        continue  # not known (yet): 1.0, not remembered
                    capacity = by_uuid[uuid] = capacity_of(device.info.name, table)
                if first + local < len(capacities):
                    capacities[first + local] = capacity
        return capacities

    def _dependency_jobs(self, job: job_pb2.Job) -> Iterable[JobEntry]:
        for target in targets(job):
            record = self.arrays.get(target)
            if record is not None:
                yield from record.tasks
            elif (entry := self.manager.jobs.get(target)) is not None:
                yield entry

    def results_document(self, job: job_pb2.Job) -> str:
        """GPUORCH_DEPENDENCY_RESULTS: {"dependencies": [...], "results": [{job_id, array_id, index, state,
        result}, ...], "truncated": bool}, at most MAX_DEPENDENCY_RESULTS_BYTES (stored results are JSON objects)."""
        dependencies = [
            {"job_id": dependency.job_id, "condition": condition_name(dependency.condition)} for dependency in job.spec.after
        ]
        parts: list[str] = []
        size, truncated = 0, False
        for entry in self._dependency_jobs(job):
            task = entry.job
            head = json.dumps(
                {
                    "job_id": task.job_id,
                    "array_id": task.array_task.array_id if task.HasField("array_task") else "",
                    "index": task.array_task.index if task.HasField("array_task") else None,
                    "state": job_pb2.JobState.Name(task.state).removeprefix("JOB_STATE_"),
                }
            )
            part = f'{head[:-1]}, "result": {task.result_json or "null"}}}'
            size += len(part) + 2
            if size > MAX_DEPENDENCY_RESULTS_BYTES:
                truncated = True
                break
            parts.append(part)
        return (
            f'{{"dependencies": {json.dumps(dependencies)}, "results": [{", ".join(parts)}], '
            f'"truncated": {json.dumps(truncated)}}}'
        )
