"""Wire messages as the JSON the pages and /api/v1/ serve: plain dicts and lists, times as Unix seconds.

A node's GPUs are rows of numbers (see GPU_COLUMNS), not objects, so a cluster of 8,000 GPUs is a few
hundred kilobytes a refresh rather than megabytes.
"""

from __future__ import annotations

from gpuorch.v1 import cluster_pb2, job_pb2

GPU_COLUMNS = (
    "index", "utilization", "memory_percent", "temperature", "power", "healthy",
    "job", "uuid", "reason", "memory_used", "memory_total",
)  # fmt: skip
"""The order of the values in each row of a node's "gpus"."""


def seconds(stamp) -> float | None:
    """A Timestamp as Unix seconds; None when unset."""
    return stamp.ToNanoseconds() / 1e9 if stamp.seconds or stamp.nanos else None


def node_state(value: int) -> str:
    return cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def job_state(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def gpu_row(device: cluster_pb2.Device) -> list:
    telemetry = device.telemetry if device.HasField("telemetry") else None
    memory_used = telemetry.memory_used_bytes if telemetry else 0
    total = device.memory_total_bytes
    return [
        device.index,
        round(telemetry.gpu_utilization_percent, 1) if telemetry else None,
        round(100.0 * memory_used / total, 1) if telemetry and total else None,
        round(telemetry.temperature_celsius, 1) if telemetry else None,
        round(telemetry.power_watts, 1) if telemetry else None,
        1 if device.healthy else 0,
        device.allocated_job_id,
        device.uuid,
        device.unhealthy_reason,
        memory_used,
        total,
    ]


def node_json(node: cluster_pb2.Node) -> dict:
    return {
        "node_id": node.node_id,
        "state": node_state(node.state),
        "pool": node.pool,
        "drained": node.drained,
        "reason": node.state_reason,
        "hostname": node.hostname,
        "last_heartbeat": seconds(node.last_heartbeat_time),
        "gpus": [gpu_row(device) for device in node.devices],
    }


def history_json(node: cluster_pb2.Node) -> dict:
    """Each GPU's telemetry history: uuid -> columns of [time, utilisation, memory used, temperature, power]."""
    return {
        device.uuid: [
            [
                seconds(point.time),
                point.gpu_utilization_percent,
                point.memory_used_bytes,
                point.temperature_celsius,
                point.power_watts,
            ]
            for point in device.telemetry_history
        ]
        for device in node.devices
    }


def placement_json(placement: job_pb2.Placement) -> list:
    return [
        {"node_id": node.node_id, "gpus": list(node.device_indexes), "first_rank": node.first_rank} for node in placement.nodes
    ]


def job_summary(job: job_pb2.Job) -> dict:
    """What a queue row shows (no env, no argv: the queue is shared by every viewer)."""
    return {
        "job_id": job.job_id,
        "name": job.spec.name,
        "owner": job.spec.owner,
        "state": job_state(job.state),
        "gpus": job.spec.gpus,
        "pool": job.spec.pool or "default",
        "priority": job.spec.priority,
        "attempt": job.attempt,
        "reason": job.reason,
        "submit_time": seconds(job.submit_time),
        "start_time": seconds(job.start_time),
        "end_time": seconds(job.end_time),
        "estimated_start_time": seconds(job.estimated_start_time),
        "nodes": [node.node_id for node in job.placement.nodes],
        "idle": job.telemetry.idle,
    }


def telemetry_json(shown: job_pb2.JobTelemetry) -> dict:
    """A job's step telemetry, stragglers and idleness (Job.telemetry)."""
    return {
        "step": shown.step,
        "steps_per_second": shown.steps_per_second,
        "samples_per_second": shown.samples_per_second,
        "scalars": dict(shown.scalars),
        "idle": shown.idle,
        "gpu_utilization_percent": shown.gpu_utilization_percent,
        "ranks": [{"rank": r.rank, "node_id": r.node_id, "step": r.step, "step_seconds": r.step_seconds} for r in shown.ranks],
        "stragglers": [
            {"rank": s.rank, "node_id": s.node_id, "device_uuid": s.device_uuid, "attempt": s.attempt,
             "step_seconds": s.step_seconds, "median_step_seconds": s.median_step_seconds, "flag_time": seconds(s.flag_time)}
            for s in shown.stragglers
        ],
    }  # fmt: skip


def job_json(job: job_pb2.Job) -> dict:
    """Everything the job page shows: the summary, the spec and every attempt."""
    spec = job.spec
    result = job_summary(job)
    result["spec"] = {
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "env_redacted": job.env_redacted,
        "working_dir": spec.working_dir,
        "submit_dir": spec.submit_dir,
        "gpus_per_node": spec.gpus_per_node,
        "min_gpus": spec.min_gpus,
        "max_restarts": spec.max_restarts,
        "backend": spec.backend,
        "time_limit_seconds": spec.time_limit_seconds,
        "estimated_runtime_seconds": spec.estimated_runtime_seconds,
        "non_preemptible": spec.non_preemptible,
        "requirements": {
            "gpu_model": spec.requirements.gpu_model,
            "min_memory_per_gpu_bytes": spec.requirements.min_memory_per_gpu_bytes,
        },
    }
    result["restarts"] = job.restarts
    result["telemetry"] = telemetry_json(job.telemetry)
    result["world_size"] = job.placement.world_size
    result["placement"] = placement_json(job.placement)
    result["attempts"] = [
        {
            "attempt": attempt.attempt,
            "start_time": seconds(attempt.start_time),
            "end_time": seconds(attempt.end_time),
            "restart_reason": attempt.restart_reason,
            "end_reason": attempt.end_reason,
            "placement": placement_json(attempt.placement),
            "world_size": attempt.placement.world_size,
        }
        for attempt in job.attempts
    ]
    return result


def pending_order(job: dict) -> tuple:
    """Pending jobs in the order the scheduler's forecast starts them: by estimated start (unknown last),
    then priority (highest first), then submission."""
    estimate = job["estimated_start_time"]
    return (estimate is None, estimate or 0.0, -job["priority"], job["submit_time"] or 0.0, job["job_id"])


def usage_json(response: cluster_pb2.GetUsageHistoryResponse) -> dict:
    return {
        "point_seconds": response.point_seconds,
        "history_start_time": seconds(response.history_start_time),
        "columns": ["start_time", "gpus_total", "gpus_allocated", "mean_gpu_utilization_percent", "covered_seconds"],
        "points": [
            [
                seconds(point.start_time),
                round(point.gpus_total, 2),
                round(point.gpus_allocated, 2),
                round(point.mean_gpu_utilization_percent, 2),
                point.covered_seconds,
            ]
            for point in response.points
        ],
        "owners": [{"name": total.name, "gpu_hours": total.gpu_seconds / 3600} for total in response.owners],
        "pools": [{"name": total.name, "gpu_hours": total.gpu_seconds / 3600} for total in response.pools],
    }
