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
    gpuctl resubmit ID           queue the same spec again, print the new id
    gpuctl logs ID [--rank R] [--tail N] [-f]     a rank's output (--tail: lines, --tail-bytes: bytes)
    gpuctl priority ID P         change a pending or running job's priority
    gpuctl token --user U [--role R]              make a new token and its [[tokens]] entry
    gpuctl completion bash|zsh   a shell completion script

Global options (-o json, --coordinator, --token, ...) go before or after the command. The
coordinator address comes from --coordinator, else $GPUORCH_COORDINATOR, else
127.0.0.1:50051 (port 50051 when an address names none). Times are local, with their zone
(--utc for UTC). Everything printed for people has control characters escaped. A coordinator with
tokens wants --token (or $GPUORCH_TOKEN). To any address but loopback gpuctl speaks
TLS, trusting --tls-ca (or $GPUORCH_TLS_CA), else the system's CAs; --insecure (or
$GPUORCH_CLIENT_INSECURE=1) is for a coordinator that serves plaintext on the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC

from google.protobuf.json_format import MessageToDict

from gpuorch.client import Client, build_job_spec, default_address, new_request_id
from gpuorch.errors import GpuorchError
from gpuorch.v1 import cluster_pb2, job_pb2

GIB = 1024**3
OUTPUT_FORMATS = ("table", "json")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_TIME_ZONE = {"utc": False}
"""Set once by main(): print times in UTC instead of local time."""


def printable(text: object) -> str:
    """`text` with every C0 and C1 control character (and DEL) escaped as \\n, \\t, \\xNN: names,
    reasons and argv come from users and agents, and an escape sequence in them must never reach
    the terminal raw. Every table and detail view passes what it prints through here."""
    return _CONTROL.sub(lambda match: _NAMED_ESCAPES.get(match.group(), f"\\x{ord(match.group()):02x}"), str(text))


