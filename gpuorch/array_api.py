"""The SDK's job arrays, dependencies and results: methods both clients share (gpuorch.client._Api inherits them).

client.submit_job(argv=["python", "train.py", "--seed", "{index}"], array="0-99%8")   # the array's id
client.submit_job(argv=["python", "merge.py"], after=[f"{array_id}:ok"])
rows = client.array_results(array_id)    # [{"index", "job_id", "state", "runtime_seconds", "result"}, ...]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from gpuorch.arrays import parse_array, parse_dependency
from gpuorch.v1 import job_pb2

RESULTS_PAGE_SIZE = 1000


def array_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """JobSpec keywords with `array` ("0-99:2%8" or a JobArray; None = none) and `after` (["JOB:ok", ...] or
    JobDependency messages) turned into their messages; ValueError naming what is wrong."""
    array = fields.pop("array", None)
    if isinstance(array, str):
        array = parse_array(array)
    if array is not None:
        fields["array"] = array
    after = fields.pop("after", None) or ()
    if isinstance(after, str):
        after = [after]
    if after:
        fields["after"] = [parse_dependency(item) if isinstance(item, str) else item for item in after]
    return fields


def runtime_seconds(job: job_pb2.Job) -> float | None:
    """How long the job's last attempt ran (until now for one still running); None before it started."""
    if not job.attempts:
        return None
    last = job.attempts[-1]
    if not last.HasField("end_time"):
        return None
    return max(0.0, (last.end_time.ToNanoseconds() - last.start_time.ToNanoseconds()) / 1e9)


def result_row(job: job_pb2.Job) -> dict[str, Any]:
    """One task as a row of `array_results`: index, job_id, state, runtime_seconds, result (a dict, or None)."""
    return {
        "index": job.array_task.index if job.HasField("array_task") else None,
        "job_id": job.job_id,
        "state": job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"),
        "runtime_seconds": runtime_seconds(job),
        "result": json.loads(job.result_json) if job.result_json else None,
    }


class ArrayApi:
    """Array methods over the unary call of the client that inherits them."""

    def _unary(self, service: str, method: str, request: Any, extract: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def list_tasks(
        self, array_id: str = "", states: Iterable[Any] = (), owner: str = "", page_size: int = 0, page_token: str = ""
    ):
        """One page of jobs with each array task on its own (of one array with `array_id`), newest first:
        returns (jobs, next_page_token). list_jobs shows an array as one job instead."""
        request = job_pb2.ListJobsRequest(
            states=list(states), owner=owner, page_size=page_size, page_token=page_token, tasks=True, array_id=array_id
        )
        return self._unary("job", "ListJobs", request, lambda r: (list(r.jobs), r.next_page_token))

    def array_results(self, array_id: str) -> list[dict[str, Any]]:
        """Every task of the array with its result, in index order (blocking Client only; page with list_tasks on
        AsyncClient): [{"index", "job_id", "state", "runtime_seconds", "result"}, ...]."""
        rows: list[dict[str, Any]] = []
        token = ""
        while True:
            jobs, token = self.list_tasks(array_id, page_size=RESULTS_PAGE_SIZE, page_token=token)
            rows += [result_row(job) for job in jobs]
            if not token:
                return sorted(rows, key=lambda row: row["index"])
