"""The SDK's calls for usage over time and the caller's identity: a part of `gpuorch.client._Api`,
kept in its own module (ClusterService/GetUsageHistory and WhoAmI)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gpuorch.v1 import cluster_pb2, job_pb2

USAGE_METHODS = ("GetUsageHistory", "WhoAmI")
"""Both read only: grpc retries them on UNAVAILABLE like the other reads (gpuorch.client.RETRIED_METHODS)."""
GROUP_BY = {"owner": job_pb2.USAGE_GROUP_BY_OWNER, "pool": job_pb2.USAGE_GROUP_BY_POOL, "job": job_pb2.USAGE_GROUP_BY_JOB}
RESOLUTIONS = {"minute": cluster_pb2.USAGE_RESOLUTION_MINUTE, "hour": cluster_pb2.USAGE_RESOLUTION_HOUR}


def _timestamp_fields(start: datetime.datetime | float | None, end: datetime.datetime | float | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in (("start_time", start), ("end_time", end)):
        if value is None:
            continue
        seconds = value.timestamp() if isinstance(value, datetime.datetime) else float(value)
        stamp = Timestamp()
        stamp.FromNanoseconds(int(seconds * 1e9))
        fields[name] = stamp
    return fields


class UsageCalls:
    """GetUsageHistory and WhoAmI, over the `_unary` of the client that mixes this in."""

    _unary: Callable[..., Any]

    def usage_history(
        self,
        resolution: str = "minute",
        start: datetime.datetime | float | None = None,
        end: datetime.datetime | float | None = None,
    ):
        """The cluster's usage over time (GetUsageHistoryResponse): one point a `resolution` ("minute", kept
        7 days, or "hour", kept 90), from `start` (default: a day before `end`) to `end` (default: now);
        datetimes or Unix seconds."""
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}: use minute or hour")
        request = cluster_pb2.GetUsageHistoryRequest(resolution=RESOLUTIONS[resolution], **_timestamp_fields(start, end))
        return self._unary("cluster", "GetUsageHistory", request, lambda response: response)

    def who_am_i(self):
        """Who the coordinator takes this client for (WhoAmIResponse: user, role, authenticated)."""
        return self._unary("cluster", "WhoAmI", cluster_pb2.WhoAmIRequest(), lambda response: response)

    def usage(
        self,
        by: str = "owner",
        since: datetime.datetime | float | None = None,
        until: datetime.datetime | float | None = None,
        owner: str = "",
    ):
        """The cost report (GetUsageResponse): each attempt's GPU-seconds in [since, until) (default: every kept
        job, to now), mean utilisation and peak memory, summed by "owner", "pool" or "job"; datetimes or Unix seconds."""
        if by not in GROUP_BY:
            raise ValueError(f"unknown grouping {by!r}: use owner, pool or job")
        fields = _timestamp_fields(since, until)
        fields = {{"start_time": "since", "end_time": "until"}[name]: value for name, value in fields.items()}
        request = job_pb2.GetUsageRequest(group_by=GROUP_BY[by], owner=owner, **fields)
        return self._unary("job", "GetUsage", request, lambda response: response)
