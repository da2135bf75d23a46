"""Pure rules of job arrays: the tasks a submission makes, the concurrency cap, and the array's own view.

An array of N tasks is N jobs, "<array id>[<index>]", sharing one spec but for argv ("{index}" replaced)
and three variables; they take N consecutive sequence numbers (as Slurm's tasks take job ids), so they
list, page and restore like any jobs. No I/O here.
"""

from __future__ import annotations

from coordinator.model.arrays import ArrayRecord
from coordinator.rules.job_rules import InvalidSpec, validate_spec
from gpuorch.arrays import array_indexes, array_problem, substitute_index, task_id
from gpuorch.v1 import job_pb2

STATE_ORDER = (
    job_pb2.JOB_STATE_RUNNING,
    job_pb2.JOB_STATE_PENDING,
    job_pb2.JOB_STATE_SUCCEEDED,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_CANCELLED,
)


def task_jobs(spec: job_pb2.JobSpec, array_id: str, submit_time, reason: str) -> list[job_pb2.Job]:
    """The tasks of an array submission (a normalized spec with `array` set), in index order.
    Raises InvalidSpec naming what is wrong with the array or with a task's spec."""
    problem = array_problem(spec.array)
    if problem:
        raise InvalidSpec(f"spec.array: {problem}")
    indexes = array_indexes(spec.array)
    template = job_pb2.JobSpec()
    template.CopyFrom(spec)
    template.ClearField("array")
    template.env["GPUORCH_ARRAY_ID"] = array_id
    template.env["GPUORCH_ARRAY_SIZE"] = str(len(indexes))
    substituted = any("{index}" in arg for arg in spec.argv)
    # Parsed from one serialized template: much faster than building each task's spec field by field.
    data = job_pb2.Job(spec=template, state=job_pb2.JOB_STATE_PENDING, reason=reason, submit_time=submit_time).SerializeToString()
    tasks = []
    for position, index in enumerate(indexes):
        job = job_pb2.Job.FromString(data)
        job.job_id = task_id(array_id, index)
        job.spec.env["GPUORCH_ARRAY_INDEX"] = str(index)
        if substituted:
            job.spec.argv[:] = substitute_index(list(spec.argv), index)
        task = job.array_task
        task.array_id, task.index, task.size, task.max_running, task.position = (
            array_id,
            index,
            len(indexes),
            spec.array.max_running,
            position,
        )
        tasks.append(job)
    try:
        validate_spec(tasks[-1].spec)  # the longest argv and the most variables: if it passes, every task does
    except InvalidSpec as error:
        raise InvalidSpec(f"task {tasks[-1].job_id}: {error}") from None
    return tasks


def cap_reason(record: ArrayRecord) -> str:
    """A task's pending reason while its array runs (or this pass starts) as many tasks as it may."""
    cap = record.max_running
    return f"array {record.array_id} runs its most tasks at once ({cap}, %{cap}); waiting for one to end"


def view_state(record: ArrayRecord) -> job_pb2.JobState:
    """The array's own state: RUNNING while a task runs, else PENDING while one pends, else SUCCEEDED when every
    task did, else FAILED when one failed, else CANCELLED."""
    if record.count(job_pb2.JOB_STATE_RUNNING):
        return job_pb2.JOB_STATE_RUNNING
    if record.count(job_pb2.JOB_STATE_PENDING):
        return job_pb2.JOB_STATE_PENDING
    if record.count(job_pb2.JOB_STATE_SUCCEEDED) == record.size:
        return job_pb2.JOB_STATE_SUCCEEDED
    if record.count(job_pb2.JOB_STATE_FAILED):
        return job_pb2.JOB_STATE_FAILED
    return job_pb2.JOB_STATE_CANCELLED


def summary_text(record: ArrayRecord) -> str:
    """ "6 tasks: 2 running, 3 pending, 1 succeeded (at most 2 at once)"."""
    parts = [
        f"{record.count(state)} {job_pb2.JobState.Name(state).removeprefix('JOB_STATE_').lower()}"
        for state in STATE_ORDER
        if record.count(state)
    ]
    cap = f" (at most {record.max_running} at once)" if record.max_running else ""
    return f"{record.size} tasks: {', '.join(parts)}{cap}"


def summary(record: ArrayRecord) -> job_pb2.ArraySummary:
    return job_pb2.ArraySummary(
        size=record.size,
        pending=record.count(job_pb2.JOB_STATE_PENDING),
        running=record.count(job_pb2.JOB_STATE_RUNNING),
        succeeded=record.count(job_pb2.JOB_STATE_SUCCEEDED),
        failed=record.count(job_pb2.JOB_STATE_FAILED),
        cancelled=record.count(job_pb2.JOB_STATE_CANCELLED),
        max_running=record.max_running,
    )


def view(record: ArrayRecord) -> job_pb2.Job:
    """The array as one Job (GetJob, ListJobs, WatchJob of its id): the first task's spec with the array's
    indexes, the tasks' counts, the state of `view_state`; ended when its last task ended."""
    tasks = record.tasks
    first = tasks[0].job
    job = job_pb2.Job(job_id=record.array_id, state=view_state(record), reason=summary_text(record))
    job.spec.CopyFrom(first.spec)
    job.spec.env.pop("GPUORCH_ARRAY_INDEX", None)
    step = tasks[1].job.array_task.index - first.array_task.index if len(tasks) > 1 else 1
    job.spec.array.CopyFrom(
        job_pb2.JobArray(
            first=first.array_task.index, last=tasks[-1].job.array_task.index, step=step, max_running=record.max_running
        )
    )
    job.submit_time.CopyFrom(first.submit_time)
    job.array.CopyFrom(summary(record))
    if job.state not in (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_PENDING):
        job.end_time.CopyFrom(max((task.job.end_time for task in tasks), key=lambda stamp: stamp.ToNanoseconds()))
    return job
