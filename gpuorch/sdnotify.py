"""A minimal sd_notify(3) client for the daemons' systemd units (Type=notify, WatchdogSec=).

systemd passes the address of its notification socket in $NOTIFY_SOCKET (a path,
or an abstract socket name starting with "@"); a service reports its state by
sending newline-separated KEY=VALUE datagrams to it:

    READY=1        start-up is over; `systemctl start` returns, dependents start
    STATUS=...     one line that `systemctl status` shows
    WATCHDOG=1     still alive; without one every $WATCHDOG_USEC, systemd restarts us
    STOPPING=1     shutting down

Everything here is a no-op without $NOTIFY_SOCKET (a terminal, a test, another
init), and never raises: a daemon must not fail because systemd did not listen.
"""

from __future__ import annotations

import asyncio
import os
import socket

from gpuorch.logs import get_logger

log = get_logger("sdnotify")


STATE_TIMEOUT_SECONDS = 1.0
"""How long a state change (READY, STOPPING, STATUS) may wait for room in systemd's socket queue."""


def notify(state: str, timeout: float = STATE_TIMEOUT_SECONDS) -> bool:
    """Sends `state`, one or more KEY=VALUE lines such as "READY=1", to $NOTIFY_SOCKET.

    Waits at most `timeout` seconds for room in the receiver's queue (0: not at all).
    Returns True when the datagram was sent; False without $NOTIFY_SOCKET or when
    the send failed (logged, never raised).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET: not a path or abstract socket", notify_socket=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Connected, so that a full receiver queue makes the send wait (up to the
            # timeout) instead of failing at once.
            sock.settimeout(timeout)
            sock.connect(address)
            sock.send(state.encode())
        return True
    except OSError as error:  # TimeoutError and BlockingIOError included
        log.warning("cannot notify systemd", state=state.split("\n", 1)[0], error=str(error) or type(error).__name__)
        return False


def ready(status: str = "") -> bool:
    """READY=1, with a STATUS= line if given."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """STATUS=<text>: the one line `systemctl status` shows."""
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    """WATCHDOG=1: keep-alive ping. Never waits: it runs on the event loop, and the next one comes soon."""
    return notify("WATCHDOG=1", timeout=0)


def stopping(status: str = "") -> bool:
    """STOPPING=1, with a STATUS= line if given."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off: no or a bad $WATCHDOG_USEC, or a $WATCHDOG_PID
    that is not this process (the variables were inherited from a parent).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        return None
    if microseconds <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return microseconds / 2 / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Sends WATCHDOG=1 every `interval` seconds until cancelled.

    It runs on the event loop on purpose: when the loop is stuck (a blocking call,
    a deadlock) the pings stop, and systemd kills and restarts the daemon.
    """
    while True:
        watchdog()
        await asyncio.sleep(interval)


_running: set[asyncio.Task] = set()
"""Strong references to the watchdog tasks (the event loop keeps only weak ones)."""


def start_watchdog() -> asyncio.Task | None:
    """Starts `watchdog_loop` on the running loop if systemd asked for a watchdog.

    It pings until the loop ends (asyncio.run cancels it), so through a graceful
    stop too; cancel the returned task to stop it earlier.
    """
    interval = watchdog_interval()
    if interval is None:
        return None
    log.debug("systemd watchdog on", interval=interval)
    task = asyncio.get_running_loop().create_task(watchdog_loop(interval), name="sd-watchdog")
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
