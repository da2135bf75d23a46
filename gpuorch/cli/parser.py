"""gpuctl's command line: every command, its options, its help and an example."""

from __future__ import annotations

import argparse
import re

from gpuorch.arrays import parse_array, parse_dependency
from gpuorch.cli.history import add_history_arguments
from gpuorch.cli.interactive import add_interactive_commands
from gpuorch.cli.job_flags import add_telemetry_flags
from gpuorch.cli.usage_report import add_usage_arguments
from gpuorch.client import default_address
from gpuorch.durations import parse_duration
from gpuorch.pools import pool_name_problem
from gpuorch.v1 import cluster_pb2, job_pb2

OUTPUT_FORMATS = ("table", "json", "csv")
"""csv is for `gpuctl results` only."""
_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from "64G", "512M", "1.5T", "1048576" (powers of 1024; a trailing "B" or "iB" is allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 64G, 512M or 1073741824, got {text!r}")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])


def parse_time_limit(text: str) -> int:
    """--time-limit: seconds, 90m, 2h, 1h30m or HH:MM:SS."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_pool(text: str) -> str:
    problem = pool_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env wants KEY=VALUE, got {text!r}")
    return key, value


def _array(text: str):
    try:
        return parse_array(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _dependency(text: str):
    try:
        return parse_dependency(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
        metavar="HOST[:PORT][,...]",
        help="the coordinator, or a comma-separated list of them (their leader is followed); port 50051 if none "
        f"(default $GPUORCH_COORDINATOR or {default_address()})",
    )
    group.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default=default("table"), help="table (default) or json; csv for results"
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
    usage = command(
        "usage",
        "the cost report: GPU-hours, utilisation and peak memory by owner, pool or job",
        "gpuctl usage --by pool --since 30d -o csv",
        "From every attempt's record in the job store (GetUsage); --history: the cluster's usage over time instead.",
    )
    add_usage_arguments(usage)
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
        help="working directory of every rank on its node (absolute). Default: the directory you submit from, "
        "where the node has it, else a directory for the job under the agent's state dir",
    )
    submit.add_argument("--min-memory-gib", type=float, default=0, help="only GPUs with at least this much memory")
    submit.add_argument("--gpu-model", default="", help="only GPUs whose name contains this, e.g. H100")
    submit.add_argument(
        "--estimated-runtime",
        type=int,
        default=0,
        metavar="SECONDS",
        help="for sjf, backfill and start estimates (default: predicted)",
    )
    submit.add_argument("--spread", action="store_true", help="spread ranks over as many nodes as possible")
    submit.add_argument(
        "--pool", type=parse_pool, default="", help="node pool to run in (the agents' --pool; default: the default pool)"
    )
    submit.add_argument(
        "--time-limit",
        type=parse_time_limit,
        default=0,
        metavar="T",
        help="longest each rank may run: seconds, 90m, 2h, 1h30m or HH:MM:SS; then SIGTERM, SIGKILL after the grace, "
        "and the job fails with reason time_limit (no restart). Also the runtime estimate when --estimated-runtime is not given",
    )
    submit.add_argument("--max-restarts", type=int, default=0, help="restart a failed attempt up to this many times (default 0)")
    submit.add_argument(
        "--no-preempt",
        action="store_true",
        help="never preempt it for higher-priority work (default: it may be, after a grace to checkpoint, and is requeued)",
    )
    submit.add_argument(
        "--min-gpus", type=int, default=0, help="elastic floor: after a failure, restart on as few as this many GPUs"
    )
    submit.add_argument(
        "--progress-timeout", type=int, default=0, metavar="SECONDS", help="restart when no rank reports progress this long"
    )
    add_telemetry_flags(submit)
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
    submit.add_argument(
        "--array",
        type=_array,
        default=None,
        metavar="FIRST-LAST[:STEP][%MAX]",
        help="a job array: one task per index (GPUORCH_ARRAY_INDEX, '{index}' in the command), at most MAX running "
        "at once; prints the array's id, e.g. --array 0-99%%8",
    )
    submit.add_argument(
        "--after",
        action="append",
        type=_dependency,
        default=[],
        metavar="JOB[:ok|:fail|:any]",
        help="start only once JOB (a job, an array: all its tasks) succeeded (ok, the default), failed or cancelled "
        "(fail), or ended (any); cancelled if that can no longer happen (repeatable: all must hold)",
    )
    submit.add_argument("--watch", action="store_true", help="then follow it like `gpuctl watch`")
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    jobs = command("jobs", "list jobs, newest first", "gpuctl jobs --state pending --state running --owner alice")
    jobs.add_argument("--state", action="append", default=[], help=f"only jobs in this state (repeatable): {JOB_STATES}")
    jobs.add_argument("--owner", default="", help="only jobs of this owner")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    history = command(
        "history",
        "jobs that ran or ended in a time window (like sacct), newest first, old ones included",
        "gpuctl history --user alice --since 7d --state failed -o json",
    )
    add_history_arguments(history, JOB_STATES)
    jobs.add_argument("--tasks", action="store_true", help="every task of an array on its own line (default: one line per array)")
    results = command(
        "results",
        "a job array's tasks with their state, runtime and reported result fields",
        "gpuctl results j-000123-k7f3q2 --sort loss -o csv",
        "Each task reports its result with gpuorch.worker.report_result({...}).",
    )
    results.add_argument("array_id")
    results.add_argument("--sort", default="index", metavar="FIELD", help="sort by a result field, or index, state, runtime")
    results.add_argument("--reverse", action="store_true", help="largest first")
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
    add_interactive_commands(command, parse_time_limit, parse_pool)
    completion = command(
        "completion",
        "print a shell completion script",
        'eval "$(gpuctl completion bash)"   # or: source <(gpuctl completion zsh)',
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="bash or zsh")
    return parser
