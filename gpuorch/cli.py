"""gpuctl: the operator's command line, built on the SDK.

    gpuctl nodes                 every node, one line each
    gpuctl node ID               one node and its GPUs
    gpuctl status                cluster totals
    gpuctl drain ID [--reason]   stop placing work on a node
    gpuctl resume ID             open it again

Add `-o json` for machine-readable output. The coordinator address comes from
--coordinator, else $GPUORCH_COORDINATOR, else 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from gpuorch.client import Client, default_address
from gpuorch.errors import GpuorchError
from gpuorch.v1 import cluster_pb2

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuctl", description="Operate a gpuorch cluster.")
    parser.add_argument("--coordinator", default=None, help=f"host:port (default $GPUORCH_COORDINATOR or {default_address()})")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nodes = commands.add_parser("nodes", help="list nodes")
    nodes.add_argument("--state", action="append", default=[], help="only nodes in this state (repeatable)")
    commands.add_parser("node", help="show one node and its GPUs").add_argument("node_id")
    commands.add_parser("status", help="cluster totals")
    drain = commands.add_parser("drain", help="stop placing new work on a node")
    drain.add_argument("node_id")
    drain.add_argument("--reason", default="", help="why, shown on the node")
    commands.add_parser("resume", help="open a drained node for work again").add_argument("node_id")
    return parser


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
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.coordinator, timeout=args.timeout) as client:
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
