"""Job arrays and dependencies as the coordinator holds them in memory: plain data, no I/O.

An array's tasks are ordinary jobs (each a `JobEntry` with Job.array_task set, stored whole like any
job); what is kept here is rebuilt from them at start-up: which tasks make each array, how many are in
each state, and which jobs wait for which. The rules that read it are coordinator/rules/dependencies.py
and coordinator/rules/arrays.py; control/arrays.py and control/dependencies.py keep it up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.model.jobs import JobEntry
from gpuorch.v1 import job_pb2


@dataclass(eq=False)
class ArrayRecord:
    """One job array: its tasks in index order and how many are in each state."""

    array_id: str
    max_running: int
    tasks: list[JobEntry] = field(default_factory=list)
    """By position (index order); a slot is filled as the task is indexed."""
    counts: dict[int, int] = field(default_factory=dict)
    """JobState -> how many tasks are in it."""
    counted: dict[str, int] = field(default_factory=dict)
    """Task id -> the state it is counted in."""

    def count(self, state: int) -> int:
        return self.counts.get(state, 0)

    @property
    def size(self) -> int:
        return len(self.tasks)

    @property
    def running(self) -> int:
        return self.count(job_pb2.JOB_STATE_RUNNING)

    def recount(self, job_id: str, state: int) -> bool:
        """Moves the task to `state` in the counts; False when it was counted there already."""
        before = self.counted.get(job_id)
        if before == state:
            return False
        if before is not None:
            self.counts[before] -= 1
        self.counts[state] = self.counts.get(state, 0) + 1
        self.counted[job_id] = state
        return True


@dataclass
class DependencyIndex:
    """Who waits for whom."""

    dependents: dict[str, set[str]] = field(default_factory=dict)
    """A job, task or array id -> the ids of the pending jobs whose spec.after names it."""
    waiting: set[str] = field(default_factory=set)
    """Pending jobs with a dependency not met yet: the scheduling pass holds them."""
    to_check: set[str] = field(default_factory=set)
    """Waiting jobs to judge again at the next pass (a target of theirs changed, or they are new)."""

    def add(self, job_id: str, targets: list[str]) -> None:
        self.waiting.add(job_id)
        self.to_check.add(job_id)
        for target in targets:
            self.dependents.setdefault(target, set()).add(job_id)

    def remove(self, job_id: str, targets: list[str]) -> None:
        self.waiting.discard(job_id)
        self.to_check.discard(job_id)
        for target in targets:
            waiting = self.dependents.get(target)
            if waiting is not None:
                waiting.discard(job_id)
                if not waiting:
                    del self.dependents[target]

    def changed(self, target: str) -> None:
        """The target's state changed: its dependents are judged again at the next pass."""
        self.to_check.update(self.dependents.get(target, ()))
