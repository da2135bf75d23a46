"""The agent's side of a session: for each NodeSessionRequest (on the Connect stream), a NodeRelay
stream back to the coordinator, carrying one terminal, exec'd process or TCP connection.

A stream per session, not frames on the Connect stream: HTTP/2 gives every stream its own flow
control window, so a session whose client reads slowly stops only itself (its writes wait, then
its reads from the pty or socket), never the heartbeats and task reports on the Connect stream,
nor other sessions. Each stream rides the agent's one connection to the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from agent.interactive.beside import CannotExec, exec_cgroup, read_rank_process, spawn_beside
from agent.interactive.fds import ended_from_exit_file, read_some, wait_fd, write_all
from agent.interactive.terminals import Terminal, Terminals, set_window_size
from agent.ranks import cgroups as cgroup_files
from agent.ranks import watch
from agent.ranks.cgroups import RankLimits
from agent.ranks.spawn import ShimRequest, read_start_notice
from agent.ranks.state_dir import read_exit_file
from agent.ranks.supervisor import Supervisor
from gpuorch.logs import get_logger
from gpuorch.v1 import interactive_pb2, interactive_pb2_grpc

log = get_logger("agent.sessions")

KILL_GRACE_SECONDS = 2.0
"""An exec'd process whose session ended gets SIGHUP, then SIGKILL after this."""
FORWARD_CHUNK_BYTES = 1024 * 1024
"""Most bytes of a forwarded connection per message: fewer, larger messages carry bulk transfers faster (well under
the coordinator's max_message_bytes)."""
FLUSH_SECONDS = 5.0
"""How long a session's end waits for the coordinator to end the stream (having relayed everything)."""
ATTACH_WAIT_SECONDS = 30.0
"""How long an attach waits for the terminal of a rank that is still starting."""

Output = interactive_pb2.SessionOutput
Ended = interactive_pb2.SessionEnded


