"""gpuctl: the operator's command line, built on the SDK.

    gpuctl nodes                 every node, one line each
    gpuctl node ID               one node and its GPUs
    gpuctl status                cluster totals
    gpuctl drain ID [--reason]   stop placing work on a node
    gpuctl resume ID             open it again
    gpuctl submit --gpus N [...] -- CMD ARGS...    queue a job, print its id
    gpuctl jobs [--state S] [--owner U]           list jobs, newest first
    gpuctl job ID                one job with its placement
    gpuctl cancel ID             stop every rank of a job
    gpuctl watch ID              follow a job until it ends (exit 0 only if it succeeded)
    gpuctl logs ID [--rank R] [--tail N] [-f]     a rank's output
    gpuctl priority ID P         change a pending or running job's priority
    gpuctl token --user U [--role R]              make a new token and its [[tokens]] entry

Add `-o json` for machine-readable output. The coordinator address comes from
--coordinator, else $GPUORCH_COORDINATOR, else 127.0.0.1:50051. A coordinator with
tokens wants --token (or $GPUORCH_TOKEN). To any address but loopback gpuctl speaks
TLS, trusting --tls-ca (or $GPUORCH_TLS_CA), else the system's CAs; --insecure (or
$GPUORCH_CLIENT_INSECURE=1) is for a coordinator that serves plaintext on the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from gpuorch.client import Client, default_address
from gpuorch.errors import GpuorchError
from gpuorch.client import build_job_spec
from gpuorch.v1 import cluster_pb2, job_pb2

GIB = 1024**3


def _as_json(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _short_state(value: int) -> str:
    return cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def _age(stamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return f"{max(0.0, time.time() - stamp.ToNanoseconds() / 1e9):.1f}s ago"


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
                _short_state(node.state),
                f"{len(node.devices)}",
                f"{healthy}",
                f"{free}",
                f"{sum(utils) / len(utils):.0f}%" if utils else "-",
                f"{max(temps):.0f}C" if temps else "-",
                _age(node.last_heartbeat_time),
                node.state_reason,
            )
        )
    return _table(("NODE", "STATE", "GPUS", "HEALTHY", "FREE", "UTIL", "MAX TEMP", "LAST HEARTBEAT", "REASON"), rows)


def format_node(node) -> str:
    lines = [
        f"Node:            {node.node_id}",
        f"State:           {_short_state(node.state)}" + (f" ({node.state_reason})" if node.state_reason else ""),
        f"Hostname:        {node.hostname}",
        f"Addresses:       {', '.join(node.addresses) or '-'}",
        f"Agent version:   {node.agent_version or '-'}",
        f"Heartbeat:       every {node.heartbeat_interval_seconds:g}s, last #{node.last_heartbeat_sequence} {_age(node.last_heartbeat_time)}",
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
    lines.append(_table(("IDX", "UUID", "NAME", "HEALTHY", "MEMORY", "UTIL", "TEMP", "POWER", "ECC C/U", "XIDS", "JOB"), rows))
    return "\n".join(lines)


def format_status(status) -> str:
    states = ", ".join(f"{name.removeprefix('NODE_STATE_').lower()} {count}" for name, count in sorted(status.nodes_by_state.items()) if count)
    lines = [
        f"Nodes:        {status.nodes_total} ({states or 'none'})",
        f"GPUs:         {status.gpus_total} total, {status.gpus_healthy} healthy, {status.gpus_free} free",
        f"Memory:       {status.memory_used_bytes / GIB:.1f} of {status.memory_total_bytes / GIB:.1f} GiB in use",
        f"Utilisation:  {status.mean_gpu_utilization_percent:.1f}% mean",
        f"Heartbeats:   {status.heartbeats_per_second:.1f}/s, ingest lag p50 {status.heartbeat_lag_p50_ms:.1f} ms, p99 {status.heartbeat_lag_p99_ms:.1f} ms",
        f"Coordinator:  epoch {status.coordinator_epoch}",
    ]
    if status.jobs_by_state:
        jobs = ", ".join(f"{name.removeprefix('JOB_STATE_').lower()} {count}" for name, count in sorted(status.jobs_by_state.items()) if count)
        lines.insert(4, f"Jobs:         {jobs or 'none'}")
    return "\n".join(lines)


def _job_state(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def _stamp(stamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def format_jobs(found) -> str:
    rows = [
        (
            job.job_id,
            _job_state(job.state),
            job.spec.name or "-",
            job.spec.owner or "-",
            job.spec.gpus,
            job.spec.priority,
            job.attempt,
            _stamp(job.submit_time),
            job.reason,
        )
        for job in found
    ]
    return _table(("JOB", "STATE", "NAME", "OWNER", "GPUS", "PRIO", "ATTEMPT", "SUBMITTED", "REASON"), rows)


def format_job(job) -> str:
    spec = job.spec
    lines = [
        f"Job:        {job.job_id}" + (f" ({spec.name})" if spec.name else ""),
        f"State:      {_job_state(job.state)}" + (f": {job.reason}" if job.reason else ""),
        f"Command:    {' '.join(spec.argv)}",
        f"GPUs:       {spec.gpus}" + (f", {spec.gpus_per_node} per node" if spec.gpus_per_node else "") + f", backend {spec.backend}",
        f"Owner:      {spec.owner or '-'}   priority {spec.priority}   attempt {job.attempt}   restarts {job.restarts} of {spec.max_restarts}",
        f"Submitted:  {_stamp(job.submit_time)}   started {_stamp(job.start_time)}   ended {_stamp(job.end_time)}",
    ]
    if job.placement.nodes:
        lines.append(f"Rendezvous: {job.placement.master_addr}:{job.placement.master_port}, world size {job.placement.world_size}")
        rows = [
            (node.node_rank, node.node_id, f"{node.first_rank}-{node.first_rank + len(node.device_uuids) - 1}", ",".join(map(str, node.device_indexes)), " ".join(node.device_uuids))
            for node in job.placement.nodes
        ]
        lines.append(_table(("NODE RANK", "NODE", "RANKS", "GPU IDX", "GPU UUIDS"), rows))
    if job.attempts:
        rows = [
            (
                attempt.attempt,
                attempt.placement.world_size,
                ",".join(node.node_id for node in attempt.placement.nodes),
                _stamp(attempt.start_time),
                _stamp(attempt.end_time),
                attempt.restart_reason or "-",
                attempt.end_reason or "running",
            )
            for attempt in job.attempts
        ]
        lines.append("")
        lines.append(_table(("ATTEMPT", "GPUS", "NODES", "STARTED", "ENDED", "STARTED BECAUSE", "ENDED BECAUSE"), rows))
    return "\n".join(lines)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env wants KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuctl", description="Operate a gpuorch cluster.")
    parser.add_argument("--coordinator", default=None, help=f"host:port (default $GPUORCH_COORDINATOR or {default_address()})")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
    parser.add_argument("--token", default=None, help="bearer token (default $GPUORCH_TOKEN); prefer the variable: flags show in ps")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="CA that signed the coordinator's certificate (default $GPUORCH_TLS_CA, else the system's CAs)")
    parser.add_argument(
        "--insecure", action="store_true", default=None, help="plaintext to a coordinator off this machine that serves it (default $GPUORCH_CLIENT_INSECURE)"
    )
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate, for a coordinator that asks every client for one")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="key of --tls-cert")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nodes = commands.add_parser("nodes", help="list nodes")
    nodes.add_argument("--state", action="append", default=[], help="only nodes in this state (repeatable)")
    commands.add_parser("node", help="show one node and its GPUs").add_argument("node_id")
    commands.add_parser("status", help="cluster totals")
    drain = commands.add_parser("drain", help="stop placing new work on a node")
    drain.add_argument("node_id")
    drain.add_argument("--reason", default="", help="why, shown on the node")
    commands.add_parser("resume", help="open a drained node for work again").add_argument("node_id")

    submit = commands.add_parser("submit", help="queue a job: gpuctl submit --gpus 4 -- python train.py", usage="gpuctl submit [options] -- CMD [ARGS...]")
    submit.add_argument("--gpus", type=int, default=1, help="ranks, one GPU each (default 1)")
    submit.add_argument("--gpus-per-node", type=int, default=0, help="ranks per node (default: any split)")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first under the priority policy")
    submit.add_argument("--name", default="", help="a name for people")
    submit.add_argument("--owner", default="", help="who it is for (default $USER)")
    submit.add_argument("--env", action="append", type=_env_pair, default=[], metavar="K=V", help="environment variable for every rank (repeatable)")
    submit.add_argument("--backend", default="", choices=("", "nccl", "gloo"), help="torch.distributed backend (default nccl)")
    submit.add_argument("--workdir", default="", help="working directory of every rank on its node (absolute)")
    submit.add_argument("--min-memory-gib", type=float, default=0, help="only GPUs with at least this much memory")
    submit.add_argument("--gpu-model", default="", help="only GPUs whose name contains this, e.g. H100")
    submit.add_argument("--estimated-runtime", type=int, default=0, metavar="SECONDS", help="for the sjf policy")
    submit.add_argument("--spread", action="store_true", help="spread ranks over as many nodes as possible")
    submit.add_argument("--max-restarts", type=int, default=0, help="restart a failed attempt up to this many times (default 0)")
    submit.add_argument("--min-gpus", type=int, default=0, help="elastic floor: after a failure, restart on as few as this many GPUs")
    submit.add_argument("--progress-timeout", type=int, default=0, metavar="SECONDS", help="restart when no rank reports progress this long")
    submit.add_argument("--watch", action="store_true", help="then follow it like `gpuctl watch`")
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", action="append", default=[], help="only jobs in this state (repeatable)")
    jobs.add_argument("--owner", default="", help="only jobs of this owner")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    commands.add_parser("job", help="show one job").add_argument("job_id")
    commands.add_parser("cancel", help="cancel a job").add_argument("job_id")
    commands.add_parser("watch", help="follow a job until it ends; exit 0 only if it succeeded").add_argument("job_id")
    logs = commands.add_parser("logs", help="a rank's output")
    logs.add_argument("job_id")
    logs.add_argument("--rank", type=int, default=0, help="global rank (default 0)")
    logs.add_argument("--attempt", type=int, default=0, help="attempt (default: the latest)")
    logs.add_argument("--tail", type=int, default=0, metavar="BYTES", help="only the last BYTES bytes")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    token = commands.add_parser("token", help="make a new token: prints it, and the [[tokens]] entry for the coordinator's tokens file")
    token.add_argument("--user", required=True, help="who the token authenticates as (jobs run as this local user)")
    token.add_argument("--role", choices=("user", "admin"), default="user", help="admin may drain nodes and act on every job (default user)")
    priority = commands.add_parser("priority", help="change a job's priority")
    priority.add_argument("job_id")
    priority.add_argument("priority", type=int)
    return parser


def _watch(client: Client, job_id: str, as_json: bool) -> int:
    last = None
    for job in client.watch_job(job_id):
        if as_json:
            print(json.dumps(_as_json(job)), flush=True)
        else:
            line = f"{job.job_id} {_job_state(job.state)} attempt {job.attempt}" + (f": {job.reason}" if job.reason else "")
            print(line, flush=True)
        last = job
    return 0 if last is not None and last.state == job_pb2.JOB_STATE_SUCCEEDED else 1


def run(args: argparse.Namespace, client: Client) -> int:
    as_json = args.output == "json"

    def show(message, formatter) -> None:
        print(json.dumps(_as_json(message), indent=2) if as_json else formatter(message))

    if args.command == "nodes":
        nodes = client.list_nodes(args.state)
        if as_json:
            print(json.dumps({"nodes": [_as_json(node) for node in nodes]}, indent=2))
        else:
            print(format_nodes(nodes))
    elif args.command == "node":
        show(client.get_node(args.node_id), format_node)
    elif args.command == "status":
        show(client.cluster_status(), format_status)
    elif args.command == "drain":
        show(client.drain_node(args.node_id, args.reason), format_node)
    elif args.command == "resume":
        show(client.resume_node(args.node_id), format_node)
    elif args.command == "submit":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise ValueError("submit needs a command after --, e.g. gpuctl submit --gpus 2 -- python train.py")
        spec = build_job_spec(
            argv,
            gpus=args.gpus,
            gpus_per_node=args.gpus_per_node,
            priority=args.priority,
            name=args.name,
            owner=args.owner or os.environ.get("USER", ""),
            env=dict(args.env),
            backend=args.backend,
            working_dir=args.workdir,
            requirements={"min_memory_per_gpu_bytes": int(args.min_memory_gib * GIB), "gpu_model": args.gpu_model},
            estimated_runtime_seconds=args.estimated_runtime,
            spread=args.spread,
            max_restarts=args.max_restarts,
            min_gpus=args.min_gpus,
            progress_timeout_seconds=args.progress_timeout,
        )
        job_id = client.submit_job(spec)
        print(json.dumps({"job_id": job_id}) if as_json else job_id, flush=True)
        if args.watch:
            return _watch(client, job_id, as_json)
    elif args.command == "jobs":
        found, _ = client.list_jobs(args.state, owner=args.owner, page_size=args.limit)
        if as_json:
            print(json.dumps({"jobs": [_as_json(job) for job in found]}, indent=2))
        else:
            print(format_jobs(found))
    elif args.command == "job":
        show(client.get_job(args.job_id), format_job)
    elif args.command == "cancel":
        show(client.cancel_job(args.job_id), format_job)
    elif args.command == "watch":
        return _watch(client, args.job_id, as_json)
    elif args.command == "logs":
        for chunk in client.job_logs(args.job_id, args.rank, attempt=args.attempt, tail_bytes=args.tail, follow=args.follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    elif args.command == "priority":
        show(client.set_job_priority(args.job_id, args.priority), format_job)
    return 0


def new_token(user: str, role: str) -> tuple[str, str]:
    """A fresh random token and the tokens-file entry that admits it (which holds only its SHA-256)."""
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    entry = f'[[tokens]]\nuser = {json.dumps(user)}\nrole = "{role}"\nsha256 = "{digest}"\n'
    return token, entry


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        token, entry = new_token(args.user, args.role)
        if args.output == "json":
            print(json.dumps({"token": token, "tokens_file_entry": entry}))
        else:
            print(f"token (give it to {args.user}; it is shown only now):\n  {token}\n")
            print(f"add to the coordinator's tokens file (it holds no secret):\n{entry}")
        return 0
    try:
        with Client(args.coordinator, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure) as client:
            return run(args, client)
    except GpuorchError as error:
        print(f"gpuctl: {error.details}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"gpuctl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
