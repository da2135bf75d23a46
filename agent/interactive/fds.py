"""Non-blocking descriptors on the event loop: waiting until one is readable or writable, writing all of a
buffer, and the exit status a shim left in its exit file, as a SessionEnded."""

from __future__ import annotations

import asyncio
import os

from gpuorch.v1 import interactive_pb2

CHUNK_BYTES = 64 * 1024
"""Most bytes read at once from a terminal, a pipe or a socket: one SessionOutput message each."""


async def wait_fd(fd: int, *, writable: bool = False) -> None:
    """Returns once `fd` is readable (or writable), or has hung up."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def read_some(fd: int, size: int = CHUNK_BYTES) -> bytes:
    """Up to `size` bytes of a non-blocking descriptor; b"" at its end (EIO from a pty whose other side is all closed)."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await wait_fd(fd)
        except OSError:
            return b""


async def write_all(fd: int, data: bytes) -> None:
    """Writes all of `data` to a non-blocking descriptor, waiting while it is full (a reader that does not read
    holds the writer back: backpressure). Raises OSError when the other side is gone."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await wait_fd(fd, writable=True)
            continue
        view = view[written:]


def ended_from_exit_file(status: dict[str, str] | None, fallback: str) -> interactive_pb2.SessionEnded:
    """What a shim's exit file says (exit_code=N, signal=N or failed_to_start=why) as a SessionEnded."""
    if status is None:
        return interactive_pb2.SessionEnded(message=fallback)
    if "failed_to_start" in status:
        return interactive_pb2.SessionEnded(exit_code=127, message=status["failed_to_start"], process_exited=True)
    if "signal" in status:
        return interactive_pb2.SessionEnded(signal=int(status["signal"]), process_exited=True)
    return interactive_pb2.SessionEnded(exit_code=int(status.get("exit_code", "0")), process_exited=True)
