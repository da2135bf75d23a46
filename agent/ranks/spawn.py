"""Starting a rank: its directories, its environment, and the shim (agent/ranks/shim.py) that runs it.

The shim runs as the agent (root) and gets nothing of the job's in its own environment: the
rank's environment reaches it through a memory file, its log as stdout and stderr, and its
word that the rank started (or why not) comes back on a pipe (see shim.py's docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.identity import IdentityPolicy, RankIdentity, decide_rank_identity, lookup_account
from agent.ranks import cgroups, results
from agent.ranks.cgroups import RankCgroups, RankLimits, effective_limits
from agent.ranks.logs import open_rank_log, progress_path
from agent.ranks.owned_dirs import UnsafeDirectory, ensure_owned_directory
from agent.ranks.state_dir import RankRecord, StateDir
from agent.ranks.watch import process_start_time
from gpuorch.logs import get_logger
from gpuorch.v1 import agent_pb2

log = get_logger("agent.spawn")

SHIM = str(Path(__file__).with_name("shim.py"))
NOTIFY_FD = 3
"""Descriptor number on which the shim tells the agent that the rank started (or why not)."""
ENV_FD = 4
"""Descriptor number from which the shim reads the rank's environment (see environment_file)."""

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


def give_to_owner(path: str, identity: RankIdentity) -> None:
    """Makes a file or directory the agent created for a rank belong to the rank's user."""
    if identity.switch:
        os.chown(path, identity.uid, identity.gid, follow_symlinks=False)


def working_dirs(launch: agent_pb2.LaunchTask, default_dir: str) -> tuple[str, str]:
    """Where the ranks run, and where instead if the owner cannot enter that (empty: nowhere else).

    The job's working_dir; else the directory it was submitted from, if the owner can enter it on
    this node; else the job's own directory here. Whether a directory exists is learnt only by the
    shim, after it became the owner (never with root's eyes)."""
    if launch.working_dir:
        return launch.working_dir, ""
    if launch.submit_dir:
        return launch.submit_dir, default_dir
    return default_dir, ""


def launch_problem(launch: agent_pb2.LaunchTask, default_dir: str, identity: RankIdentity) -> str:
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
            log.warning("cannot create the checkpoint directory", job=launch.job_id, path=checkpoint_dir, error=error.strerror)
    return ""


def rank_environment(
    launch: agent_pb2.LaunchTask, rank_launch: agent_pb2.RankLaunch, identity: RankIdentity, progress_file: str
) -> dict[str, str]:
    """The rank's environment: the agent's (less systemd's variables for it), the owner's, the job's, the rank's."""
    env = os.environ.copy()
    for name in AGENT_ONLY_ENV:
        env.pop(name, None)
    env.update(identity.env)
    env.update(launch.env)
    env.update(rank_launch.env)
    env["GPUORCH_PROGRESS_FILE"] = progress_file
    return env


