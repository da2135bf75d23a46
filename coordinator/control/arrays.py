"""Job arrays and dependent jobs, applied: submit (an array's tasks in one store write), the scheduling
pass's gate (a task over its array's cap, a job whose dependencies are not met), results, and the
array-level API (view, list, cancel, priority, watch).

The job manager calls in at a few places only: `state_changed` from its queue bookkeeping, `gate`
and `before_pass` from the scheduling pass, `launches` when a placement is sent, `record_result` when
a rank's end arrives. The rules are coordinator/rules/arrays.py and coordinator/rules/dependencies.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Reversible
from typing import TYPE_CHECKING

from coordinator.control.dependencies import Dependencies
from coordinator.model.arrays import ArrayRecord
from coordinator.model.jobs import FINAL_STATES, JobEntry, job_page
from coordinator.rules import arrays as array_rules
from coordinator.rules import job_machine, job_rules
from coordinator.rules.effects import Effect
from coordinator.rules.quotas import pending_quota_problem
from gpuorch.arrays import MAX_RESULT_BYTES, array_indexes, array_problem
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2, job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = get_logger("coordinator.jobs")

QUEUED = "queued; waiting for the scheduler"


class ArrayFinished(ValueError):
    """Every task of the array is already final."""


class _Listing(Reversible[JobEntry]):
    """The jobs for ListJobs, newest first: an array's tasks folded into its view, at its first task's place."""

    def __init__(self, jobs: dict[str, JobEntry], arrays: Arrays) -> None:
        self.jobs, self.arrays = jobs, arrays

    def __reversed__(self) -> Iterator[JobEntry]:
        of_task = self.arrays.task_array
        for entry in reversed(self.jobs.values()):
            record = of_task.get(entry.job.job_id)
            if record is None:
                yield entry
            elif record.tasks[0] is entry:
                yield JobEntry(entry.sequence, array_rules.view(record))

    def __iter__(self) -> Iterator[JobEntry]:
        return reversed(list(reversed(self)))


class Arrays:
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self.records: dict[str, ArrayRecord] = {}
        """Array id -> its tasks and counts."""
        self.task_array: dict[str, ArrayRecord] = {}
        """Task id -> its array."""
        self.capped: set[str] = set()
        """Ids of the tasks of arrays with a cap (the scheduling pass asks `gate` of these, and of dependents)."""
        self.dependencies = Dependencies(manager, self.records)
        self.watchers: dict[str, set[asyncio.Queue[job_pb2.Job]]] = {}
        self._budgets: dict[str, int] = {}
        """Array id -> how many more of its tasks this pass may consider (its cap less those running)."""

    # -- submit --

    async def submit(self, spec: job_pb2.JobSpec, client_request_id: str = "") -> str:
        """Any submission: an array's tasks indexed and stored in one write, dependencies checked; returns the
        job's (or array's) id. Raises job_rules.InvalidSpec, control.job_manager.QuotaExceeded."""
        manager = self.manager
        known = manager.by_request_id.get((spec.owner, client_request_id)) if client_request_id else None
        if known is not None:
            return known.job.array_task.array_id or known.job.job_id
        if not spec.HasField("array") and not spec.after:
            return await manager.submit(spec, client_request_id)
        spec = job_rules.normalized(spec)
        job_rules.validate_spec(spec)
        self.dependencies.check_at_submit(spec, job_id="")
        if not spec.HasField("array"):
            return await manager.submit(spec, client_request_id)
        return await self._submit_array(spec, client_request_id)

    async def _submit_array(self, spec: job_pb2.JobSpec, client_request_id: str) -> str:
        from coordinator.control.job_manager import QuotaExceeded  # the manager imports this module

        manager = self.manager
        problem = array_problem(spec.array)
        if problem:
            raise job_rules.InvalidSpec(f"spec.array: {problem}")
        size = len(array_indexes(spec.array))
        pending = dict(manager.pending_by_owner)
        pending[spec.owner] = pending.get(spec.owner, 0) + max(size - 1, 0)  # as if all but one were queued already
        over_quota = pending_quota_problem(manager.quotas, spec.owner, pending, manager.max_pending_jobs_per_user)
        if over_quota is not None:
            raise QuotaExceeded(f"an array of {size} tasks counts as {size} pending jobs: {over_quota}")
        first = next(manager._sequence)  # the tasks take `size` consecutive sequences, as if submitted one by one
        array_id = job_rules.new_job_id(first)
        jobs = array_rules.task_jobs(spec, array_id, job_machine.stamp(manager.clock.wall()), QUEUED)
        for _ in range(len(jobs) - 1):
            next(manager._sequence)
        entries = [
            JobEntry(first + position, job, client_request_id if position == 0 else "") for position, job in enumerate(jobs)
        ]
        record = self.records[array_id] = ArrayRecord(array_id, spec.array.max_running, tasks=entries)
        for entry in entries:
            manager._index(entry)  # the manager's one way in for a new job, here for N at once
        manager.scheduling.wake.set()
        await manager.save(entries)
        log.info("array submitted", array=array_id, tasks=record.size, max_running=record.max_running, owner=spec.owner)
        return array_id

    # -- following the tasks --

    def state_changed(self, entry: JobEntry) -> None:
        """A job was indexed (submitted or restored) or changed state."""
        job = entry.job
        self.dependencies.state_changed(entry)
        if not job.HasField("array_task"):
            return
        task = job.array_task
        record = self.task_array.get(job.job_id)
        if record is None:
            record = self.records.get(task.array_id)
            if record is None:  # restoring: the tasks come in order
                record = self.records[task.array_id] = ArrayRecord(task.array_id, task.max_running)
            if len(record.tasks) <= task.position:
                record.tasks.append(entry)
            self.task_array[job.job_id] = record
            if record.max_running:
                self.capped.add(job.job_id)
        if record.recount(job.job_id, job.state) and record.array_id in self.watchers:
            snapshot = array_rules.view(record)
            for watcher in self.watchers[record.array_id]:
                watcher.put_nowait(snapshot)

    # -- memory: an array's tasks leave it together --

    def may_leave_memory(self, entry: JobEntry) -> bool:
        """Whether an ended job may leave memory: any job but a task of an array with a task not final yet."""
        record = self.task_array.get(entry.job.job_id)
        return record is None or _all_final(record, entry)

    def ended_together(self, entry: JobEntry) -> list[JobEntry]:
        """The jobs that may leave memory now that `entry` ended: itself; none while its array has a task not
        final; every task of its array when it is the last to end."""
        record = self.task_array.get(entry.job.job_id)
        if record is None:
            return [entry]
        return list(record.tasks) if _all_final(record, entry) else []

    def forget(self, entry: JobEntry) -> None:
        """A job left memory (control/job_history.py): an array whose tasks have all left is forgotten too."""
        record = self.task_array.pop(entry.job.job_id, None)
        if record is None:
            return
        self.capped.discard(entry.job.job_id)
        record.counted.pop(entry.job.job_id, None)  # the tasks still in memory: the record goes with the last
        if not record.counted:
            self.records.pop(record.array_id, None)
            self.watchers.pop(record.array_id, None)

    # -- the scheduling pass --

    def before_pass(self) -> None:
        """Judges the dependents whose targets changed (releasing or cancelling them); the caps count afresh."""
        self._budgets.clear()
        self.dependencies.settle()

    def gates_any(self) -> bool:
        """Whether any pending job is capped or waits for dependencies (else `gated` is False for every job)."""
        return bool(self.capped) or bool(self.dependencies.index.waiting)

    def gated(self, job_id: str) -> bool:
        """Whether the pass must ask `gate` of this pending job (cheap: most jobs are neither)."""
        return job_id in self.capped or self.dependencies.waiting(job_id)

    def gate(self, entry: JobEntry) -> bool:
        """True when the pending job may not be considered in this pass: a dependency is not met (its reason says
        which), or its array runs as many tasks as its cap allows (counting those this pass may place)."""
        job = entry.job
        if self.dependencies.waiting(job.job_id):
            return True
        record = self.task_array.get(job.job_id)
        if record is None or not record.max_running:
            return False
        left = self._budgets.get(record.array_id)
        if left is None:
            left = record.max_running - record.running
        if left <= 0:
            reason = array_rules.cap_reason(record)
            if job.reason != reason:
                job.reason = reason
            return True
        self._budgets[record.array_id] = left - 1
        return False

    def launches(self, entry: JobEntry) -> list[Effect]:
        return self.dependencies.launches(entry)

    # -- results --

    def record_result(self, entry: JobEntry | None, status: agent_pb2.TaskStatus) -> None:
        """Keeps a rank's reported result with its job (saved with the job's next write, its end's at the latest):
        rank 0's, else the first rank's to report; only from the current attempt, only a JSON object <= 64 KiB."""
        if entry is None or not status.result_json or status.attempt != entry.job.attempt:
            return
        if status.rank != 0 and entry.job.result_json:
            return
        try:
            value = json.loads(status.result_json)
        except ValueError:
            value = None
        if not isinstance(value, dict) or len(status.result_json.encode()) > MAX_RESULT_BYTES:
            log.warning("result refused: not a JSON object of at most 64 KiB", job=entry.job.job_id, rank=status.rank)
            return
        entry.job.result_json = status.result_json

    # -- the array as a whole --

    def view(self, array_id: str) -> job_pb2.Job | None:
        """The array's own view (rules/arrays.view), or None if `array_id` names no array."""
        record = self.records.get(array_id)
        return array_rules.view(record) if record is not None and record.tasks else None

    def owner_of(self, array_id: str) -> str:
        return self.records[array_id].tasks[0].job.spec.owner

    def listed(self) -> Reversible[JobEntry]:
        """What ListJobs pages through by default: every job, an array's tasks folded into its view."""
        return _Listing(self.manager.jobs, self) if self.records else self.manager.jobs.values()

    def list_tasks(
        self, states: Iterable[int], owner: str, page_size: int, page_token: str, max_bytes: int, array_id: str = ""
    ) -> tuple[list[job_pb2.Job], str]:
        """ListJobs with `tasks` or `array_id`: every job with each task on its own, or only one array's tasks."""
        if array_id:
            record = self.records.get(array_id)
            entries: Reversible[JobEntry] = record.tasks if record is not None else []
        else:
            entries = self.manager.jobs.values()
        return job_page(entries, states, owner, page_size, page_token, max_bytes)

    async def cancel(self, array_id: str) -> job_pb2.Job:
        """Cancels every task not final yet, in one write; ArrayFinished if there is none."""
        manager = self.manager
        record = self.records[array_id]
        live = [entry for entry in record.tasks if not entry.final]
        if not live:
            raise ArrayFinished(f"every task of array {array_id} is already final")
        now = manager.now()
        effects: list[Effect] = []
        for entry in live:
            effects += job_machine.cancel(entry, now, manager.machine)
        write = manager.apply(effects)
        if write is not None:
            await write
        log.info("array cancelled", array=array_id, tasks=len(live))
        return array_rules.view(record)

    async def set_priority(self, array_id: str, priority: int) -> job_pb2.Job:
        """Sets the priority of every task not final yet, in one write; ArrayFinished if there is none."""
        manager = self.manager
        record = self.records[array_id]
        live = [entry for entry in record.tasks if not entry.final]
        if not live:
            raise ArrayFinished(f"every task of array {array_id} is already final")
        for entry in live:
            entry.job.spec.priority = priority
            manager.scheduling.request_changed(entry.job.job_id)
        manager.scheduling.wake.set()
        await manager.save(live)
        return array_rules.view(record)

    async def watch(self, array_id: str) -> AsyncIterator[job_pb2.Job]:
        """The array's view now, then after every change of a task's state, until every task is final."""
        record = self.records[array_id]
        updates: asyncio.Queue[job_pb2.Job] = asyncio.Queue()
        watchers = self.watchers.setdefault(array_id, set())
        watchers.add(updates)
        try:
            snapshot = array_rules.view(record)
            yield snapshot
            while snapshot.state not in FINAL_STATES:
                snapshot = await updates.get()
                yield snapshot
        finally:
            watchers.discard(updates)
            if not watchers:
                self.watchers.pop(array_id, None)


def _all_final(record: ArrayRecord, entry: JobEntry) -> bool:
    """Every task of the array (its whole size, not only the tasks indexed so far) is in a final state."""
    final = sum(record.count(state) for state in FINAL_STATES)
    return final >= max(entry.job.array_task.size, record.size)
