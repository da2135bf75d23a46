"""The worker supervisor: starts a job's rank processes on this node, watches them, stops them.

Each rank runs in a cgroup of its own when the node has a cgroup v2 subtree for the agent
(agent/cgroups.py): stopping it kills everything it started, and its end is reported only
once its cgroup is empty.

Ranks outlive the agent. Each rank is started through `agent/shim.py`, which stays
the rank's parent, waits for it and writes its exit status to a file; the agent
watches the shim with a pidfd, which works whether or not the shim is its child.
A restarted agent reloads the per-rank records from the state dir (`recover()`),
re-attaches to shims still alive and reads the exit files of ranks that ended
while no agent ran.

Rank lifecycle (what `report()` receives):

    launch() --> RUNNING (pid) --> EXITED (exit_code, or signal when killed)
            \\-> FAILED_TO_START (message: why)      [argv[0] not found, bad working_dir]
            \\-> REJECTED (message: why)             [attempt older than one already seen]

An EXITED or FAILED_TO_START status stays in `snapshot()` (so a re-registration
re-delivers it) until the coordinator acknowledges the attempt, or for at most
`UNACKNOWLEDGED_EXIT_TTL` seconds.

State dir layout:

    jobs/<job_id>/job.json                 highest attempt seen, and the ranks launched for it
    jobs/<job_id>/work/                    default working directory
    jobs/<job_id>/attempt-<n>/rank-<r>.log stdout + stderr of the rank (rotated to rank-<r>.log.1 past max_log_bytes)
    jobs/<job_id>/attempt-<n>/rank-<r>.pid rank pid, written by the shim
    jobs/<job_id>/attempt-<n>/rank-<r>.exit exit status, written by the shim
    ranks/<job_id>@<n>@<r>.json            record of a rank not yet acknowledged (what recover() reads)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from agent import cgroups
from agent.cgroups import NO_LIMITS, RankCgroups, RankLimits, effective_limits
from agent.identity import IdentityPolicy, RankIdentity, decide_rank_identity, lookup_account
from agent.owned_dirs import UnsafeDirectory, ensure_owned_directory
from gpuorch.v1 import agent_pb2

log = structlog.get_logger("agent.supervisor")

SHIM = str(Path(__file__).with_name("shim.py"))
NOTIFY_FD = 3
"""Descriptor number on which the shim tells the agent that the rank started (or why not)."""
ENV_FD = 4
"""Descriptor number from which the shim reads the rank's environment (see environment_file)."""

DEFAULT_LOG_CHUNK = 64 * 1024
MAX_LOG_CHUNK = 1024 * 1024
"""Largest chunk read_log returns, whatever is asked: it must fit in one gRPC message."""

UNACKNOWLEDGED_EXIT_TTL = 3600.0
"""Seconds an exit stays in snapshot() without being acknowledged."""

KILL_WAIT = 10.0
"""Seconds stop() waits for a rank to die after SIGKILL before giving up on it (a process in D state)."""

ReportFn = Callable[[agent_pb2.TaskStatus], None]
RankKey = tuple[str, int, int]


AGENT_ONLY_ENV = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "INVOCATION_ID", "CREDENTIALS_DIRECTORY",
)  # fmt: skip
"""systemd's variables for the agent itself: a rank must not talk to systemd as if it were the agent,
nor look for the agent's credentials."""


SHIM_ENV = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL")
"""What the shim keeps of the agent's own environment, never of the job's: an interpreter that finds
libpython through LD_LIBRARY_PATH (a module-loaded or Software Collections Python) must still start."""


def above_standard_descriptors(fd: int) -> int:
    """`fd` moved to a number of 10 or more (the original closed), so that handing descriptors to the
    shim with DUP2 onto 1 to 4 can never overwrite one that is still to be handed over."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    finally:
        os.close(fd)


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


def environment_file(env: dict[str, str]) -> int:
    """A memory-backed file holding `env` as NUL-separated NAME=VALUE entries, read from its start.

    The rank's environment reaches the shim this way, never as the shim's own: the shim
    runs as the agent (root), and a job's LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT or
    GCONV_PATH in the environment of a root process would run the owner's code as root.
    A file rather than a pipe, because 128 KiB of environment would fill a pipe before
    the shim reads it; in memory, because it may hold the job's secrets.
    """
    fd = os.memfd_create("gpuorch-rank-env", os.MFD_CLOEXEC)
    try:
        os.write(fd, b"".join(f"{name}={value}".encode("utf-8", "surrogateescape") + b"\0" for name, value in env.items()))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def invalid_job_id(job_id: str) -> str:
    """Why a job id cannot name a directory under the state dir; empty if it can."""
    if not job_id:
        return "empty job id"
    if job_id in (".", "..") or "/" in job_id or "\0" in job_id or len(job_id) > 200:
        return f"job id {job_id!r} cannot be used as a directory name"
    return ""


def give_to_owner(path: str, identity: RankIdentity) -> None:
    """Makes a file or directory the agent created for a rank belong to the rank's user."""
    if identity.switch:
        os.chown(path, identity.uid, identity.gid, follow_symlinks=False)


