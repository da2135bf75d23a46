"""What a rank writes and the agent reads back: its log (opened for the shim, read in chunks for
`gpuctl logs`) and its progress stamp (reported in heartbeats, for hang detection)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.identity import RankIdentity
from gpuorch.v1 import agent_pb2

DEFAULT_LOG_CHUNK = 64 * 1024
MAX_LOG_CHUNK = 1024 * 1024
"""Largest chunk read_log_chunk returns, whatever is asked: it must fit in one gRPC message."""


def open_rank_log(path: str, identity: RankIdentity) -> int:
    """The rank's log, for the shim to inherit as its stdout and stderr.

    The owner's alone to read (a job's output may hold its secrets), and made so before anything
    runs, a re-run's existing log included; in the agent's directory, so not the owner's to replace.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if identity.switch:
            os.fchown(fd, identity.uid, identity.gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_log_chunk(request: agent_pb2.ReadLogs, log_path: Path, *, running: bool) -> agent_pb2.LogChunk:
    """Reads part of a rank's log: from `offset`, or `-offset` bytes before the end when negative,
    at most `max_bytes` (64 KiB when 0). A missing or unreadable log sets `error`, never raises."""
    chunk = agent_pb2.LogChunk(request_id=request.request_id)
    what = f"{request.job_id} attempt {request.attempt} rank {request.rank}"
    limit = min(request.max_bytes or DEFAULT_LOG_CHUNK, MAX_LOG_CHUNK)
    try:
        with open(log_path, "rb") as log_file:
            size = os.fstat(log_file.fileno()).st_size
            start = max(0, size + request.offset) if request.offset < 0 else min(request.offset, size)
            log_file.seek(start)
            chunk.data = log_file.read(limit)
    except FileNotFoundError:
        chunk.error = f"no log for {what}"
        return chunk
    except OSError as error:
        chunk.error = f"cannot read the log of {what}: {error.strerror}"
        return chunk
    chunk.offset = start
    chunk.file_size = size
    chunk.running = running
    return chunk


def progress_path(rank_base: Path) -> Path:
    """The file gpuorch.worker.report_progress() rewrites (GPUORCH_PROGRESS_FILE; agent/ranks/progress.py reads it)."""
    return rank_base.with_suffix(".progress")
