"""Job arrays and dependencies as people write them, shared by gpuctl, the SDK and the coordinator.

    --array 0-99          indexes 0 to 99
    --array 0-99:4%8      0, 4, 8 ... 96, at most 8 tasks running at once
    --array 7             one task, index 7
    --after j-000120-k7f3q2:ok    (ok, the default; fail; any)

A task's id is its array's id and its index: "j-000123-k7f3q2[7]". Pure: no I/O.
"""

from __future__ import annotations

import re

from gpuorch.v1 import job_pb2

MAX_ARRAY_TASKS = 100_000
"""Most tasks one array may have (each is a job in the coordinator's memory and store)."""
MAX_ARRAY_INDEX = 9_999_999
MAX_RESULT_BYTES = 64 * 1024
"""Largest result (JSON, UTF-8) a task may report through gpuorch.worker.report_result()."""
INDEX_PLACEHOLDER = "{index}"
"""Replaced in a task's argv by its index."""

_ARRAY = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?(?:%(\d+))?$")
_TASK_ID = re.compile(r"^(.+)\[(\d+)\]$")
CONDITIONS = {
    "ok": job_pb2.DEPENDENCY_CONDITION_OK,
    "fail": job_pb2.DEPENDENCY_CONDITION_FAIL,
    "any": job_pb2.DEPENDENCY_CONDITION_ANY,
}


def parse_array(text: str) -> job_pb2.JobArray:
    """FIRST-LAST[:STEP][%MAX] or INDEX[%MAX] -> JobArray; ValueError naming what is wrong."""
    match = _ARRAY.match(text.strip())
    if not match:
        raise ValueError(f"--array wants FIRST-LAST[:STEP][%MAX] or INDEX[%MAX], e.g. 0-99:2%8, got {text!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    array = job_pb2.JobArray(first=first, last=last, step=int(match.group(3) or 1), max_running=int(match.group(4) or 0))
    problem = array_problem(array)
    if problem:
        raise ValueError(f"--array {text}: {problem}")
    return array


def array_problem(array: job_pb2.JobArray) -> str:
    """Why an array's indexes are not acceptable; empty if they are."""
    if array.last < array.first:
        return f"the last index ({array.last}) is below the first ({array.first})"
    if array.last > MAX_ARRAY_INDEX:
        return f"index {array.last} is above the largest, {MAX_ARRAY_INDEX}"
    size = len(array_indexes(array))
    if size > MAX_ARRAY_TASKS:
        return f"it has {size} tasks; the limit is {MAX_ARRAY_TASKS}"
    return ""


def array_indexes(array: job_pb2.JobArray) -> range:
    """The array's indexes, in order."""
    return range(array.first, array.last + 1, array.step or 1)


def format_array(array: job_pb2.JobArray) -> str:
    """The --array text of a JobArray, e.g. "0-99:2%8"."""
    text = f"{array.first}" if array.first == array.last else f"{array.first}-{array.last}"
    if (array.step or 1) != 1:
        text += f":{array.step}"
    return text + (f"%{array.max_running}" if array.max_running else "")


def task_id(array_id: str, index: int) -> str:
    """The id of an array's task: "j-000123-k7f3q2[7]"."""
    return f"{array_id}[{index}]"


def split_task_id(job_id: str) -> tuple[str, int] | None:
    """(array id, index) of a task's id; None for any other id."""
    match = _TASK_ID.match(job_id)
    return (match.group(1), int(match.group(2))) if match else None


def substitute_index(argv: list[str], index: int) -> list[str]:
    """argv with every "{index}" replaced by the task's index (other braces are left alone)."""
    return [arg.replace(INDEX_PLACEHOLDER, str(index)) for arg in argv]


def parse_dependency(text: str) -> job_pb2.JobDependency:
    """JOB[:ok|:fail|:any] -> JobDependency (ok when no condition is given); ValueError naming what is wrong."""
    job, sep, condition = text.strip().rpartition(":")
    if not sep:
        job, condition = condition, "ok"
    if not job:
        raise ValueError(f"--after wants JOB[:ok|:fail|:any], e.g. j-000120-k7f3q2:ok, got {text!r}")
    if condition.lower() not in CONDITIONS:
        raise ValueError(f"--after {text}: the condition {condition!r} is unknown; use ok, fail or any")
    return job_pb2.JobDependency(job_id=job, condition=CONDITIONS[condition.lower()])


def condition_name(condition: int) -> str:
    """ok, fail or any (an unspecified condition is ok)."""
    for name, value in CONDITIONS.items():
        if value == condition:
            return name
    return "ok"