def read_exit_file(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@dataclass
class RankRecord:
    """What the state dir keeps about one rank, enough for a later agent to find it again."""

    job_id: str
    attempt: int
    rank: int
    local_rank: int
    shim_pid: int
    shim_start_time: int | None
    rank_pid: int
    rank_start_time: int | None
    log_path: str
    pid_path: str
    exit_path: str
    cgroup: str = ""
    """The rank's cgroup directory; empty = none (no cgroups on this node, or a record of an older agent)."""
    pids_max: int = 0
    memory_max_bytes: int = 0
    """The limits of its cgroup, re-applied by a restarted agent (see cgroups.RankCgroups.release_controllers)."""
    working_dir: str = ""
    """The directory the rank runs in, as the shim reported it."""


@dataclass
class Rank:
    """A rank this supervisor knows of: starting, running, or ended and not yet acknowledged."""

    record: RankRecord
    record_path: Path
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the start was reported (RUNNING or FAILED_TO_START): exits are reported after it."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    final_status: agent_pb2.TaskStatus | None = None
    ended_at: float = 0.0
    """Wall-clock time the rank ended, for the unacknowledged-exit expiry."""
    pidfd: int = -1
    shim_end: str = ""
    """How the shim itself ended, when it was our child, e.g. "exit status 1"."""
    watching_rank_only: bool = False
    """The shim is gone but the rank lives on: watch the rank itself; its exit status is lost."""
    kill_reason: str = ""

    @property
    def key(self) -> RankKey:
        return (self.record.job_id, self.record.attempt, self.record.rank)

    def status(self, state: int, **fields) -> agent_pb2.TaskStatus:
        return agent_pb2.TaskStatus(
            job_id=self.record.job_id, attempt=self.record.attempt, rank=self.record.rank, state=state, **fields
        )


class Supervisor:
    """Starts, watches and stops this node's rank processes; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        report: ReportFn,
        *,
        identity_policy: IdentityPolicy = IdentityPolicy(),
        owners_authenticated: Callable[[], bool] = lambda: False,
        cgroups: RankCgroups | None = None,
        default_limits: RankLimits = NO_LIMITS,
        max_log_bytes: int = 0,
        python: str = sys.executable,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.report_fn = report
        self.identity_policy = identity_policy
        self.owners_authenticated = owners_authenticated
        """Whether the coordinator vouches for LaunchTask.owner now (its last RegisterAck)."""
        self.cgroups = cgroups
        self.default_limits = default_limits
        self.max_log_bytes = max_log_bytes
        self.python = python
        self.ranks: dict[RankKey, Rank] = {}
        self.jobs: dict[str, dict] = {}
        """job id -> {"highest_attempt": n, "launched_ranks": [...]}, cached from jobs/<id>/job.json."""
        self.records_dir = self.state_dir / "ranks"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future] = set()
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Reloads rank records left by a previous agent: re-attaches to ranks still running and
        reports those that ended meanwhile. Call once, before the first launch."""
        self._loop = asyncio.get_running_loop()
        for record_path in sorted(self.records_dir.glob("*.json")):
            try:
                record = RankRecord(**json.loads(record_path.read_text()))
            except (OSError, ValueError, TypeError) as error:
                log.warning("ignoring unreadable rank record", path=str(record_path), error=str(error))
                continue
            rank = Rank(record=record, record_path=record_path)
            rank.started.set()
            self.ranks[rank.key] = rank
            if not record.rank_pid:
                record.rank_pid = self._read_pid_file(record)
            if record.cgroup and self.cgroups is not None and os.path.isdir(record.cgroup):
                with contextlib.suppress(OSError):
                    self.cgroups.apply_limits(Path(record.cgroup), RankLimits(record.pids_max, record.memory_max_bytes))
            exit_status = read_exit_file(Path(record.exit_path))
            if exit_status is not None:
                self._finish_once_empty(rank, exit_status, ended_at=os.stat(record.exit_path).st_mtime)
            elif self._watch(rank, record.shim_pid, record.shim_start_time):
                log.info("rank re-attached", job=record.job_id, attempt=record.attempt, rank=record.rank, pid=record.rank_pid)
            elif record.rank_pid and self._watch(rank, record.rank_pid, record.rank_start_time):
                rank.watching_rank_only = True
                log.warning(
                    "rank re-attached without its shim; its exit status will be lost",
                    job=record.job_id,
                    attempt=record.attempt,
                    rank=record.rank,
                    pid=record.rank_pid,
                )
            else:
                self._finish_once_empty(rank, None)
        self._expire_old_exits()

    async def launch(self, launch: agent_pb2.LaunchTask) -> None:
        """Starts one process per RankLaunch and returns once each is running (or failed to start);
        reports RUNNING / FAILED_TO_START / REJECTED per rank."""
        self._loop = asyncio.get_running_loop()
        job_id, attempt = launch.job_id, launch.attempt
        refusal = invalid_job_id(job_id) or self._stale_attempt(job_id, attempt)
        if refusal:
            log.warning("launch rejected", job=job_id, attempt=attempt, reason=refusal)
            for rank_launch in launch.ranks:
                self._report(
                    agent_pb2.TaskStatus(
                        job_id=job_id,
                        attempt=attempt,
                        rank=rank_launch.rank,
                        state=agent_pb2.TASK_STATE_REJECTED,
                        message=refusal,
                    )
                )
            return

        job = self._job(job_id)
        if attempt > job["highest_attempt"]:
            job.update(highest_attempt=attempt, launched_ranks=[])
        new_ranks = []
        for rank_launch in launch.ranks:
            known = self.ranks.get((job_id, attempt, rank_launch.rank))
            if known is not None:
                # The coordinator resent the launch (it may have missed our report): say again where it stands.
                log.info("launch already handled", job=job_id, attempt=attempt, rank=rank_launch.rank)
                if known.started.is_set():
                    self._report(known.final_status or self._running_status(known))
            elif rank_launch.rank in job["launched_ranks"]:
                log.info("launch of an acknowledged rank ignored", job=job_id, attempt=attempt, rank=rank_launch.rank)
            else:
                new_ranks.append(rank_launch)
        if not new_ranks:
            return
        # Recorded before anything starts: a rank is started at most once, even across an agent crash.
        job["launched_ranks"].extend(rank_launch.rank for rank_launch in new_ranks)
        default_dir = str(self.state_dir / "jobs" / job_id / "work")
        # Where the ranks run: the job's working_dir; else the directory it was submitted from, if the
        # owner can enter it on this node; else the job's own directory here. Whether a directory
        # exists is learnt only by the shim, after it became the owner (never with root's eyes).
        if launch.working_dir:
            working_dir, fallback_dir = launch.working_dir, ""
        elif launch.submit_dir:
            working_dir, fallback_dir = launch.submit_dir, default_dir
        else:
            working_dir, fallback_dir = default_dir, ""
        identity = decide_rank_identity(
            launch.owner,
            self.identity_policy,
            agent_uid=os.geteuid(),
            lookup=lookup_account,
            owners_authenticated=self.owners_authenticated(),
        )
        try:
            self._save_job(job_id)
        except OSError as error:
            problem = f"cannot record the launch in the agent's state dir: {error}"
        else:
            problem = identity if isinstance(identity, str) else self._launch_problem(launch, default_dir, identity)
        started = []
        for rank_launch in new_ranks:
            if problem:
                self._fail_before_start(launch, rank_launch, problem)
                continue
            try:
                started.append(self._spawn(launch, rank_launch, working_dir, fallback_dir, identity))
            except OSError as error:
                self._fail_before_start(launch, rank_launch, f"cannot start the rank's shim: {error}")
        await asyncio.gather(*(self._await_start(rank, notify_fd) for rank, notify_fd in started))

    async def stop(self, stop: agent_pb2.StopTask) -> None:
        """Sends SIGTERM to every matching rank's process group, SIGKILL to those still alive after
        `stop.grace_seconds`; returns when all of them ended (their exits are reported as usual).

        Matches ranks of `stop.attempt` and older of the job; attempt 0 matches every attempt."""
        targets = [
            rank
            for rank in self.ranks.values()
            if rank.record.job_id == stop.job_id and (stop.attempt == 0 or rank.record.attempt <= stop.attempt)
        ]
        if targets:
            log.info("stopping ranks", job=stop.job_id, attempt=stop.attempt, ranks=len(targets), reason=stop.reason)
        await asyncio.gather(*(self._stop_rank(rank, max(0.0, stop.grace_seconds)) for rank in targets))

    def acknowledge(self, job_id: str, attempt: int) -> None:
        """Forgets the ended ranks of an attempt (0 = every attempt of the job): the coordinator has
        their final status, so they leave snapshot() and their records leave the state dir."""
        for rank in list(self.ranks.values()):
            if rank.record.job_id == job_id and (attempt == 0 or rank.record.attempt == attempt) and rank.ended.is_set():
                self._forget(rank)

    def snapshot(self) -> list[agent_pb2.TaskStatus]:
        """Every rank still running, and every end not yet acknowledged, for the agent's Register."""
        self._expire_old_exits()
        return [rank.final_status or self._running_status(rank) for rank in self.ranks.values()]

    def read_log(self, request: agent_pb2.ReadLogs) -> agent_pb2.LogChunk:
        """Reads part of a rank's log: from `offset`, or `-offset` bytes before the end when negative,
        at most `max_bytes` (64 KiB when 0). Unknown ranks get `error` set, not an exception."""
        chunk = agent_pb2.LogChunk(request_id=request.request_id)
        what = f"{request.job_id} attempt {request.attempt} rank {request.rank}"
        if invalid_job_id(request.job_id):
            chunk.error = f"no log for {what}: {invalid_job_id(request.job_id)}"
            return chunk
        rank = self.ranks.get((request.job_id, request.attempt, request.rank))
        log_path = self._attempt_dir(request.job_id, request.attempt) / f"rank-{request.rank}.log"
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
        chunk.running = rank is not None and not rank.ended.is_set()
        return chunk

    def progress(self) -> list[agent_pb2.RankProgress]:
        """When each running rank last reported progress (ranks that never did are left out)."""
        reports = []
        for rank in self.ranks.values():
            if rank.ended.is_set():
                continue
            try:
                mtime_ns = os.stat(Path(rank.record.pid_path).with_suffix(".progress")).st_mtime_ns
            except OSError:
                continue
            if mtime_ns == 0:
                continue  # created at launch, not touched by the rank yet
            report = agent_pb2.RankProgress(job_id=rank.record.job_id, attempt=rank.record.attempt, rank=rank.record.rank)
            report.last_progress_time.FromNanoseconds(mtime_ns)
            reports.append(report)
        return reports

    def running_count(self) -> int:
        return sum(1 for rank in self.ranks.values() if not rank.ended.is_set())

    async def close(self) -> None:
        """Stops watching; the ranks keep running (a restarted agent recovers them)."""
        self._closed = True
        for rank in self.ranks.values():
            self._unwatch(rank)
        if self.cgroups is not None:
            self.cgroups.release_controllers()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- launching --------------------------------------------------------------------------

    def _stale_attempt(self, job_id: str, attempt: int) -> str:
        highest = self._job(job_id)["highest_attempt"]
        if attempt < highest:
            return f"attempt {attempt} of {job_id} is older than attempt {highest} already seen"
        return ""

    def _launch_problem(self, launch: agent_pb2.LaunchTask, default_dir: str, identity: RankIdentity) -> str:
        """Why the ranks cannot be started at all, found before spawning anything; empty if none.

        The job's own directories are made here, as the owner's alone: the default working dir
        (like a home: other users of the node must not read what the job writes there), needed
        whenever the job names no working_dir, and the checkpoint dir. An existing one must be a
        real directory of the owner's that no one else may write (see owned_dirs)."""
        if not launch.argv:
            return "empty argv: nothing to execute"
        uid, gid = (identity.uid, identity.gid) if identity.switch else (os.geteuid(), os.getegid())
        if not launch.working_dir:
            try:
                ensure_owned_directory(default_dir, uid, gid)
            except UnsafeDirectory as error:
                return f"unsafe working directory: {error}"
            except OSError as error:
                return f"cannot create working directory {default_dir!r}: {error.strerror}"
        checkpoint_dir = launch.env.get("GPUORCH_CHECKPOINT_DIR", "")
        if checkpoint_dir:
            try:
                ensure_owned_directory(checkpoint_dir, uid, gid)
            except UnsafeDirectory as error:
                return f"unsafe checkpoint directory: {error}"
            except OSError as error:
                # On shared storage it may be read-only here, or its root missing on this node: the rank
                # runs, and learns it when it saves.
                log.warning(
                    "cannot create the checkpoint directory", job=launch.job_id, path=checkpoint_dir, error=error.strerror
                )
        return ""

    def _fail_before_start(self, launch: agent_pb2.LaunchTask, rank_launch: agent_pb2.RankLaunch, why: str) -> None:
        log.warning("rank failed to start", job=launch.job_id, attempt=launch.attempt, rank=rank_launch.rank, error=why)
        status = agent_pb2.TaskStatus(
            job_id=launch.job_id,
            attempt=launch.attempt,
            rank=rank_launch.rank,
            state=agent_pb2.TASK_STATE_FAILED_TO_START,
            message=why,
        )
        # Kept like an exit (in memory only: nothing was started) until acknowledged.
        never_started = RankRecord(
            job_id=launch.job_id,
            attempt=launch.attempt,
            rank=rank_launch.rank,
            local_rank=rank_launch.local_rank,
            shim_pid=0,
            shim_start_time=None,
            rank_pid=0,
            rank_start_time=None,
            log_path="",
            pid_path="",
            exit_path="",
        )
        rank = Rank(record=never_started, record_path=Path())
        rank.started.set()
        rank.ended.set()
        rank.final_status = status
        rank.ended_at = time.time()
        self.ranks[rank.key] = rank
        self._report(status)

    def _spawn(
        self,
        launch: agent_pb2.LaunchTask,
        rank_launch: agent_pb2.RankLaunch,
        working_dir: str,
        fallback_dir: str,
        identity: RankIdentity,
    ) -> tuple[Rank, int]:
        """Starts the shim of one rank; returns the rank and the read end of its start notification."""
        attempt_dir = self._attempt_dir(launch.job_id, launch.attempt)
        attempt_dir.mkdir(parents=True, exist_ok=True)
        base = attempt_dir / f"rank-{rank_launch.rank}"
        log_path, pid_path, exit_path = (str(base.with_suffix(suffix)) for suffix in (".log", ".pid", ".exit"))
        for leftover in (pid_path, exit_path):  # from an earlier run of the same attempt and rank
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        env = os.environ.copy()
        for name in AGENT_ONLY_ENV:
            env.pop(name, None)
        env.update(identity.env)
        env.update(launch.env)
        env.update(rank_launch.env)
        # gpuorch.worker.report_progress() touches this file; the agent reports its mtime in heartbeats.
        # It starts out dated 0 (= no progress yet) and belongs to the rank's user, who may touch
        # it but, the directory being the agent's, neither replace nor remove it.
        env["GPUORCH_PROGRESS_FILE"] = str(base.with_suffix(".progress"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(env["GPUORCH_PROGRESS_FILE"])
        os.close(os.open(env["GPUORCH_PROGRESS_FILE"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        os.utime(env["GPUORCH_PROGRESS_FILE"], ns=(0, 0))
        give_to_owner(env["GPUORCH_PROGRESS_FILE"], identity)
        limits = effective_limits(RankLimits(launch.pids_max, launch.memory_max_bytes), self.default_limits)
        cgroup = ""
        if self.cgroups is not None:
            cgroup = str(self.cgroups.create(launch.job_id, launch.attempt, rank_launch.rank, limits))
        switch_user = (
            ["--uid", str(identity.uid), "--gid", str(identity.gid), "--groups", ",".join(map(str, identity.groups))]
            if identity.switch
            else []
        )
        argv = [
            self.python, "-I", "-S", SHIM,
            "--notify-fd", str(NOTIFY_FD),
            "--env-fd", str(ENV_FD),
            "--pid-file", pid_path,
            "--exit-file", exit_path,
            "--cwd", working_dir,
            *(["--cwd-fallback", fallback_dir] if fallback_dir else []),
            *switch_user,
            *(["--cgroup", cgroup] if cgroup else []),
            *(["--log-file", log_path, "--max-log-bytes", str(self.max_log_bytes)] if self.max_log_bytes else []),
            "--", *launch.argv,
        ]  # fmt: skip
        handed_over: list[int] = []  # the agent's copies of the shim's descriptors, closed once it has them
        notify_read = -1
        try:
            log_fd = above_standard_descriptors(open_rank_log(log_path, identity))
            handed_over.append(log_fd)
            env_fd = above_standard_descriptors(environment_file(env))
            handed_over.append(env_fd)
            notify_read, notify_write = os.pipe()
            notify_write = above_standard_descriptors(notify_write)
            handed_over.append(notify_write)
            shim_pid = os.posix_spawn(
                self.python,
                argv,
                {
                    name: os.environ[name] for name in SHIM_ENV if name in os.environ
                },  # nothing of the job's (see environment_file)
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    (os.POSIX_SPAWN_DUP2, notify_write, NOTIFY_FD),
                    (os.POSIX_SPAWN_DUP2, env_fd, ENV_FD),
                ],
                setsid=True,  # the shim leads a session of its own, away from the agent's signals and terminal
                setsigmask=(),
            )
        except BaseException:
            if notify_read >= 0:
                os.close(notify_read)
            if cgroup:
                cgroups.remove(Path(cgroup))  # nothing joined it
            raise
        finally:
            for fd in handed_over:
                os.close(fd)
        record = RankRecord(
            job_id=launch.job_id,
            attempt=launch.attempt,
            rank=rank_launch.rank,
            local_rank=rank_launch.local_rank,
            shim_pid=shim_pid,
            shim_start_time=process_start_time(shim_pid),
            rank_pid=0,
            rank_start_time=None,
            log_path=log_path,
            pid_path=pid_path,
            exit_path=exit_path,
            cgroup=cgroup,
            pids_max=limits.pids_max,
            memory_max_bytes=limits.memory_max_bytes,
        )
        rank = Rank(record=record, record_path=self.records_dir / f"{launch.job_id}@{launch.attempt}@{rank_launch.rank}.json")
        self.ranks[rank.key] = rank
        self._save_record(rank)
        self._watch(rank, shim_pid, record.shim_start_time)
        return rank, notify_read

    async def _await_start(self, rank: Rank, notify_fd: int) -> None:
        """Waits for the shim's word that the rank runs (or why it could not start) and reports it."""
        record = rank.record
        try:
            notice = await self._read_notice(notify_fd)
            if notice.startswith("started "):
                words = notice.split()
                record.rank_pid = int(words[1])
                if len(words) > 2:
                    record.working_dir = bytes.fromhex(words[2]).decode("utf-8", "surrogateescape")
                record.rank_start_time = process_start_time(record.rank_pid)
                self._save_record(rank)
                log.info("rank started", job=record.job_id, attempt=record.attempt, rank=record.rank, pid=record.rank_pid)
                self._report(self._running_status(rank))
            elif notice.startswith("failed "):
                why = notice.removeprefix("failed ")
                log.warning("rank failed to start", job=record.job_id, attempt=record.attempt, rank=record.rank, error=why)
                rank.final_status = rank.status(agent_pb2.TASK_STATE_FAILED_TO_START, message=why)
                self._report(rank.final_status)
            else:
                # The shim died before saying anything; the end of the shim reports what happened.
                record.rank_pid = self._read_pid_file(record)
        finally:
            os.close(notify_fd)
            rank.started.set()

    async def _read_notice(self, fd: int) -> str:
        """Everything the shim writes on the notification pipe, up to its newline or EOF."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        received = bytearray()

        def on_readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            received.extend(data)
            if (not data or b"\n" in received) and not done.done():
                done.set_result(received.decode(errors="replace").strip())

        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable)
        try:
            return await done
        finally:
            loop.remove_reader(fd)

    # ---- watching ---------------------------------------------------------------------------

    def _watch(self, rank: Rank, pid: int, start_time: int | None) -> bool:
        """Watches `pid` with a pidfd; False if that process (same pid, same start time) is gone."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        # Checked after opening the pidfd: from here on the pid cannot be handed to another process.
        if start_time is not None and process_start_time(pid) != start_time:
            os.close(pidfd)
            return False
        rank.pidfd = pidfd
        assert self._loop is not None
        self._loop.add_reader(pidfd, self._on_process_end, rank, pid)
        return True

    def _unwatch(self, rank: Rank) -> None:
        if rank.pidfd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(rank.pidfd)
            os.close(rank.pidfd)
            rank.pidfd = -1

    def _on_process_end(self, rank: Rank, pid: int) -> None:
        self._unwatch(rank)
        with contextlib.suppress(ChildProcessError):
            reaped, wait_status = os.waitpid(pid, os.WNOHANG)  # reap the shims we started ourselves; others are init's
            if reaped:
                code = os.waitstatus_to_exitcode(wait_status)
                rank.shim_end = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        # The start is reported before the end, even when both happen in one loop iteration.
        task = asyncio.ensure_future(self._finish_after_start(rank))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_after_start(self, rank: Rank) -> None:
        await rank.started.wait()
        if self._closed:
            return
        record = rank.record
        exit_status = None if rank.watching_rank_only else read_exit_file(Path(record.exit_path))
        lost_shim = exit_status is None and not rank.watching_rank_only and record.rank_pid
        # The shim was killed on its own; the rank may well live on. Keep watching it until it ends.
        if lost_shim and self._watch(rank, record.rank_pid, record.rank_start_time):
            rank.watching_rank_only = True
            log.warning(
                "rank lost its shim; its exit status will be lost", job=record.job_id, rank=record.rank, pid=record.rank_pid
            )
            return
        await self._empty_cgroup(rank)
        if self._closed:
            return
        self._finish(rank, exit_status)

    def _finish_once_empty(self, rank: Rank, exit_status: dict[str, str] | None, *, ended_at: float | None = None) -> None:
        """_finish() for a rank that ended while no agent ran: at once if its cgroup is empty, else once it
        is (until then the rank counts as running: what it started still holds its GPUs)."""
        if not rank.record.cgroup or cgroups.is_empty(Path(rank.record.cgroup)):
            if rank.record.cgroup:
                cgroups.remove(Path(rank.record.cgroup))
            self._finish(rank, exit_status, ended_at=ended_at)
            return

        async def finish() -> None:
            await self._empty_cgroup(rank)
            if not self._closed:
                self._finish(rank, exit_status, ended_at=ended_at)

        task = asyncio.ensure_future(finish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _empty_cgroup(self, rank: Rank) -> None:
        """Kills what is left in the rank's cgroup and waits until none of it lives, then removes the
        cgroup: the rank's end, which frees its GPUs, is reported only after this."""
        if not rank.record.cgroup:
            return
        cgroup = Path(rank.record.cgroup)
        waited = 0.0
        while not cgroups.is_empty(cgroup):
            cgroups.kill(cgroup)
            await asyncio.sleep(0.02)
            waited += 0.02
            if waited >= KILL_WAIT:
                record = rank.record
                log.error("rank's cgroup still not empty after SIGKILL", job=record.job_id, rank=record.rank, cgroup=str(cgroup))
                waited = 0.0
        cgroups.remove(cgroup)

    def _finish(self, rank: Rank, exit_status: dict[str, str] | None, *, ended_at: float | None = None) -> None:
        """Records how the rank ended and reports it (unless its failed start was already reported)."""
        record = rank.record
        already_reported = rank.final_status is not None
        if exit_status is None and not record.rank_pid:
            rank.final_status = rank.status(
                agent_pb2.TASK_STATE_FAILED_TO_START,
                message=f"the rank's shim ended ({rank.shim_end or 'status unknown'}) before starting it; see {record.log_path}",
            )
        elif exit_status is None:
            who = "the rank" if rank.watching_rank_only else f"the shim (pid {record.shim_pid})"
            message = f"exit status lost: {who} ended without recording it"
            if rank.kill_reason:
                message += f"; {rank.kill_reason}"
            rank.final_status = rank.status(
                agent_pb2.TASK_STATE_EXITED, signal=signal.SIGKILL, message=message, pid=record.rank_pid
            )
        elif "failed_to_start" in exit_status:
            rank.final_status = rank.status(agent_pb2.TASK_STATE_FAILED_TO_START, message=exit_status["failed_to_start"])
        elif "signal" in exit_status:
            signum = int(exit_status["signal"])
            message = rank.kill_reason or (f"killed by {signal.Signals(signum).name}" if signum in signal.valid_signals() else "")
            rank.final_status = rank.status(agent_pb2.TASK_STATE_EXITED, signal=signum, message=message, pid=record.rank_pid)
        else:
            rank.final_status = rank.status(
                agent_pb2.TASK_STATE_EXITED, exit_code=int(exit_status.get("exit_code", "0")), pid=record.rank_pid
            )
        rank.ended_at = ended_at or time.time()
        rank.started.set()
        rank.ended.set()
        if already_reported and rank.final_status.state == agent_pb2.TASK_STATE_FAILED_TO_START:
            return
        status = rank.final_status
        log.info(
            "rank ended",
            job=record.job_id,
            attempt=record.attempt,
            rank=record.rank,
            pid=record.rank_pid,
            state=agent_pb2.TaskState.Name(status.state),
            exit_code=status.exit_code,
            signal=status.signal,
        )
        self._report(status)

    # ---- stopping ---------------------------------------------------------------------------

    async def _stop_rank(self, rank: Rank, grace: float) -> None:
        await rank.started.wait()  # a launch still in progress: its pid is known once it started
        if rank.ended.is_set():
            return
        record = rank.record
        if not record.rank_pid:
            record.rank_pid = self._read_pid_file(record)
        if not record.rank_pid:
            log.warning("cannot stop a rank whose pid is unknown", job=record.job_id, attempt=record.attempt, rank=record.rank)
            return
        rank.kill_reason = "stopped with SIGTERM"
        self._signal_group(rank, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rank.ended.wait(), grace)
            return
        rank.kill_reason = f"killed with SIGKILL after a {grace:g}s grace period"
        log.warning(
            "rank outlived its grace period; killing it", job=record.job_id, attempt=record.attempt, rank=record.rank, grace=grace
        )
        self._signal_group(rank, signal.SIGKILL)
        if record.cgroup:
            cgroups.kill(Path(record.cgroup))  # and whatever left the process group
        try:
            await asyncio.wait_for(rank.ended.wait(), KILL_WAIT)
        except TimeoutError:
            log.error(
                "rank still alive after SIGKILL", job=record.job_id, attempt=record.attempt, rank=record.rank, pid=record.rank_pid
            )

    def _signal_group(self, rank: Rank, signum: int) -> None:
        """Signals the rank's process group (the rank and whatever it started), not the shim."""
        try:
            os.killpg(rank.record.rank_pid, signum)
        except ProcessLookupError:
            pass  # ended meanwhile; its shim reports how

    # ---- state dir --------------------------------------------------------------------------

    def _attempt_dir(self, job_id: str, attempt: int) -> Path:
        return self.state_dir / "jobs" / job_id / f"attempt-{attempt}"

    def _job(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            try:
                job = json.loads((self.state_dir / "jobs" / job_id / "job.json").read_text())
            except (OSError, ValueError):
                job = {"highest_attempt": 0, "launched_ranks": []}
            self.jobs[job_id] = job
        return job

    def _save_job(self, job_id: str) -> None:
        job_dir = self.state_dir / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(job_dir / "job.json", json.dumps(self.jobs[job_id]))

    def _save_record(self, rank: Rank) -> None:
        try:
            write_atomically(rank.record_path, json.dumps(asdict(rank.record)))
        except OSError as error:
            # The rank runs regardless; only an agent restart would lose track of it.
            log.error("cannot save the rank record", path=str(rank.record_path), error=str(error))

    @staticmethod
    def _read_pid_file(record: RankRecord) -> int:
        try:
            return int(Path(record.pid_path).read_text())
        except (OSError, ValueError):
            return 0

    def _forget(self, rank: Rank) -> None:
        self._unwatch(rank)
        self.ranks.pop(rank.key, None)
        if rank.record_path != Path():
            with contextlib.suppress(FileNotFoundError):
                rank.record_path.unlink()

    def _expire_old_exits(self) -> None:
        deadline = time.time() - UNACKNOWLEDGED_EXIT_TTL
        for rank in list(self.ranks.values()):
            if rank.ended.is_set() and rank.ended_at < deadline:
                log.info(
                    "forgetting an unacknowledged exit",
                    job=rank.record.job_id,
                    attempt=rank.record.attempt,
                    rank=rank.record.rank,
                )
                self._forget(rank)

    # ---- reporting --------------------------------------------------------------------------

    def _running_status(self, rank: Rank) -> agent_pb2.TaskStatus:
        return rank.status(agent_pb2.TASK_STATE_RUNNING, pid=rank.record.rank_pid, working_dir=rank.record.working_dir)

    def _report(self, status: agent_pb2.TaskStatus) -> None:
        try:
            self.report_fn(status)
        except Exception:
            log.exception("reporting a task status failed", job=status.job_id, attempt=status.attempt, rank=status.rank)
