"""The terminals of interactive jobs: one pty per interactive rank 0, held by the agent.

The rank's side of the pty is its stdin, stdout and stderr (the shim's --tty); the agent keeps the
other side and reads it always: into the attached client's bounded queue when one is attached
(a client that does not read holds the reading back, the pty fills and the process waits on its
writes: backpressure, never unbounded memory), else into a replay buffer of the last
REPLAY_BYTES, sent first to the next client that attaches. Every byte also goes to the rank's
log, so `gpuctl logs` works for interactive jobs too. One client at a time: a new attach
detaches the one before (like `screen -d -r`).

The terminal ends when every holder of the rank's side has closed it, i.e. when the shim exits,
which it does after recording the rank's exit status; that status is what attached clients
get (and gpuctl's exit code). An interactive rank does not outlive the agent: its terminal is
the agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from pathlib import Path

from agent.interactive.fds import ended_from_exit_file, read_some
from agent.ranks.state_dir import read_exit_file
from gpuorch.logs import get_logger
from gpuorch.v1 import interactive_pb2

log = get_logger("agent.terminals")

REPLAY_BYTES = 64 * 1024
"""Output kept while nobody is attached, replayed to the next client."""
QUEUED_CHUNKS = 16
"""Chunks of output queued for a client that reads slowly before the terminal's reading waits for it."""
ENDED_KEPT_SECONDS = 300.0
"""How long an ended terminal still answers an attach with its exit status."""
EXIT_FILE_WAIT_SECONDS = 5.0
DEFAULT_SIZE = (24, 80)

TerminalKey = tuple[str, int, int]
"""(job id, attempt, rank)."""


def set_window_size(fd: int, rows: int, columns: int) -> None:
    """Sets a pty's window size; the kernel sends SIGWINCH to the terminal's foreground process group."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, columns


class Attachment:
    """One client's view of a terminal: a bounded queue of output; None in it means "look at the state"."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUED_CHUNKS)
        self.detached_because = ""

    def detach(self, reason: str) -> None:
        """Stops this client's view: its queued output is dropped, and its reader is woken to leave."""
        if self.detached_because:
            return
        self.detached_because = reason
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Terminal:
    """One pty: the agent's side, its replay buffer, the attached client, and how it ended."""

    def __init__(self, key: TerminalKey, master: int, log_path: str, exit_path: str) -> None:
        self.key = key
        self.master = master
        self.exit_path = exit_path
        self.replay = bytearray()
        self.attachment: Attachment | None = None
        self.ended: interactive_pb2.SessionEnded | None = None
        self.done = asyncio.Event()
        self._log_fd = -1
        with contextlib.suppress(OSError):
            self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def attach(self) -> tuple[Attachment, bytes]:
        """A new client's view, and the output it missed; the client before it is detached."""
        if self.attachment is not None:
            self.attachment.detach("another client attached to this terminal")
        self.attachment = Attachment()
        missed, self.replay = bytes(self.replay), bytearray()
        return self.attachment, missed

    def detach(self, attachment: Attachment, reason: str) -> None:
        attachment.detach(reason)
        if self.attachment is attachment:
            self.attachment = None

    async def pump(self) -> None:
        """Reads the terminal until it ends, then records how the rank ended."""
        cancelled = False
        try:
            while True:
                data = await read_some(self.master)
                if not data:
                    break
                if self._log_fd >= 0:
                    with contextlib.suppress(OSError):
                        os.write(self._log_fd, data)
                attachment = self.attachment
                if attachment is not None and not attachment.detached_because:
                    await attachment.queue.put(data)  # waits for a slow client: backpressure
                else:
                    self.replay += data
                    del self.replay[:-REPLAY_BYTES]
        except asyncio.CancelledError:  # the agent is stopping: nothing waits for the status
            cancelled = True
            raise
        finally:
            self.ended = interactive_pb2.SessionEnded(message="the agent stopped") if cancelled else await self._exit_status()
            for fd in (self.master, self._log_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.master = self._log_fd = -1
            self.done.set()
            if self.attachment is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    self.attachment.queue.put_nowait(None)
            log.info("terminal ended", job=self.key[0], attempt=self.key[1], rank=self.key[2])

    async def _exit_status(self) -> interactive_pb2.SessionEnded:
        """The shim writes the exit file before it exits (and so before the terminal ends): wait a little for it."""
        waited = 0.0
        status = read_exit_file(Path(self.exit_path))
        while status is None and waited < EXIT_FILE_WAIT_SECONDS:
            await asyncio.sleep(0.05)
            waited += 0.05
            status = read_exit_file(Path(self.exit_path))
        return ended_from_exit_file(status, "the terminal closed but the rank's exit status is unknown")


class Terminals:
    """Every terminal this agent holds, by (job, attempt, rank); spawn.StartSettings.terminals opens them."""

    def __init__(self) -> None:
        self.terminals: dict[TerminalKey, Terminal] = {}
        self._tasks: set[asyncio.Task] = set()

    def open(self, job_id: str, attempt: int, rank: int, log_path: str, exit_path: str) -> int:
        """A new pty for the rank, read from now on; returns its terminal side for the shim (the caller closes it)."""
        master, terminal_side = os.openpty()
        os.set_blocking(master, False)
        set_window_size(terminal_side, *DEFAULT_SIZE)
        key = (job_id, attempt, rank)
        terminal = Terminal(key, master, log_path, exit_path)
        self.terminals[key] = terminal
        loop = asyncio.get_running_loop()
        task = loop.create_task(terminal.pump())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: loop.call_later(ENDED_KEPT_SECONDS, self._drop, terminal))
        log.info("terminal opened", job=job_id, attempt=attempt, rank=rank)
        return terminal_side

    def get(self, job_id: str, attempt: int, rank: int) -> Terminal | None:
        return self.terminals.get((job_id, attempt, rank))

    def _drop(self, terminal: Terminal) -> None:
        if self.terminals.get(terminal.key) is terminal:
            del self.terminals[terminal.key]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
