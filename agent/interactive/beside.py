"""`gpuctl exec`: a process beside a running rank, started like the rank itself.

It goes through the same shim (agent/ranks/shim.py) with the rank's identity, environment and
working directory, read from the rank's own process (/proc/PID: what the rank was really started
with, GPUs and rendezvous variables included), so nothing runs as root that the rank did not. It
gets a cgroup of its own beside the rank's, with the rank's limits (not the rank's own cgroup:
the shim empties its cgroup when its process ends, which would kill the rank). Its stdin, stdout
and stderr are a new pty (-t) or three pipes; the session ending kills it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.identity import AS_AGENT, RankIdentity
from agent.ranks.cgroups import RankCgroups, RankLimits
from agent.ranks.spawn import ENV_FD, NOTIFY_FD, SHIM_ENV, ShimRequest, above_standard_descriptors, environment_file, shim_argv


class CannotExec(Exception):
    """The process cannot be started beside the rank; the message says why."""


@dataclass(frozen=True, slots=True)
class RankProcess:
    """What a process beside a rank takes from the rank's own process."""

    env: dict[str, str]
    working_dir: str
    identity: RankIdentity


def parse_status_ids(status: str) -> tuple[int, int, tuple[int, ...]]:
    """(real uid, real gid, supplementary groups) from the text of /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = int(fields["Uid"].split()[0])
    gid = int(fields["Gid"].split()[0])
    groups = tuple(int(group) for group in fields.get("Groups", "").split())
    return uid, gid, groups


def parse_environ(data: bytes) -> dict[str, str]:
    env = {}
    for entry in data.split(b"\0"):
        name, equals, value = entry.partition(b"=")
        if equals and name:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def identity_beside(uid: int, gid: int, groups: tuple[int, ...], agent_uid: int) -> RankIdentity:
    """Run as the rank runs: a root agent switches to the rank's user; one that is not root runs it as itself
    (which is whom its ranks run as)."""
    if agent_uid != 0 or uid == 0:
        return AS_AGENT
    return RankIdentity(switch=True, uid=uid, gid=gid, groups=groups)


def read_rank_process(pid: int, proc: Path = Path("/proc")) -> RankProcess:
    """The rank's environment, working directory and user, from its process. Raises CannotExec."""
    base = proc / str(pid)
    try:
        env = parse_environ((base / "environ").read_bytes())
        working_dir = os.readlink(base / "cwd")
        uid, gid, groups = parse_status_ids((base / "status").read_text())
    except (OSError, KeyError, ValueError) as error:
        raise CannotExec(f"cannot read the rank's process {pid}: {getattr(error, 'strerror', None) or error}") from None
    return RankProcess(env, working_dir, identity_beside(uid, gid, groups, os.geteuid()))


def exec_cgroup(cgroups: RankCgroups | None, rank_cgroup: str, session_id: int, limits: RankLimits) -> str:
    """A cgroup beside the rank's for one exec, with the rank's limits; empty when ranks have none."""
    if cgroups is None or not rank_cgroup:
        return ""
    path = Path(rank_cgroup).with_name(f"{Path(rank_cgroup).name}@exec-{session_id}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    cgroups.apply_limits(path, limits)
    return str(path)


def spawn_beside(request: ShimRequest, stdio: tuple[int, int, int]) -> tuple[int, int]:
    """Starts the shim with `stdio` as its stdin, stdout and stderr; returns its pid and the read end of its start
    notification (like spawn.spawn_shim, which gives a rank /dev/null and its log)."""
    handed_over: list[int] = []
    notify_read = -1
    try:
        moved = [above_standard_descriptors(os.dup(fd)) for fd in stdio]
        handed_over.extend(moved)
        env_fd = above_standard_descriptors(environment_file(request.env))
        handed_over.append(env_fd)
        notify_read, notify_write = os.pipe()
        notify_write = above_standard_descriptors(notify_write)
        handed_over.append(notify_write)
        pid = os.posix_spawn(
            request.python,
            shim_argv(request),
            {name: os.environ[name] for name in SHIM_ENV if name in os.environ},
            file_actions=[
                *((os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(moved)),
                (os.POSIX_SPAWN_DUP2, notify_write, NOTIFY_FD),
                (os.POSIX_SPAWN_DUP2, env_fd, ENV_FD),
            ],
            setsid=True,
            setsigmask=(),
        )
    except BaseException:
        if notify_read >= 0:
            os.close(notify_read)
        raise
    finally:
        for fd in handed_over:
            os.close(fd)
    return pid, notify_read