def prepare_progress_file(path: str, identity: RankIdentity) -> None:
    """gpuorch.worker.report_progress() touches this file; the agent reports its mtime in heartbeats.

    It starts out dated 0 (= no progress yet) and belongs to the rank's user, who may touch it but,
    the directory being the agent's, neither replace nor remove it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    os.utime(path, ns=(0, 0))
    give_to_owner(path, identity)


@dataclass(frozen=True, slots=True)
class ShimRequest:
    """Everything one shim is started with."""

    python: str
    argv: list[str]
    env: dict[str, str]
    log_path: str
    pid_path: str
    exit_path: str
    working_dir: str
    fallback_dir: str
    identity: RankIdentity
    cgroup: str
    max_log_bytes: int
    terminal: int = -1
    """A pty's terminal end for the rank's stdin, stdout and stderr (the shim's --tty); -1 = /dev/null and the log."""


def shim_argv(request: ShimRequest) -> list[str]:
    identity = request.identity
    switch_user = (
        ["--uid", str(identity.uid), "--gid", str(identity.gid), "--groups", ",".join(map(str, identity.groups))]
        if identity.switch
        else []
    )
    return [
        request.python, "-I", "-S", SHIM,
        "--notify-fd", str(NOTIFY_FD),
        "--env-fd", str(ENV_FD),
        "--pid-file", request.pid_path,
        "--exit-file", request.exit_path,
        "--cwd", request.working_dir,
        *(["--cwd-fallback", request.fallback_dir] if request.fallback_dir else []),
        *switch_user,
        *(["--cgroup", request.cgroup] if request.cgroup else []),
        *(["--log-file", request.log_path, "--max-log-bytes", str(request.max_log_bytes)]
          if request.max_log_bytes and request.terminal < 0 else []),
        *(["--tty", "1"] if request.terminal >= 0 else []),
        "--", *request.argv,
    ]  # fmt: skip


def spawn_shim(request: ShimRequest) -> tuple[int, int]:
    """Starts the shim; returns its pid and the read end of its start notification."""
    handed_over: list[int] = []  # the agent's copies of the shim's descriptors, closed once it has them
    notify_read = -1
    try:
        if request.terminal >= 0:  # the terminal's holder copies its output into the log
            log_fd = above_standard_descriptors(os.dup(request.terminal))
        else:
            log_fd = above_standard_descriptors(open_rank_log(request.log_path, request.identity))
        handed_over.append(log_fd)
        env_fd = above_standard_descriptors(environment_file(request.env))
        handed_over.append(env_fd)
        notify_read, notify_write = os.pipe()
        notify_write = above_standard_descriptors(notify_write)
        handed_over.append(notify_write)
        shim_pid = os.posix_spawn(
            request.python,
            shim_argv(request),
            {name: os.environ[name] for name in SHIM_ENV if name in os.environ},  # nothing of the job's (see environment_file)
            file_actions=[
                (os.POSIX_SPAWN_DUP2, log_fd, 0)
                if request.terminal >= 0
                else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
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
        raise
    finally:
        for fd in handed_over:
            os.close(fd)
    return shim_pid, notify_read


@dataclass(frozen=True, slots=True)
class StartSettings:
    """The supervisor's settings for every rank it starts."""

    python: str
    cgroups: RankCgroups | None
    default_limits: RankLimits
    max_log_bytes: int
    terminals: TerminalOpener | None = None
    """Opens the terminal of an interactive launch's rank 0 (agent/interactive/terminals.py); None = no terminals."""


class TerminalOpener(Protocol):
    def open(self, job_id: str, attempt: int, rank: int, log_path: str, exit_path: str) -> int:
        """A new pty for the rank; returns its terminal end (the caller closes it once the shim has it)."""
        ...


@dataclass(frozen=True, slots=True)
class HowToStart:
    """What start_rank needs besides the launch: the settings, and what was decided for the launch."""

    settings: StartSettings
    working_dir: str
    fallback_dir: str
    identity: RankIdentity


def prepare_launch(
    state: StateDir, launch: agent_pb2.LaunchTask, policy: IdentityPolicy, owners_authenticated: bool, settings: StartSettings
) -> HowToStart | str:
    """Records the launch in the state dir, decides whose ranks these are and where they run, and makes
    the job's directories; returns how to start the ranks, or why none of them can start."""
    default_dir = state.default_working_dir(launch.job_id)
    working_dir, fallback_dir = working_dirs(launch, default_dir)
    identity = decide_rank_identity(
        launch.owner, policy, agent_uid=os.geteuid(), lookup=lookup_account, owners_authenticated=owners_authenticated
    )
    try:
        state.save_job(launch.job_id)
    except OSError as error:
        return f"cannot record the launch in the agent's state dir: {error}"
    if isinstance(identity, str):
        return identity
    return launch_problem(launch, default_dir, identity) or HowToStart(settings, working_dir, fallback_dir, identity)


def start_rank(
    state: StateDir, launch: agent_pb2.LaunchTask, rank_launch: agent_pb2.RankLaunch, how: HowToStart
) -> tuple[RankRecord, int]:
    """Prepares one rank's files, environment and cgroup and starts its shim; returns the rank's record
    and the read end of the shim's start notification. Raises OSError when it cannot."""
    base = state.rank_base(launch.job_id, launch.attempt, rank_launch.rank)
    base.parent.mkdir(parents=True, exist_ok=True)
    log_path, pid_path, exit_path = (str(base.with_suffix(suffix)) for suffix in (".log", ".pid", ".exit"))
    for leftover in (pid_path, exit_path):  # from an earlier run of the same attempt and rank
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    progress_file = str(progress_path(base))
    env = rank_environment(launch, rank_launch, how.identity, progress_file)
    prepare_progress_file(progress_file, how.identity)
    env.update(results.prepare(base, launch, how.identity))
    settings = how.settings
    limits = effective_limits(RankLimits(launch.pids_max, launch.memory_max_bytes), settings.default_limits)
    cgroup = ""
    if settings.cgroups is not None:
        cgroup = str(settings.cgroups.create(launch.job_id, launch.attempt, rank_launch.rank, limits))
    terminal = -1
    if launch.interactive and rank_launch.rank == 0 and settings.terminals is not None:
        terminal = settings.terminals.open(launch.job_id, launch.attempt, rank_launch.rank, log_path, exit_path)
    request = ShimRequest(
        settings.python, list(launch.argv), env, log_path, pid_path, exit_path, how.working_dir, how.fallback_dir, how.identity,
        cgroup, settings.max_log_bytes, terminal,
    )  # fmt: skip
    try:
        shim_pid, notify_read = spawn_shim(request)
    except BaseException:
        if cgroup:
            cgroups.remove(Path(cgroup))  # nothing joined it
        raise
    finally:
        if terminal >= 0:
            os.close(terminal)  # the shim has it; the master sees the end once the rank's side is all closed
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
        time_limit_seconds=launch.time_limit_seconds,
        stop_grace_seconds=launch.stop_grace_seconds,
    )
    return record, notify_read


@dataclass(frozen=True, slots=True)
class StartNotice:
    """What the shim said on its notification pipe."""

    rank_pid: int = 0
    """Set when the rank started."""
    working_dir: str = ""
    """Where it runs (the shim's choice between --cwd and --cwd-fallback)."""
    failure: str = ""
    """Set when it could not start: why."""


def parse_start_notice(notice: str) -> StartNotice | None:
    """ "started <pid> [<working dir, hex>]" or "failed <why>"; None when the shim died before saying either."""
    if notice.startswith("started "):
        words = notice.split()
        working_dir = bytes.fromhex(words[2]).decode("utf-8", "surrogateescape") if len(words) > 2 else ""
        return StartNotice(rank_pid=int(words[1]), working_dir=working_dir)
    if notice.startswith("failed "):
        return StartNotice(failure=notice.removeprefix("failed "))
    return None


async def read_start_notice(fd: int) -> str:
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
