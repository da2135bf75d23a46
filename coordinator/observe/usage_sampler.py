"""Feeds the usage history (coordinator/model/usage.py) from the cluster view and the job index,
and renders it for ClusterService/GetUsageHistory.

`take_sample` walks every GPU once on the event loop, adding plain numbers (as ClusterView.status
does), every `interval` seconds; the history itself is plain data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.control.cluster_view import ClusterView
from coordinator.model.telemetry import GPU_UTILIZATION
from coordinator.model.usage import DAY, HOUR, MINUTE, UsageHistory, UsageSample, totals
from coordinator.rules.liveness import Liveness
from gpuorch.clock import Clock
from gpuorch.v1 import cluster_pb2
from gpuorch.wire_values import timestamp_seconds

SAMPLE_INTERVAL_SECONDS = 10.0
"""How often the cluster is sampled: six samples a minute point, cheap beside the heartbeats."""


def take_sample(cluster: ClusterView, owner_of: Callable[[str], str]) -> UsageSample:
    """The cluster now: GPUs, those held (by owner and by pool), mean utilisation on READY nodes."""
    allocations = cluster.allocations.held
    gpus_total = gpus_allocated = 0
    utilization_sum, utilization_count = 0.0, 0
    owner_gpus: dict[str, int] = {}
    pool_gpus: dict[str, int] = {}
    owners: dict[str, str] = {}
    for node in cluster.nodes.values():
        gpus_total += len(node.devices)
        ready = node.liveness.state is Liveness.READY
        for uuid, device in node.devices.items():
            holder = allocations.get(uuid)
            if holder is not None:
                gpus_allocated += 1
                job_id = holder[0]
                owner = owners.get(job_id)
                if owner is None:
                    owner = owners[job_id] = owner_of(job_id)
                owner_gpus[owner] = owner_gpus.get(owner, 0) + 1
                pool_gpus[node.pool] = pool_gpus.get(node.pool, 0) + 1
            if ready and device.sample is not None:
                utilization_sum += device.sample[GPU_UTILIZATION]
                utilization_count += 1
    mean = utilization_sum / utilization_count if utilization_count else 0.0
    return UsageSample(gpus_total, gpus_allocated, mean, owner_gpus, pool_gpus)


async def usage_loop(
    history: UsageHistory, cluster: ClusterView, owner_of: Callable[[str], str], clock: Clock, interval: float
) -> None:
    """Samples the cluster into `history` every `interval` seconds, until cancelled."""
    while True:
        history.record(clock.wall(), take_sample(cluster, owner_of))
        await asyncio.sleep(interval)


def _timestamp(wall: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(wall * 1e9))
    return stamp


def usage_response(
    history: UsageHistory, request: cluster_pb2.GetUsageHistoryRequest, now_wall: float
) -> cluster_pb2.GetUsageHistoryResponse:
    """The points of the tier asked for in [start, end), and the owners' and pools' GPU-seconds over them."""
    hourly = request.resolution == cluster_pb2.USAGE_RESOLUTION_HOUR
    width = HOUR if hourly else MINUTE
    end = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else now_wall
    start = request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else end - DAY
    intervals = history.tier(width).between(start, end)
    owners, pools = totals(intervals)
    response = cluster_pb2.GetUsageHistoryResponse(
        resolution=cluster_pb2.USAGE_RESOLUTION_HOUR if hourly else cluster_pb2.USAGE_RESOLUTION_MINUTE,
        point_seconds=width,
        sample_interval_seconds=history.sample_interval,
        history_start_time=_timestamp(history.started_wall),
        owners=[cluster_pb2.UsageTotal(name=name, gpu_seconds=seconds) for name, seconds in owners],
        pools=[cluster_pb2.UsageTotal(name=name, gpu_seconds=seconds) for name, seconds in pools],
    )
    for interval in intervals:
        response.points.add(
            start_time=_timestamp(interval.start),
            covered_seconds=interval.covered_seconds,
            gpus_total=interval.gpus_total,
            gpus_allocated=interval.gpus_allocated,
            mean_gpu_utilization_percent=interval.mean_gpu_utilization_percent,
            allocated_gpu_seconds=interval.gpu_seconds_allocated,
        )
    return response


def usage_problem(request: cluster_pb2.GetUsageHistoryRequest) -> str | None:
    """Why a GetUsageHistory request cannot be answered, or None."""
    if request.resolution not in cluster_pb2.UsageResolution.values():
        return f"resolution {request.resolution} is not a UsageResolution (MINUTE = 1, HOUR = 2)"
    try:
        start, end = timestamp_seconds(request, "start_time"), timestamp_seconds(request, "end_time")
    except ValueError as error:
        return str(error)
    if request.HasField("start_time") and request.HasField("end_time") and start > end:
        return "start_time is after end_time"
    return None


async def run_usage_sampler(history: UsageHistory, cluster: ClusterView, jobs, clock: Clock, interval: float) -> None:
    """usage_loop with owners from the job manager's index (jobs.jobs: id -> JobEntry)."""

    def owner_of(job_id: str) -> str:
        entry = jobs.jobs.get(job_id)
        return entry.job.spec.owner if entry is not None else ""

    await usage_loop(history, cluster, owner_of, clock, interval)
