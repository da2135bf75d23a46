"""gpuctl run, attach, exec and port-forward: interactive sessions on the terminal.

The local terminal is put in raw mode while a remote terminal is attached (every key, Ctrl-C
included, goes to the remote process; the remote pty's line discipline does the rest), window
size changes (SIGWINCH) are sent on, and gpuctl exits with the remote command's exit status
(128 + N for a signal N, like a shell). A lost connection exits 255 (like ssh); the job waits
for `gpuctl attach` until its attach grace is over.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

from gpuorch.cli.job_flags import add_telemetry_flags, telemetry_fields
from gpuorch.cli.printing import job_state_name, printable
from gpuorch.cli.views import start_column
from gpuorch.client import Client, build_job_spec, new_request_id
from gpuorch.errors import GpuorchError
from gpuorch.interactive import Session
from gpuorch.v1 import job_pb2

COMMANDS = ("run", "attach", "exec", "port-forward")
LOGIN_SHELL = ["/bin/sh", "-c", 'shell=$(getent passwd "$(id -un)" 2>/dev/null | cut -d: -f7); exec "${shell:-/bin/sh}" -l']
"""The default command of gpuctl run: the owner's login shell on the node (from its passwd entry)."""
POLL_SECONDS = 1.0
LOST_CONNECTION = 255
FINAL_STATES = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


