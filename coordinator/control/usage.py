"""JobService/GetUsage: the attempts of every job that ran in a range (memory and the job history in the
store), summed by coordinator/rules/usage_report.py."""

from __future__ import annotations

from coordinator.control.job_history import MAX_PAGE_SIZE
from coordinator.control.job_manager import JobManager
from coordinator.rules import usage_report
from coordinator.store.api import JobQuery
from gpuorch.v1 import job_pb2
from gpuorch.wire_values import timestamp_seconds


async def usage(manager: JobManager, request: job_pb2.GetUsageRequest) -> job_pb2.GetUsageResponse:
    """The cost report GetUsage asks for. Raises ValueError naming a bad group or range, RuntimeError when the
    store cannot read the history."""
    if request.group_by not in job_pb2.UsageGroupBy.values():
        raise ValueError(f"group_by {request.group_by} is unknown: use USAGE_GROUP_BY_OWNER, _POOL or _JOB")
    since = timestamp_seconds(request, "since")
    until = timestamp_seconds(request, "until") or manager.clock.wall()
    if since > until:
        raise ValueError("since is after until: the range is empty")
    query = JobQuery(owner=request.owner, active_since=since, active_until=until)
    jobs: list[job_pb2.Job] = []
    token = ""
    while True:
        page, token = await manager.history.page(query, MAX_PAGE_SIZE, token)
        jobs += page
        if not token:
            break
    return usage_report.report(jobs, request.group_by, since, until, request.owner)
