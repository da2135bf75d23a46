"""What each command does, and main(): parse, run against the coordinator, turn errors into exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from typing import NoReturn

from gpuorch.cli.completion import completion_script
from gpuorch.cli.history import run_history
from gpuorch.cli.interactive import COMMANDS as INTERACTIVE_COMMANDS
from gpuorch.cli.interactive import run_interactive
from gpuorch.cli.job_flags import telemetry_fields
from gpuorch.cli.parser import build_parser
from gpuorch.cli.printing import GIB, TIME_ZONE, as_json, job_state_name, printable
from gpuorch.cli.results import format_results, results_csv, sort_rows
from gpuorch.cli.usage_report import run_usage
from gpuorch.cli.views import format_job, format_jobs, format_node, format_nodes, format_status
from gpuorch.client import Client, _enum_values, build_job_spec, new_request_id
from gpuorch.errors import GpuorchError
from gpuorch.v1 import job_pb2


def _watch(client: Client, job_id: str, json_output: bool) -> int:
    last = None
    for job in client.watch_job(job_id):
        if json_output:
            print(json.dumps(as_json(job)), flush=True)
        else:
            line = f"{job.job_id} {job_state_name(job.state)} attempt {job.attempt}" + (f": {job.reason}" if job.reason else "")
            print(printable(line), flush=True)
        last = job
    return 0 if last is not None and last.state == job_pb2.JOB_STATE_SUCCEEDED else 1


def run(args: argparse.Namespace, client: Client) -> int:
    json_output = args.output == "json"
    if args.output == "csv" and args.command not in ("results", "usage"):
        raise ValueError(f"-o csv is for gpuctl results and usage; gpuctl {args.command} prints a table or json")

    def show(message, formatter) -> None:
        print(json.dumps(as_json(message), indent=2) if json_output else formatter(message))

    if args.command == "nodes":
        nodes = client.list_nodes(args.state)
        if json_output:
            print(json.dumps({"nodes": [as_json(node) for node in nodes]}, indent=2))
        else:
            print(format_nodes(nodes))
    elif args.command == "node":
        show(client.get_node(args.node_id), format_node)
    elif args.command == "status":
        show(client.cluster_status(), format_status)
    elif args.command == "usage":
        run_usage(args, client)
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
            pool=args.pool,
            time_limit_seconds=args.time_limit,
            non_preemptible=args.no_preempt,
            array=args.array,
            after=args.after,
            **telemetry_fields(args),
        )
        # One id for this submission, however often grpc retries it: a retry never queues a second job.
        job_id = client.submit_job(spec, client_request_id=args.request_id or new_request_id())
        print(json.dumps({"job_id": job_id}) if json_output else job_id, flush=True)
        if args.watch:
            return _watch(client, job_id, json_output)
    elif args.command == "resubmit":
        original = client.get_job(args.job_id)
        spec = job_pb2.JobSpec()
        spec.CopyFrom(original.spec)
        if spec.env and original.env_redacted:
            raise ValueError(
                f"the env values of {args.job_id} are hidden from you, so its spec cannot be submitted again as it was"
            )
        job_id = client.submit_job(spec, client_request_id=new_request_id())
        print(json.dumps({"job_id": job_id, "resubmitted": args.job_id}) if json_output else job_id, flush=True)
        if args.watch:
            return _watch(client, job_id, json_output)
    elif args.command == "jobs":
        if args.tasks:
            states = _enum_values(job_pb2.JobState, "JOB_STATE_", args.state)
            found, _ = client.list_tasks(states=states, owner=args.owner, page_size=args.limit)
        else:
            found, _ = client.list_jobs(args.state, owner=args.owner, page_size=args.limit)
        if json_output:
            print(json.dumps({"jobs": [as_json(job) for job in found]}, indent=2))
        else:
            print(format_jobs(found))
    elif args.command == "history":
        return run_history(args, client)
    elif args.command == "job":
        show(client.get_job(args.job_id), format_job)
    elif args.command == "cancel":
        show(client.cancel_job(args.job_id), format_job)
    elif args.command == "watch":
        return _watch(client, args.job_id, json_output)
    elif args.command == "logs":
        chunks = client.job_logs(
            args.job_id, args.rank, attempt=args.attempt, tail_lines=args.tail, tail_bytes=args.tail_bytes, follow=args.follow
        )
        for chunk in chunks:  # the rank's own bytes, as they are (like `kubectl logs`)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    elif args.command == "results":
        rows = sort_rows(client.array_results(args.array_id), args.sort, args.reverse)
        if args.output == "csv":
            print(results_csv(rows))
        else:
            print(json.dumps({"array_id": args.array_id, "tasks": rows}, indent=2) if json_output else format_results(rows))
    elif args.command in INTERACTIVE_COMMANDS:
        return run_interactive(args, client)
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
    TIME_ZONE["utc"] = bool(args.utc)
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
    except BrokenPipeError:
        # The reader went away (`gpuctl jobs | head`): stop quietly, as other command-line tools do.
        # Python would report the pipe again when it flushes stdout at exit, so point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def console_main() -> NoReturn:
    """The gpuctl process (console script and `python -m gpuorch.cli`): main(), then exit_process."""
    try:
        code = main()
    except SystemExit as stop:  # argparse's usage errors and --help
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """Ends the process once its output is flushed, without the interpreter's finalization. At exit gRPC's
    threads may still be finishing a cancelled stream (the request sender of an interactive session); the
    shutdown freezes such a thread while it holds the call's lock, the call's finalizer then waits for that
    lock for ever, and gpuctl never ends (seen: `gpuctl attach` refused, hanging after printing why)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away, or the stream was closed
            pass
    os._exit(code)
