"""The table and detail views of nodes, the cluster and jobs."""

from __future__ import annotations

import shlex

from gpuorch.arrays import condition_name, format_array
from gpuorch.cli.printing import GIB, age, duration, job_state_name, node_state_name, printable, stamp, table
from gpuorch.cli.telemetry_view import telemetry_lines
from gpuorch.v1 import job_pb2


def format_nodes(nodes) -> str:
    rows = []
    for node in nodes:
        healthy = sum(device.healthy for device in node.devices)
        free = sum(device.healthy and not device.allocated_job_id for device in node.devices)
        utils = [device.telemetry.gpu_utilization_percent for device in node.devices if device.HasField("telemetry")]
        temps = [device.telemetry.temperature_celsius for device in node.devices if device.HasField("telemetry")]
        rows.append(
            (
                node.node_id,
                node_state_name(node.state),
                node.pool or "default",
                f"{len(node.devices)}",
                f"{healthy}",
                f"{free}",
                f"{sum(utils) / len(utils):.0f}%" if utils else "-",
                f"{max(temps):.0f}C" if temps else "-",
                age(node.last_heartbeat_time),
                node.state_reason,
            )
        )
    return table(("NODE", "STATE", "POOL", "GPUS", "HEALTHY", "FREE", "UTIL", "MAX TEMP", "LAST HEARTBEAT", "REASON"), rows)


def format_node(node) -> str:
    lines = [
        f"Node:            {node.node_id}",
        f"State:           {node_state_name(node.state)}" + (f" ({node.state_reason})" if node.state_reason else ""),
        f"Hostname:        {node.hostname}",
        f"Addresses:       {', '.join(node.addresses) or '-'}",
        f"Pool:            {node.pool or 'default'}",
        f"Agent version:   {node.agent_version or '-'}",
        (
            f"Heartbeat:       every {node.heartbeat_interval_seconds:g}s, "
            f"last #{node.last_heartbeat_sequence} {age(node.last_heartbeat_time)}"
        ),
        "",
    ]
    rows = []
    for device in node.devices:
        telemetry = device.telemetry if device.HasField("telemetry") else None
        rows.append(
            (
                device.index,
                device.uuid,
                device.name,
                "yes" if device.healthy else f"NO: {device.unhealthy_reason}",
                f"{telemetry.memory_used_bytes / GIB:.1f}/{device.memory_total_bytes / GIB:.0f} GiB" if telemetry else "-",
                f"{telemetry.gpu_utilization_percent:.0f}%" if telemetry else "-",
                f"{telemetry.temperature_celsius:.0f}C" if telemetry else "-",
                f"{telemetry.power_watts:.0f}W" if telemetry else "-",
                f"{telemetry.ecc_corrected_errors}/{telemetry.ecc_uncorrected_errors}" if telemetry else "-",
                f"{telemetry.xid_count} (last {telemetry.last_xid})" if telemetry and telemetry.xid_count else "0",
                f"{device.allocated_job_id}#{device.allocated_attempt}" if device.allocated_job_id else "-",
            )
        )
    lines = [printable(line) for line in lines]
    lines.append(table(("IDX", "UUID", "NAME", "HEALTHY", "MEMORY", "UTIL", "TEMP", "POWER", "ECC C/U", "XIDS", "JOB"), rows))
    return "\n".join(lines)


def format_status(status) -> str:
    states = ", ".join(
        f"{name.removeprefix('NODE_STATE_').lower()} {count}" for name, count in sorted(status.nodes_by_state.items()) if count
    )
    lines = [
        f"Nodes:        {status.nodes_total} ({states or 'none'})",
        f"GPUs:         {status.gpus_total} total, {status.gpus_healthy} healthy, {status.gpus_free} free",
        f"Memory:       {status.memory_used_bytes / GIB:.1f} of {status.memory_total_bytes / GIB:.1f} GiB in use",
        f"Utilisation:  {status.mean_gpu_utilization_percent:.1f}% mean",
        (
            f"Heartbeats:   {status.heartbeats_per_second:.1f}/s, "
            f"ingest lag p50 {status.heartbeat_lag_p50_ms:.1f} ms, p99 {status.heartbeat_lag_p99_ms:.1f} ms"
        ),
        f"Coordinator:  epoch {status.coordinator_epoch}",
    ]
    if status.jobs_by_state:
        jobs = ", ".join(
            f"{name.removeprefix('JOB_STATE_').lower()} {count}" for name, count in sorted(status.jobs_by_state.items()) if count
        )
        lines.insert(4, f"Jobs:         {jobs or 'none'}")
    return "\n".join(printable(line) for line in lines)


def start_column(job) -> str:
    """When the job started; for a pending one, when it is estimated to start (like squeue --start), or unknown."""
    if job.state == job_pb2.JOB_STATE_PENDING:
        return stamp(job.estimated_start_time) if job.HasField("estimated_start_time") else "unknown"
    return stamp(job.start_time)


def format_jobs(found) -> str:
    rows = [
        (
            job.job_id,
            job_state_name(job.state) + (" (idle)" if job.telemetry.idle else ""),
            (job.spec.name or "-") + (" (interactive)" if job.spec.interactive else ""),
            job.spec.owner or "-",
            job.spec.pool or "default",
            job.spec.gpus,
            job.spec.priority,
            job.attempt,
            stamp(job.submit_time),
            start_column(job),
            job.reason,
        )
        for job in found
    ]
    return table(("JOB", "STATE", "NAME", "OWNER", "POOL", "GPUS", "PRIO", "ATTEMPT", "SUBMITTED", "START", "REASON"), rows)