class NodeSessions:
    """Opens sessions on this node as the coordinator asks."""

    def __init__(self, supervisor: Supervisor, terminals: Terminals, channel: Callable[[], Any], node_id: str) -> None:
        self.supervisor = supervisor
        self.terminals = terminals
        self.channel = channel
        """The agent's channel to the coordinator now (None while disconnected)."""
        self.node_id = node_id
        self._tasks: set[asyncio.Task] = set()
        self.exec_dir = supervisor.state.root / "exec"

    def open(self, request: interactive_pb2.NodeSessionRequest) -> None:
        """Starts the session on a task of its own (never blocks the Connect stream's reader)."""
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, request: interactive_pb2.NodeSessionRequest) -> None:
        channel = self.channel()
        if channel is None:
            log.warning("session dropped: not connected to the coordinator", session=request.session_id)
            return
        call = interactive_pb2_grpc.SessionRelayServiceStub(channel).NodeRelay()
        fields = {"session": request.session_id, "job": request.job_id, "rank": request.rank}
        try:
            hello = interactive_pb2.NodeHello(session_id=request.session_id, secret=request.secret, node_id=self.node_id)
            await call.write(interactive_pb2.NodeSessionOutput(hello=hello))
            kind = request.kind
            log.info("session opened", kind=interactive_pb2.SessionKind.Name(kind), **fields)
            if kind == interactive_pb2.SESSION_KIND_ATTACH:
                await self._attach(request, call)
            elif kind == interactive_pb2.SESSION_KIND_EXEC:
                await self._exec(request, call)
            elif kind == interactive_pb2.SESSION_KIND_PORT_FORWARD:
                await self._forward(request, call)
            else:
                await _end(call, Ended(message=f"unknown session kind {kind}"))
        except (grpc.RpcError, asyncio.InvalidStateError, ConnectionError) as error:
            log.info("session stream ended", error=str(error) or type(error).__name__, **fields)
        except Exception:  # a bug must cost one session, never the agent
            log.exception("session failed", **fields)
        finally:
            # The coordinator ends the stream once it has relayed the last message: cancelling before that could lose it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.code(), FLUSH_SECONDS)
            call.cancel()
            log.info("session closed", **fields)

    # ---- attach -----------------------------------------------------------------------------

    async def _attach(self, request: interactive_pb2.NodeSessionRequest, call) -> None:
        terminal = await self._terminal(request)
        if terminal is None:
            what = f"rank {request.rank} of {request.job_id} attempt {request.attempt}"
            await _end(call, Ended(message=f"{what} has no terminal on node {self.node_id} (not an interactive rank here)"))
            return
        if terminal.ended is not None:
            await _end(call, terminal.ended)
            return
        attachment, missed = terminal.attach()
        if request.size.rows and request.size.columns and terminal.master >= 0:
            set_window_size(terminal.master, request.size.rows, request.size.columns)
        rank = self.supervisor.ranks.get((request.job_id, request.attempt, request.rank))
        pid = rank.record.rank_pid if rank is not None else 0
        await call.write(_out(started=interactive_pb2.SessionStarted(
            node_id=self.node_id, attempt=request.attempt, rank=request.rank, pid=pid)))  # fmt: skip
        if missed:
            await call.write(_out(data=missed))

        async def output() -> None:
            while True:
                data = await attachment.queue.get()
                if data is not None:
                    await call.write(_out(data=data))
                    continue
                if terminal.ended is not None:
                    await _end(call, terminal.ended)
                else:
                    await _end(call, Ended(message=attachment.detached_because or "detached"))
                return

        async def write_input(data: bytes) -> None:
            if terminal.master >= 0:
                with contextlib.suppress(OSError):
                    await write_all(terminal.master, data)

        def resize(size: interactive_pb2.TerminalSize) -> None:
            if terminal.master >= 0 and size.rows and size.columns:
                set_window_size(terminal.master, size.rows, size.columns)

        try:
            await _until_first(output(), _input(call, write_input, resize, lambda: None, lambda signum: None))
        finally:
            terminal.detach(attachment, "the client went away")

    async def _terminal(self, request: interactive_pb2.NodeSessionRequest) -> Terminal | None:
        """The rank's terminal; waits a while for one still starting (the launch and the attach race)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ATTACH_WAIT_SECONDS
        while True:
            terminal = self.terminals.get(request.job_id, request.attempt, request.rank)
            rank = self.supervisor.ranks.get((request.job_id, request.attempt, request.rank))
            if terminal is not None or loop.time() > deadline or (rank is not None and rank.ended.is_set()):
                return terminal
            await asyncio.sleep(0.05)

    # ---- exec -------------------------------------------------------------------------------

    async def _exec(self, request: interactive_pb2.NodeSessionRequest, call) -> None:
        rank = self.supervisor.ranks.get((request.job_id, request.attempt, request.rank))
        what = f"rank {request.rank} of {request.job_id} attempt {request.attempt}"
        if rank is None or rank.ended.is_set() or not rank.record.rank_pid:
            await _end(call, Ended(message=f"{what} is not running on node {self.node_id}"))
            return
        if not request.argv:
            await _end(call, Ended(message="exec needs a command"))
            return
        try:
            beside = read_rank_process(rank.record.rank_pid)
        except CannotExec as error:
            await _end(call, Ended(message=f"{what}: {error}"))
            return
        self.exec_dir.mkdir(mode=0o700, exist_ok=True)
        base = self.exec_dir / f"{request.job_id}@{request.attempt}@{request.rank}@{request.session_id}"
        pid_path, exit_path = str(base.with_suffix(".pid")), str(base.with_suffix(".exit"))
        limits = RankLimits(rank.record.pids_max, rank.record.memory_max_bytes)
        cgroup = ""
        local: list[int] = []  # the agent's ends: [stdin, stdout, stderr] or [terminal]
        remote: list[int] = []  # the process's, closed once the shim has them
        try:
            cgroup = exec_cgroup(self.supervisor.cgroups, rank.record.cgroup, request.session_id, limits)
            if request.tty:
                master, terminal_side = os.openpty()
                local, remote = [master], [terminal_side]
                set_window_size(terminal_side, request.size.rows or 24, request.size.columns or 80)
                stdio = (terminal_side, terminal_side, terminal_side)
            else:
                stdin_read, stdin_write = os.pipe()
                stdout_read, stdout_write = os.pipe()
                stderr_read, stderr_write = os.pipe()
                local, remote = [stdin_write, stdout_read, stderr_read], [stdin_read, stdout_write, stderr_write]
                stdio = (stdin_read, stdout_write, stderr_write)
            shim = ShimRequest(
                self.supervisor.python, list(request.argv), beside.env, "", pid_path, exit_path, beside.working_dir, "",
                beside.identity, cgroup, 0, remote[0] if request.tty else -1,
            )  # fmt: skip
            shim_pid, notify_read = spawn_beside(shim, stdio)
        except OSError as error:
            for fd in local + remote:
                os.close(fd)
            if cgroup:
                cgroup_files.remove(Path(cgroup))
            await _end(call, Ended(message=f"cannot start the command beside {what}: {error.strerror or error}"))
            return
        for fd in remote:
            os.close(fd)
        for fd in local:
            os.set_blocking(fd, False)
        try:
            await self._run_beside(request, call, shim_pid, notify_read, local, exit_path)
        finally:
            for fd in local:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if cgroup:
                await cgroup_files.empty_and_remove(Path(cgroup))
            for leftover in (pid_path, exit_path):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)

    async def _run_beside(self, request, call, shim_pid: int, notify_read: int, local: list[int], exit_path: str) -> None:
        try:
            notice = await read_start_notice(notify_read)
        finally:
            os.close(notify_read)
        started = notice.split()
        rank_pid = int(started[1]) if notice.startswith("started ") and len(started) > 1 else 0
        shim_done = asyncio.get_running_loop().create_task(_wait_child(shim_pid))
        if not rank_pid:
            await shim_done
            await _end(call, ended_from_exit_file(read_exit_file(Path(exit_path)), f"the command did not start: {notice}"))
            return
        await call.write(_out(started=interactive_pb2.SessionStarted(
            node_id=self.node_id, attempt=request.attempt, rank=request.rank, pid=rank_pid)))  # fmt: skip
        stdin = local[0]

        async def pump(fd: int, field: str) -> None:
            while True:
                data = await read_some(fd)
                if not data:
                    return
                await call.write(_out(**{field: data}))

        async def write_input(data: bytes) -> None:
            with contextlib.suppress(OSError):
                await write_all(stdin, data)

        def end_input() -> None:
            if not request.tty:
                with contextlib.suppress(OSError):
                    os.close(stdin)
                local[0] = -1

        def resize(size: interactive_pb2.TerminalSize) -> None:
            if request.tty and size.rows and size.columns:
                set_window_size(stdin, size.rows, size.columns)

        def send_signal(signum: int) -> None:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(rank_pid, signum)

        outputs = [pump(local[0], "data")] if request.tty else [pump(local[1], "data"), pump(local[2], "error_data")]
        output: asyncio.Future[Any] = asyncio.gather(*outputs)
        reader = asyncio.get_running_loop().create_task(_input(call, write_input, resize, end_input, send_signal))
        try:
            done, _ = await asyncio.wait([output, reader], return_when=asyncio.FIRST_COMPLETED)
            if output in done:  # everything the process wrote is sent; the shim records its end
                await shim_done
                await _end(call, ended_from_exit_file(read_exit_file(Path(exit_path)), "the command's exit status is unknown"))
                await _let_the_stream_end(reader)
        finally:
            reader.cancel()
            output.cancel()
            if not shim_done.done():  # the client went away: the command goes too
                send_signal(signal.SIGHUP)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(shim_done), KILL_GRACE_SECONDS)
                send_signal(signal.SIGKILL)
                await shim_done

    # ---- port forward -----------------------------------------------------------------------

    async def _forward(self, request: interactive_pb2.NodeSessionRequest, call) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", request.port), 10.0)
        except (TimeoutError, OSError) as error:
            why = getattr(error, "strerror", None) or str(error) or "timed out"
            await _end(call, Ended(message=f"cannot connect to port {request.port} on node {self.node_id}: {why}"))
            return
        await call.write(_out(started=interactive_pb2.SessionStarted(node_id=self.node_id, attempt=request.attempt,
                                                                     rank=request.rank)))  # fmt: skip

        async def output() -> None:
            while True:
                data = await reader.read(FORWARD_CHUNK_BYTES)
                if not data:
                    await _end(call, Ended(message="the connection was closed on the node"))
                    return
                await call.write(_out(data=data))

        async def write_input(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        def end_input() -> None:
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        try:
            await _until_first(output(), _input(call, write_input, lambda size: None, end_input, lambda signum: None))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _out(**fields: Any) -> interactive_pb2.NodeSessionOutput:
    return interactive_pb2.NodeSessionOutput(output=interactive_pb2.SessionOutput(**fields))


async def _end(call, ended: interactive_pb2.SessionEnded) -> None:
    await call.write(_out(ended=ended))
    with contextlib.suppress(Exception):
        await call.done_writing()


async def _input(call, write_input, resize, end_input, send_signal) -> None:
    """Applies the client's input until its stream ends."""
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            return
        kind = message.WhichOneof("payload")
        if kind == "data":
            await write_input(message.data)
        elif kind == "resize":
            resize(message.resize)
        elif kind == "end_of_input":
            end_input()
        elif kind == "signal" and 0 < message.signal < signal.NSIG:
            send_signal(message.signal)


async def _until_first(output, reader) -> None:
    """Runs a session's output and its input reader until one returns (or raises), then stops the other."""
    output_task, reader_task = asyncio.ensure_future(output), asyncio.ensure_future(reader)
    try:
        done, _ = await asyncio.wait([output_task, reader_task], return_when=asyncio.FIRST_COMPLETED)
        if output_task in done:
            output_task.result()
            await _let_the_stream_end(reader_task)
        else:
            reader_task.result()
    finally:
        for task in (output_task, reader_task):
            task.cancel()
        await asyncio.gather(output_task, reader_task, return_exceptions=True)


async def _let_the_stream_end(reader: asyncio.Future) -> None:
    """Once the last message is written, waits (at most FLUSH_SECONDS) for the coordinator to end the stream, which
    ends the input reader. Cancelling the reader at once would lose that message: cancelling a grpc.aio call's read
    cancels the whole call, messages the coordinator has not read yet included."""
    await asyncio.wait([reader], timeout=FLUSH_SECONDS)


async def _wait_child(pid: int) -> None:
    """Waits for a child of the agent to exit, and reaps it."""
    pidfd = os.pidfd_open(pid)
    try:
        await wait_fd(pidfd)
    finally:
        os.close(pidfd)
    watch.reap(pid)
