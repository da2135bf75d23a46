"""Watching processes the agent may not be the parent of: pidfds on the event loop, and /proc.

A pidfd becomes readable when its process ends, whether or not it is the agent's child, so
a restarted agent watches the shims (or ranks) its predecessor started exactly like its own.
A pid is trusted only with its start time: the same pid with another start time is a later
process that reused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable


def process_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/<pid>/stat field 22), None if it is gone.

    A pid with the same start time is the same process, not a later one that reused the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ")".
    fields_after_name = text[text.rindex(b")") + 2 :].split()
    return int(fields_after_name[22 - 3])


def watch(loop: asyncio.AbstractEventLoop, pid: int, start_time: int | None, on_end: Callable[[], None]) -> int:
    """Calls `on_end` on `loop` once the process ends; returns its pidfd (for unwatch), or -1 if that
    process (same pid, same start time) is already gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    # Checked after opening the pidfd: from here on the pid cannot be handed to another process.
    if start_time is not None and process_start_time(pid) != start_time:
        os.close(pidfd)
        return -1
    loop.add_reader(pidfd, on_end)
    return pidfd


def unwatch(loop: asyncio.AbstractEventLoop | None, pidfd: int) -> None:
    if pidfd < 0:
        return
    if loop is not None and not loop.is_closed():
        loop.remove_reader(pidfd)
    os.close(pidfd)


def reap(pid: int) -> str:
    """Reaps `pid` if it is the agent's ended child (a shim it started itself; others are init's);
    returns how it ended ("exit status 1", "killed by signal 9"), or "" when it is not ours."""
    with contextlib.suppress(ChildProcessError):
        reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            code = os.waitstatus_to_exitcode(wait_status)
            return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return ""


def signal_group(pgid: int, signum: int) -> None:
    """Signals a rank's process group (the rank and whatever it started, not its shim)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)  # ended meanwhile: its shim reports how