def array_lines(job) -> list[str]:
    """What `gpuctl job` says of an array, an array's task, dependencies and a result."""
    lines = []
    if job.HasField("array"):
        lines.append(f"Array:      --array {format_array(job.spec.array)}, {job.array.size} tasks (gpuctl results {job.job_id})")
    if job.HasField("array_task"):
        task = job.array_task
        lines.append(f"Array task: index {task.index} of {task.array_id} ({task.size} tasks)")
    for dependency in job.spec.after:
        met = " (met)" if dependency.job_id in job.dependencies_met else ""
        lines.append(f"After:      {dependency.job_id}:{condition_name(dependency.condition)}{met}")
    if job.result_json:
        lines.append(f"Result:     {job.result_json[:500]}")
    return lines


def format_job(job) -> str:
    spec = job.spec
    limits = []
    if spec.pids_max:
        limits.append(f"pids_max {spec.pids_max}")
    if spec.memory_max_bytes:
        limits.append(f"memory_max {spec.memory_max_bytes / GIB:g} GiB")
    lines = [
        f"Job:        {job.job_id}" + (f" ({spec.name})" if spec.name else ""),
        f"State:      {job_state_name(job.state)}" + (f": {job.reason}" if job.reason else ""),
        f"Command:    {shlex.join(spec.argv)}" + ("   (interactive: gpuctl attach)" if spec.interactive else ""),
        f"Working dir: {spec.working_dir}"
        if spec.working_dir
        else f"Submitted from: {spec.submit_dir or '-'} (ranks run there where the node has it)",
        f"GPUs:       {spec.gpus}"
        + (f", {spec.gpus_per_node} per node" if spec.gpus_per_node else "")
        + f", backend {spec.backend}, pool {spec.pool or 'default'}",
        (
            f"Owner:      {spec.owner or '-'}   priority {spec.priority}   "
            f"attempt {job.attempt}   restarts {job.restarts} of {spec.max_restarts}"
            + ("   never preempted" if spec.non_preemptible else "")
        ),
        f"Submitted:  {stamp(job.submit_time)}   started {stamp(job.start_time)}   ended {stamp(job.end_time)}",
    ]
    lines += array_lines(job)
    lines += telemetry_lines(job)
    if spec.time_limit_seconds:
        limits.insert(0, f"time limit {duration(spec.time_limit_seconds)}")
    if job.state == job_pb2.JOB_STATE_PENDING:
        lines.append(f"Est. start: {start_column(job)}")
    if spec.gpu_memory_fraction:
        limits.append(f"GPU memory fraction {spec.gpu_memory_fraction:g}")
    if limits:
        lines.append(f"Limits:     {', '.join(limits)} per rank")
    watch = ["restart on a straggler"] if spec.on_straggler == job_pb2.STRAGGLER_ACTION_RESTART else []
    watch += ["never judged idle"] if spec.idle_exempt else []
    watch += [f"cancelled after {spec.idle_timeout_minutes:g} min idle"] if spec.idle_timeout_minutes else []
    if watch:
        lines.append(f"Telemetry:  {', '.join(watch)}")
    lines = [printable(line) for line in lines]
    if job.placement.nodes:
        lines.append(
            printable(
                f"Rendezvous: {job.placement.master_addr}:{job.placement.master_port}, world size {job.placement.world_size}"
            )
        )
        placement_rows = [
            (
                node.node_rank,
                node.node_id,
                f"{node.first_rank}-{node.first_rank + len(node.device_uuids) - 1}",
                ",".join(map(str, node.device_indexes)),
                " ".join(node.device_uuids),
            )
            for node in job.placement.nodes
        ]
        lines.append(table(("NODE RANK", "NODE", "RANKS", "GPU IDX", "GPU UUIDS"), placement_rows))
    if job.attempts:
        attempt_rows = [
            (
                attempt.attempt,
                attempt.placement.world_size,
                ",".join(node.node_id for node in attempt.placement.nodes),
                stamp(attempt.start_time),
                stamp(attempt.end_time),
                attempt.restart_reason or "-",
                attempt.end_reason or "running",
            )
            for attempt in job.attempts
        ]
        lines.append("")
        lines.append(table(("ATTEMPT", "GPUS", "NODES", "STARTED", "ENDED", "STARTED BECAUSE", "ENDED BECAUSE"), attempt_rows))
        for attempt in job.attempts:
            for node_id, directory in sorted(attempt.working_dirs.items()):
                lines.append(printable(f"attempt {attempt.attempt} working dir on {node_id}: {directory}"))
    return "\n".join(lines)


def format_usage(usage) -> str:
    """GetUsageHistoryResponse as GPU-hours by owner and pool, and the range's mean allocation and utilisation."""
    points = list(usage.points)
    covered = sum(point.covered_seconds for point in points)
    lines = [f"Points:       {len(points)}, one per {usage.point_seconds // 60} min, covering {covered / 3600:.1f} h"]
    if covered:
        allocated = sum(point.gpus_allocated * point.covered_seconds for point in points) / covered
        total = sum(point.gpus_total * point.covered_seconds for point in points) / covered
        utilization = sum(point.mean_gpu_utilization_percent * point.covered_seconds for point in points) / covered
        lines.append(f"Allocated:    {allocated:.1f} of {total:.1f} GPUs on average")
        lines.append(f"Utilisation:  {utilization:.1f}% mean")
    lines = [printable(line) for line in lines]
    for title, totals in (("OWNER", usage.owners), ("POOL", usage.pools)):
        rows = [(total.name or "(none)", f"{total.gpu_seconds / 3600:.2f}") for total in totals]
        lines += ["", table((title, "GPU-HOURS"), rows) if rows else f"{title}: no GPU-hours in the range"]
    return "\n".join(lines)