def parse_size(text: str) -> int:
    """Bytes from "64G", "512M", "1.5T", "1048576" (powers of 1024; a trailing "B" or "iB" is allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 64G, 512M or 1073741824, got {text!r}")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])


def _as_json(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _short_state(value: int) -> str:
    return cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[printable(cell) for cell in row] for row in rows]
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
    lines = [printable(line) for line in lines]
    lines.append(_table(("IDX", "UUID", "NAME", "HEALTHY", "MEMORY", "UTIL", "TEMP", "POWER", "ECC C/U", "XIDS", "JOB"), rows))
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
        f"Heartbeats:   {status.heartbeats_per_second:.1f}/s, ingest lag p50 {status.heartbeat_lag_p50_ms:.1f} ms, p99 {status.heartbeat_lag_p99_ms:.1f} ms",
        f"Coordinator:  epoch {status.coordinator_epoch}",
    ]
    if status.jobs_by_state:
        jobs = ", ".join(
            f"{name.removeprefix('JOB_STATE_').lower()} {count}" for name, count in sorted(status.jobs_by_state.items()) if count
        )
        lines.insert(4, f"Jobs:         {jobs or 'none'}")
    return "\n".join(printable(line) for line in lines)


def _job_state(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def _stamp(stamp) -> str:
    """A timestamp in local time with its zone (UTC with --utc)."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = stamp.ToDatetime(tzinfo=UTC)
    if not _TIME_ZONE["utc"]:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


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
    limits = []
    if spec.pids_max:
        limits.append(f"pids_max {spec.pids_max}")
    if spec.memory_max_bytes:
        limits.append(f"memory_max {spec.memory_max_bytes / GIB:g} GiB")
    lines = [
        f"Job:        {job.job_id}" + (f" ({spec.name})" if spec.name else ""),
        f"State:      {_job_state(job.state)}" + (f": {job.reason}" if job.reason else ""),
        f"Command:    {shlex.join(spec.argv)}",
        f"Working dir: {spec.working_dir}"
        if spec.working_dir
        else f"Submitted from: {spec.submit_dir or '-'} (ranks run there where the node has it)",
        f"GPUs:       {spec.gpus}"
        + (f", {spec.gpus_per_node} per node" if spec.gpus_per_node else "")
        + f", backend {spec.backend}",
        f"Owner:      {spec.owner or '-'}   priority {spec.priority}   attempt {job.attempt}   restarts {job.restarts} of {spec.max_restarts}",
        f"Submitted:  {_stamp(job.submit_time)}   started {_stamp(job.start_time)}   ended {_stamp(job.end_time)}",
    ]
    if limits:
        lines.append(f"Limits:     {', '.join(limits)} per rank")
    lines = [printable(line) for line in lines]
    if job.placement.nodes:
        lines.append(
            printable(
                f"Rendezvous: {job.placement.master_addr}:{job.placement.master_port}, world size {job.placement.world_size}"
            )
        )
        rows = [
            (
                node.node_rank,
                node.node_id,
                f"{node.first_rank}-{node.first_rank + len(node.device_uuids) - 1}",
                ",".join(map(str, node.device_indexes)),
                " ".join(node.device_uuids),
            )
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
        for attempt in job.attempts:
            for node_id, directory in sorted(attempt.working_dirs.items()):
                lines.append(printable(f"attempt {attempt.attempt} working dir on {node_id}: {directory}"))
    return "\n".join(lines)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env wants KEY=VALUE, got {text!r}")
    return key, value


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes. On the subcommands they default to SUPPRESS, so one given after
    the command (`gpuctl nodes -o json`, kubectl's habit) overrides one given before it, and an absent
    one leaves the value from before the command (or the default) alone."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--coordinator",
        default=default(None),
        help=f"HOST[:PORT], port 50051 if none (default $GPUORCH_COORDINATOR or {default_address()})",
    )
    group.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default=default("table"), help="output format: table (default) or json"
    )
    group.add_argument("--timeout", type=float, default=default(10.0), help="seconds to wait for the coordinator (default 10)")
    group.add_argument(
        "--token", default=default(None), help="bearer token (default $GPUORCH_TOKEN); prefer the variable: flags show in ps"
    )
    group.add_argument(
        "--tls-ca",
        default=default(None),
        metavar="PEM",
        help="CA that signed the coordinator's certificate (default $GPUORCH_TLS_CA, else the system's CAs)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=default(None),
        help="plaintext to a coordinator off this machine that serves it (default $GPUORCH_CLIENT_INSECURE)",
    )
    group.add_argument(
        "--tls-cert",
        default=default(None),
        metavar="PEM",
        help="client certificate, for a coordinator that asks every client for one",
    )
    group.add_argument("--tls-key", default=default(None), metavar="PEM", help="key of --tls-cert")
    group.add_argument(
        "--utc", action="store_true", default=default(False), help="print times in UTC (default: local time, with the zone)"
    )


def _states(enum, prefix: str) -> str:
    names = [value.name for value in enum.DESCRIPTOR.values]
    return ", ".join(name.removeprefix(prefix).lower() for name in names if not name.endswith("UNSPECIFIED"))