def add_interactive_commands(command: Callable[..., argparse.ArgumentParser], parse_time_limit, parse_pool) -> None:
    """The four commands' arguments (`command` is the parser's subcommand maker)."""
    run = command(
        "run",
        "an interactive job: queue it, then attach this terminal to its rank 0 (like srun --pty)",
        "gpuctl run --gpus 1 -- bash",
        "Without a command, the owner's login shell on the node.",
        usage="gpuctl run [options] [-- CMD [ARGS...]]",
    )
    run.add_argument("--gpus", type=int, default=1, help="ranks, one GPU each (default 1); ranks but 0 run CMD with no terminal")
    run.add_argument("--gpus-per-node", type=int, default=0, help="ranks per node (default: any split)")
    run.add_argument("--time-limit", type=parse_time_limit, default=0, metavar="T", help="longest it may run: 90m, 2h, HH:MM:SS")
    run.add_argument("--pool", type=parse_pool, default="", help="node pool to run in")
    run.add_argument("--name", default="", help="a name for people")
    run.add_argument("--priority", type=int, default=0, help="higher runs first under the priority policy")
    run.add_argument(
        "--attach-grace",
        type=parse_time_limit,
        default=0,
        metavar="T",
        help="cancel the job when no terminal is attached this long (default: the coordinator's, 60s)",
    )
    add_telemetry_flags(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    attach = command("attach", "attach this terminal to an interactive job's rank 0 again", "gpuctl attach j-000042")
    attach.add_argument("job_id")
    exec_ = command(
        "exec",
        "run a command beside a running rank, on its node, as the job's owner with the rank's environment",
        "gpuctl exec j-000042 --rank 1 -it -- py-spy dump --pid 1234",
        usage="gpuctl exec JOB [--rank R] [-i] [-t] -- CMD [ARGS...]",
    )
    exec_.add_argument("job_id")
    exec_.add_argument("--rank", type=int, default=0, help="global rank to run beside (default 0)")
    exec_.add_argument("-i", "--stdin", action="store_true", help="send this terminal's input to the command")
    exec_.add_argument("-t", "--tty", action="store_true", help="run the command on a terminal")
    exec_.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    forward = command(
        "port-forward",
        "forward a local port to a port on a rank's node, through the coordinator",
        "gpuctl port-forward j-000042 8888:8888",
        "LOCAL 0 picks a free port (printed).",
    )
    forward.add_argument("job_id")
    forward.add_argument("ports", metavar="LOCAL:REMOTE", help="local port, and the port on the node's loopback")
    forward.add_argument("--rank", type=int, default=0, help="the rank whose node to reach (default 0)")
    forward.add_argument("--address", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)")


def run_interactive(args: argparse.Namespace, client: Client) -> int:
    if args.command == "run":
        return _run(args, client)
    if args.command == "attach":
        return _attach(client, args.job_id)
    if args.command == "exec":
        argv = _command(args.argv)
        if not argv:
            raise ValueError("exec needs a command after --, e.g. gpuctl exec j-000042 -- nvidia-smi")
        return _exec(client, args, argv)
    return _port_forward(client, args)


def _command(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def _say(text: str) -> None:
    print(f"gpuctl: {printable(text)}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, client: Client) -> int:
    spec = build_job_spec(
        _command(args.argv) or LOGIN_SHELL,
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        time_limit_seconds=args.time_limit,
        pool=args.pool,
        name=args.name,
        priority=args.priority,
        owner=os.environ.get("USER", ""),
        interactive=True,
        attach_grace_seconds=args.attach_grace,
        **telemetry_fields(args),
    )
    job_id = client.submit_job(spec, client_request_id=new_request_id())
    _say(f"job {job_id} submitted")
    try:
        job = _wait_until_running(client, job_id)
    except KeyboardInterrupt:
        with contextlib.suppress(GpuorchError):
            client.cancel_job(job_id)
        _say(f"job {job_id} cancelled")
        return 130
    if job.state != job_pb2.JOB_STATE_RUNNING:
        _say(f"job {job_id} is {job_state_name(job.state)}" + (f": {job.reason}" if job.reason else ""))
        return 0 if job.state == job_pb2.JOB_STATE_SUCCEEDED else 1
    return _attach(client, job_id)


def _wait_until_running(client: Client, job_id: str) -> job_pb2.Job:
    """Polls the job, saying why it waits and when it is expected to start whenever that changes."""
    said = None
    while True:
        job = client.get_job(job_id)
        if job.state == job_pb2.JOB_STATE_RUNNING or job.state in FINAL_STATES:
            return job
        news = (job.reason, start_column(job))
        if news != said:
            _say(f"job {job_id} waiting: {job.reason or 'queued'} (estimated start: {news[1]})")
            said = news
        time.sleep(POLL_SECONDS)


def _attach(client: Client, job_id: str) -> int:
    rows, columns = _window_size()
    session = client.attach(job_id, rows=rows, columns=columns)
    return _relay_terminal(session, terminal=True, send_stdin=True, what=f"gpuctl attach {job_id}")


def _exec(client: Client, args: argparse.Namespace, argv: list[str]) -> int:
    rows, columns = _window_size()
    session = client.exec(args.job_id, argv, rank=args.rank, tty=args.tty, rows=rows, columns=columns)
    if not args.stdin:
        session.end_input()
    return _relay_terminal(session, terminal=args.tty, send_stdin=args.stdin, what="")


def _window_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
        return size.lines, size.columns
    except OSError:
        return 0, 0


def exit_status(session: Session) -> int:
    """gpuctl's exit code: the remote command's status (128 + N for signal N), else 1, or 255 for a lost connection."""
    ended = session.ended
    if ended is None:
        return LOST_CONNECTION
    if not ended.process_exited:
        return 1
    return 128 + ended.signal if ended.signal else ended.exit_code


def _relay_terminal(session: Session, *, terminal: bool, send_stdin: bool, what: str) -> int:
    """Relays this terminal (or stdin/stdout) and the session until it ends; returns gpuctl's exit code."""
    stdin = sys.stdin.fileno()
    raw = terminal and os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if raw else None
    finished = threading.Event()
    failure: list[BaseException] = []

    def output() -> None:
        try:
            for message in session:
                kind = message.WhichOneof("payload")
                if kind == "data":
                    _write(sys.stdout.fileno(), message.data)
                elif kind == "error_data":
                    _write(sys.stderr.fileno(), message.error_data)
                elif kind == "ended":
                    break
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failure.append(error)
        finally:
            finished.set()

    def read_input() -> None:
        with contextlib.suppress(OSError):
            while not finished.is_set():
                data = os.read(stdin, 65536)
                if not data:
                    if not terminal:
                        session.end_input()
                    return
                session.send(data)

    def on_resize(_signum, _frame) -> None:
        rows, columns = _window_size()
        if rows and columns:
            session.resize(rows, columns)

    def on_interrupt(_signum, _frame) -> None:  # only when the local terminal is not raw
        if terminal:
            session.send(b"\x03")
        else:
            session.signal(signal.SIGINT)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGWINCH, signal.SIGINT)}
    signal.signal(signal.SIGWINCH, on_resize)
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        if raw:
            tty.setraw(stdin, termios.TCSANOW)  # not TCSAFLUSH: keys typed while queued still count
        threading.Thread(target=output, daemon=True).start()
        if send_stdin:
            threading.Thread(target=read_input, daemon=True).start()
        while not finished.wait(0.1):  # the main thread stays free for the signal handlers
            pass
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        session.close()
    if failure:
        error = failure[0]
        if isinstance(error, GpuorchError) and session.ended is None and what and error.code.name == "UNAVAILABLE":
            _say(f"connection lost: {error.details}; reconnect with `{what}` within the job's attach grace")
            return LOST_CONNECTION
        raise error
    ended = session.ended
    if ended is not None and ended.message and not ended.process_exited:
        _say(ended.message)
    elif ended is None and what:
        _say(f"connection lost; reconnect with `{what}` within the job's attach grace")
    return exit_status(session)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _port_forward(client: Client, args: argparse.Namespace) -> int:
    local_text, colon, remote_text = args.ports.partition(":")
    try:
        local, remote = int(local_text), int(remote_text)
    except ValueError:
        raise ValueError(f"expected LOCAL:REMOTE ports, e.g. 8888:8888, got {args.ports!r}") from None
    if not colon or not 0 <= local <= 65535 or not 1 <= remote <= 65535:
        raise ValueError(f"expected LOCAL:REMOTE ports (LOCAL 0-65535, 0 = any free one; REMOTE 1-65535), got {args.ports!r}")
    job = client.get_job(args.job_id)  # a job that is not there fails now, not at the first connection
    if job.state != job_pb2.JOB_STATE_RUNNING:
        raise ValueError(f"job {args.job_id} is {job_state_name(job.state)}, not RUNNING")
    _probe_forward(client, args.job_id, args.rank, remote)
    listener = socket.create_server((args.address, local))
    bound = listener.getsockname()[1]
    print(f"Forwarding from {args.address}:{bound} -> port {remote} on the node of rank {args.rank}", flush=True)
    try:
        while True:
            connection, _ = listener.accept()
            threading.Thread(target=_forward_one, args=(client, args.job_id, args.rank, remote, connection), daemon=True).start()
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()


def _probe_forward(client: Client, job_id: str, rank: int, port: int) -> None:
    """One connection at once, so that a refusal (another user's job, no such rank) fails the command now; a port not
    listening yet is only reported (the server may still be starting)."""
    with client.port_forward(job_id, port, rank=rank) as session:
        for message in session:
            if message.WhichOneof("payload") == "ended" and message.ended.message:
                _say(f"port-forward: {message.ended.message} (forwarding anyway)")
            break


def _forward_one(client: Client, job_id: str, rank: int, port: int, connection: socket.socket) -> None:
    """One local connection, relayed as one PortForward stream."""
    try:
        session = client.port_forward(job_id, port, rank=rank)
    except GpuorchError as error:
        _say(f"port-forward: {error.details}")
        connection.close()
        return

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while True:
                data = connection.recv(256 * 1024)
                if not data:
                    session.end_input()
                    return
                session.send(data)

    threading.Thread(target=upstream, daemon=True).start()
    try:
        for message in session:
            kind = message.WhichOneof("payload")
            if kind == "data":
                connection.sendall(message.data)
            elif kind == "ended":
                if message.ended.message and "closed on the node" not in message.ended.message:
                    _say(f"port-forward: {message.ended.message}")
                break
    except (GpuorchError, OSError) as error:
        _say(f"port-forward: {getattr(error, 'details', None) or error}")
    finally:
        session.close()
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()
