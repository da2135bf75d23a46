"""Pure rules of job dependencies (JobSpec.after): when one is met, when it can never be, what a waiting
job's reason says, and the cycle check at submit.

A dependency names a job, an array task, or a whole array (then it is done when every task is). Its
target is summed up as a `Progress` (one job is an array of one), and the rules read only that:

    condition  met when                              never met once
    ok         every task SUCCEEDED                  a task FAILED or was CANCELLED
    fail       every task ended, one not SUCCEEDED   every task SUCCEEDED
    any        every task ended                      (always met in the end)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpuorch.arrays import condition_name
from gpuorch.v1 import job_pb2

MAX_DEPENDENCIES = 64
"""Most entries one job's spec.after may have."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a dependency's target stands: one job (total 1) or every task of an array."""

    total: int
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    array: bool = False

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @classmethod
    def of_job(cls, state: int) -> Progress:
        return cls(
            total=1,
            pending=int(state == job_pb2.JOB_STATE_PENDING),
            running=int(state == job_pb2.JOB_STATE_RUNNING),
            succeeded=int(state == job_pb2.JOB_STATE_SUCCEEDED),
            failed=int(state == job_pb2.JOB_STATE_FAILED),
            cancelled=int(state == job_pb2.JOB_STATE_CANCELLED),
        )


class Verdict(enum.Enum):
    """What one dependency says now. WAITING: not yet decided; MET: its condition holds (for good);
    NEVER: its condition can no longer come true."""

    WAITING = "waiting"
    MET = "met"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    detail: str
    """For people: where the target stands ("running", "3 of 6 tasks ended"), or why it can never be met."""


def _standing(progress: Progress) -> str:
    if not progress.array:
        for name, count in (
            ("pending", progress.pending),
            ("running", progress.running),
            ("SUCCEEDED", progress.succeeded),
            ("FAILED", progress.failed),
            ("CANCELLED", progress.cancelled),
        ):
            if count:
                return name
        return "unknown"
    parts = [f"{count} {name}" for name, count in (("running", progress.running), ("pending", progress.pending)) if count]
    return f"{progress.ended} of {progress.total} tasks ended" + (f" ({', '.join(parts)})" if parts else "")


def outcome(condition: int, progress: Progress) -> Outcome:
    """What a dependency with this condition says of a target that stands at `progress`."""
    done = progress.ended == progress.total
    unsuccessful = progress.failed + progress.cancelled
    what = "a task" if progress.array else "it"
    if condition == job_pb2.DEPENDENCY_CONDITION_FAIL:
        if done and not unsuccessful:
            return Outcome(Verdict.NEVER, "every task SUCCEEDED" if progress.array else "it SUCCEEDED")
        return Outcome(Verdict.MET, "") if done else Outcome(Verdict.WAITING, _standing(progress))
    if condition == job_pb2.DEPENDENCY_CONDITION_ANY:
        return Outcome(Verdict.MET, "") if done else Outcome(Verdict.WAITING, _standing(progress))
    # ok, the default
    if progress.failed:
        return Outcome(Verdict.NEVER, f"{what} FAILED")
    if progress.cancelled:
        return Outcome(Verdict.NEVER, f"{what} was CANCELLED")
    return Outcome(Verdict.MET, "") if done else Outcome(Verdict.WAITING, _standing(progress))


@dataclass(frozen=True, slots=True)
class Decision:
    """What a job waiting for its dependencies comes to: released (every one met), cancelled (one never
    met: `reason` says which), or still waiting (`reason`: its pending reason)."""

    verdict: Verdict
    reason: str
    met: tuple[str, ...]
    """The dependency ids met now (to keep with the job)."""


def decide(
    after: Sequence[job_pb2.JobDependency], met_before: Iterable[str], progress_of: Callable[[str], Progress | None]
) -> Decision:
    """Judges every dependency of a job. `met_before` are those already met (kept with the job); `progress_of`
    returns a target's progress, None when the coordinator no longer knows it (then it can never be met)."""
    met = set(met_before)
    waiting: list[str] = []
    newly: list[str] = []
    for dependency in after:
        target = dependency.job_id
        if target in met:
            continue
        progress = progress_of(target)
        spelled = f"{target}:{condition_name(dependency.condition)}"
        if progress is None:
            return Decision(Verdict.NEVER, f"dependency {spelled} can never be met: {target} is not known", tuple(newly))
        result = outcome(dependency.condition, progress)
        if result.verdict is Verdict.NEVER:
            return Decision(Verdict.NEVER, f"dependency {spelled} can never be met: {result.detail}", tuple(newly))
        if result.verdict is Verdict.MET:
            met.add(target)
            newly.append(target)
        else:
            waiting.append(f"waiting for {target}: {result.detail}")
    if not waiting:
        return Decision(Verdict.MET, "dependencies met; waiting for the scheduler", tuple(newly))
    more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
    return Decision(Verdict.WAITING, waiting[0] + more, tuple(newly))


def dependency_cycle(job_id: str, after: Iterable[str], depends_on: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A path job_id -> ... -> job_id through the dependencies (`depends_on`: id -> the ids it waits for) that
    submitting `job_id` with `after` would close; None when it closes none. Existing jobs can name only jobs that
    existed before them, so a new job closes a cycle only by naming itself; the walk also guards against ids
    that resolve to one another (an array and its tasks)."""
    stack = [(target, [job_id, target]) for target in after]
    seen: set[str] = set()
    while stack:
        current, path = stack.pop()
        if current == job_id:
            return path
        if current in seen:
            continue
        seen.add(current)
        stack.extend((following, [*path, following]) for following in depends_on.get(current, ()))
    return None