NODE_STATES = _states(cluster_pb2.NodeState, "NODE_STATE_")
JOB_STATES = _states(job_pb2.JobState, "JOB_STATE_")
BACKENDS = ("nccl", "gloo")
POLICY_NOTE = "The queue's order is the coordinator's scheduler_policy: priority (default), fcfs, sjf or fair_share."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuctl",
        description="Operate a gpuorch cluster.",
        epilog="example: gpuctl nodes -o json\nevery command's --help lists its options and shows an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str, details: str = "", **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=f"{help}. {details}" if details else help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        _add_global_options(sub, suppress=True)
        return sub

    nodes = command("nodes", "list nodes", "gpuctl nodes --state ready -o json")
    nodes.add_argument("--state", action="append", default=[], help=f"only nodes in this state (repeatable): {NODE_STATES}")
    command("node", "show one node and its GPUs", "gpuctl node node-a").add_argument("node_id")
    command("status", "cluster totals", "gpuctl status")
    drain = command("drain", "stop placing new work on a node", 'gpuctl drain node-b --reason "swap PSU"')
    drain.add_argument("node_id")
    drain.add_argument("--reason", default="", help="why, shown on the node")
    command("resume", "open a drained node for work again", "gpuctl resume node-b").add_argument("node_id")

    submit = command(
        "submit",
        "queue a job; prints its id",
        "cd examples && gpuctl submit --gpus 4 --backend gloo -- python allreduce.py",
        usage="gpuctl submit [options] -- CMD [ARGS...]",
    )
    submit.add_argument("--gpus", type=int, default=1, help="ranks, one GPU each (default 1)")
    submit.add_argument("--gpus-per-node", type=int, default=0, help="ranks per node (default: any split)")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first under the priority policy. " + POLICY_NOTE)
    submit.add_argument("--name", default="", help="a name for people")
    submit.add_argument("--owner", default="", help="who it is for (default $USER)")
    submit.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="K=V",
        help="environment variable for every rank (repeatable)",
    )
    submit.add_argument(
        "--backend", default="", choices=("", *BACKENDS), help="torch.distributed backend: nccl (default) or gloo"
    )
    submit.add_argument(
        "--working-dir",
        "--workdir",
        dest="working_dir",
        default="",
        metavar="DIR",
        help="working directory of every rank on its node (absolute). Default: the directory you submit from, where the node has it, "
        "else a directory for the job under the agent's state dir",
    )
    submit.add_argument("--min-memory-gib", type=float, default=0, help="only GPUs with at least this much memory")
    submit.add_argument("--gpu-model", default="", help="only GPUs whose name contains this, e.g. H100")
    submit.add_argument("--estimated-runtime", type=int, default=0, metavar="SECONDS", help="for the sjf policy")
    submit.add_argument("--spread", action="store_true", help="spread ranks over as many nodes as possible")
    submit.add_argument("--max-restarts", type=int, default=0, help="restart a failed attempt up to this many times (default 0)")
    submit.add_argument(
        "--min-gpus", type=int, default=0, help="elastic floor: after a failure, restart on as few as this many GPUs"
    )
    submit.add_argument(
        "--progress-timeout", type=int, default=0, metavar="SECONDS", help="restart when no rank reports progress this long"
    )
    submit.add_argument("--pids-max", type=int, default=0, metavar="N", help="most processes per rank (default: the node's)")
    submit.add_argument(
        "--memory-max",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="most memory per rank, e.g. 64G or 512M (default: the node's)",
    )
    submit.add_argument(
        "--hold-if-too-big",
        action="store_true",
        help="queue it even if it needs more GPUs than the cluster has (default: refuse it)",
    )
    submit.add_argument(
        "--request-id",
        default="",
        metavar="ID",
        help="idempotency key: submitting again with it returns the same job (default: a new one)",
    )
    submit.add_argument("--watch", action="store_true", help="then follow it like `gpuctl watch`")
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    jobs = command("jobs", "list jobs, newest first", "gpuctl jobs --state pending --state running --owner alice")
    jobs.add_argument("--state", action="append", default=[], help=f"only jobs in this state (repeatable): {JOB_STATES}")
    jobs.add_argument("--owner", default="", help="only jobs of this owner")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    command("job", "show one job: spec, placement, every attempt and where it ran", "gpuctl job j-000001 --utc").add_argument(
        "job_id"
    )
    command("cancel", "cancel a job", "gpuctl cancel j-000001").add_argument("job_id")
    resubmit = command("resubmit", "queue a job's spec again as a new job; prints the new id", "gpuctl resubmit j-000001 --watch")
    resubmit.add_argument("job_id")
    resubmit.add_argument("--watch", action="store_true", help="then follow the new job like `gpuctl watch`")
    command("watch", "follow a job until it ends; exit 0 only if it succeeded", "gpuctl watch j-000001").add_argument("job_id")
    logs = command("logs", "a rank's output", "gpuctl logs j-000001 --rank 3 --tail 100 -f")
    logs.add_argument("job_id")
    logs.add_argument("--rank", type=int, default=0, help="global rank (default 0)")
    logs.add_argument("--attempt", type=int, default=0, help="attempt (default: the latest)")
    logs.add_argument("--tail", type=int, default=0, metavar="LINES", help="only the last LINES lines")
    logs.add_argument("--tail-bytes", type=int, default=0, metavar="BYTES", help="only the last BYTES bytes")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    token = command(
        "token",
        "make a new token: prints it, and the [[tokens]] entry for the coordinator's tokens file",
        "gpuctl token --user alice --role user",
    )
    token.add_argument("--user", required=True, help="who the token authenticates as (jobs run as this local user)")
    token.add_argument(
        "--role",
        choices=("user", "admin"),
        default="user",
        help="user (default) or admin: admin may drain nodes and act on every job",
    )
    priority = command("priority", "change a job's priority", "gpuctl priority j-000001 10", POLICY_NOTE)
    priority.add_argument("job_id")
    priority.add_argument("priority", type=int)
    completion = command(
        "completion",
        "print a shell completion script",
        'eval "$(gpuctl completion bash)"   # or: source <(gpuctl completion zsh)',
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="bash or zsh")
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_table(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]]]:
    """A parser's option strings, and the values of those that take a fixed set."""
    options: list[str] = []
    values: dict[str, list[str]] = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        options += [option for option in action.option_strings if option.startswith("--")] or action.option_strings
        if action.choices:
            for option in action.option_strings:
                values[option] = [str(choice) for choice in action.choices if choice]
    return options, values


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A completion script for `shell`, generated from the parser, so it never falls behind the commands."""
    parser = parser or build_parser()
    commands = _subcommands(parser)
    global_options, global_values = _option_table(parser)
    per_command = {name: _option_table(sub) for name, sub in commands.items()}
    if shell == "bash":
        cases = []
        for name, (options, values) in per_command.items():
            value_cases = "".join(
                f'      {option}) COMPREPLY=($(compgen -W {shlex.quote(" ".join(choices))} -- "$cur")); return;;\n'
                for option, choices in values.items()
            )
            cases.append(
                f'    {name})\n      case "$prev" in\n{value_cases}      esac\n'
                f'      COMPREPLY=($(compgen -W {shlex.quote(" ".join(options))} -- "$cur")); return;;\n'
            )
        global_value_cases = "".join(
            f'    {option}) COMPREPLY=($(compgen -W {shlex.quote(" ".join(choices))} -- "$cur")); return;;\n'
            for option, choices in global_values.items()
        )
        return (
            "# bash completion for gpuctl, generated by `gpuctl completion bash`\n"
            "_gpuctl() {\n"
            '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" word\n'
            '  for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do\n'
            f'    case "$word" in {"|".join(commands)}) command=$word; break;; esac\n'
            "  done\n"
            '  case "$command" in\n' + "".join(cases) + "  esac\n"
            '  case "$prev" in\n' + global_value_cases + "  esac\n"
            f'  COMPREPLY=($(compgen -W {shlex.quote(" ".join([*commands, *global_options]))} -- "$cur"))\n'
            "}\n"
            "complete -F _gpuctl gpuctl\n"
        )
    if shell == "zsh":

        def zsh_words(words) -> str:
            return " ".join(shlex.quote(word) for word in words)

        lines = [
            "#compdef gpuctl",
            "# zsh completion for gpuctl, generated by `gpuctl completion zsh`",
            "_gpuctl() {",
            "  local command word",
            "  for word in ${words[2,CURRENT-1]}; do",
            f"    case $word in ({'|'.join(commands)}) command=$word; break;; esac",
            "  done",
            '  case "${words[CURRENT-1]}" in',
        ]
        all_values = dict(global_values)
        for _, values in per_command.values():
            all_values.update(values)
        for option, choices in all_values.items():
            lines.append(f"    ({option}) compadd -- {zsh_words(choices)}; return;;")
        lines.append("  esac")
        lines.append("  case $command in")
        for name, (options, _) in per_command.items():
            lines.append(f"    ({name}) compadd -- {zsh_words(options)};;")
        lines.append(f"    (*) compadd -- {zsh_words([*commands, *global_options])};;")
        lines += ["  esac", "}", 'if [ "$funcstack[1]" = "_gpuctl" ]; then _gpuctl "$@"; else compdef _gpuctl gpuctl; fi', ""]
        return "\n".join(lines)
    raise ValueError(f"no completion for shell {shell!r}: use bash or zsh")


def _watch(client: Client, job_id: str, as_json: bool) -> int:
    last = None
    for job in client.watch_job(job_id):
        if as_json:
            print(json.dumps(_as_json(job)), flush=True)
        else:
            line = f"{job.job_id} {_job_state(job.state)} attempt {job.attempt}" + (f": {job.reason}" if job.reason else "")
            print(printable(line), flush=True)
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
            working_dir=args.working_dir,  # without it, the SDK sends this directory as submit_dir
            requirements={"min_memory_per_gpu_bytes": int(args.min_memory_gib * GIB), "gpu_model": args.gpu_model},
            estimated_runtime_seconds=args.estimated_runtime,
            spread=args.spread,
            max_restarts=args.max_restarts,
            min_gpus=args.min_gpus,
            progress_timeout_seconds=args.progress_timeout,
            pids_max=args.pids_max,
            memory_max_bytes=args.memory_max,
            hold_if_too_big=args.hold_if_too_big,
        )
        # One id for this submission, however often grpc retries it: a retry never queues a second job.
        job_id = client.submit_job(spec, client_request_id=args.request_id or new_request_id())
        print(json.dumps({"job_id": job_id}) if as_json else job_id, flush=True)
        if args.watch:
            return _watch(client, job_id, as_json)
    elif args.command == "resubmit":
        original = client.get_job(args.job_id)
        spec = job_pb2.JobSpec()
        spec.CopyFrom(original.spec)
        if spec.env and original.env_redacted:
            raise ValueError(
                f"the env values of {args.job_id} are hidden from you, so its spec cannot be submitted again as it was"
            )
        job_id = client.submit_job(spec, client_request_id=new_request_id())
        print(json.dumps({"job_id": job_id, "resubmitted": args.job_id}) if as_json else job_id, flush=True)
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
        chunks = client.job_logs(
            args.job_id, args.rank, attempt=args.attempt, tail_lines=args.tail, tail_bytes=args.tail_bytes, follow=args.follow
        )
        for chunk in chunks:  # the rank's own bytes, as they are (like `kubectl logs`)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    _TIME_ZONE["utc"] = bool(args.utc)
    if args.command == "completion":
        sys.stdout.write(completion_script(args.shell, parser))
        return 0
    if args.command == "token":
        token, entry = new_token(args.user, args.role)
        if args.output == "json":
            print(json.dumps({"token": token, "tokens_file_entry": entry}))
        else:
            print(f"token (give it to {printable(args.user)}; it is shown only now):\n  {token}\n")
            print(f"add to the coordinator's tokens file (it holds no secret):\n{entry}")
        return 0
    try:
        with Client(
            args.coordinator,
            timeout=args.timeout,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            insecure=args.insecure,
        ) as client:
            return run(args, client)
    except GpuorchError as error:
        print(f"gpuctl: {printable(error.details)}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"gpuctl: {printable(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
