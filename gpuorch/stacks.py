"""SIGUSR1 makes a daemon write what it is doing now to its log: every thread's stack, then every asyncio task's.

For a daemon that seems stuck (it logged that it leads but never that it serves, say): `kill -USR1 PID`,
then read the log (the journal, under systemd). Nothing stops; a task's stack shows where it awaits.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from typing import Any


def log_stacks(log: Any) -> None:
    """Every thread's Python stack to stderr (faulthandler), then one log line per asyncio task with its stack."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for task in asyncio.all_tasks():
        log.warning("task stack (SIGUSR1)", task=task.get_name(), stack=_stack_of(task))


def _stack_of(task: asyncio.Task) -> str:
    """The task's await chain, outermost first (Task.get_stack gives only the outermost frame, and Task.print_stack
    raises on a coroutine whose line number is None)."""
    lines = [repr(task)]
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "\n".join(lines)


def log_stacks_on_sigusr1(loop: asyncio.AbstractEventLoop, log: Any) -> None:
    loop.add_signal_handler(signal.SIGUSR1, log_stacks, log)
