"""One cgroup v2 per rank: a rank and everything it starts are stopped together, and limited.

A process group is not enough to find what a rank started: a child that calls setsid()
leaves it, and survives a cancel while it still holds the rank's GPUs. A cgroup cannot be
left by an unprivileged process (moving a process needs write access to the cgroup.procs
of both cgroups and of their common ancestor, all root's), so the agent puts each rank in
a cgroup of its own, stops it with `cgroup.kill` (Linux >= 5.14; before that, by
freezing the cgroup and killing every pid in it), and reports a rank's end, which frees
its GPUs, only once its cgroup is empty. Where the pids and memory controllers are
available, the rank's cgroup also gets `pids.max` and `memory.max`.

Where the subtree lies (agent setting `cgroup_root`):

- empty (the default): the agent's own cgroup, when systemd delegated it to the agent
  (Delegate=yes in gpuorch-agent.service; systemd marks such a cgroup with the xattr
  trusted.delegate). The kernel lets a cgroup hand controllers to its children only while
  it holds no process itself, so the agent moves itself into a leaf:
      <unit cgroup>/agent/                          the agent and the shims it starts
      <unit cgroup>/ranks/<job>@<attempt>@<rank>/   one rank and what it starts
  Anywhere else (the root cgroup, a unit without Delegate=yes) the agent uses no cgroups
  and says so: the cgroups outside a delegated subtree are systemd's.
- a directory: <dir>/<job>@<attempt>@<rank>/; the directory is the agent's alone (one agent per
  directory), made by the operator or by the agent.
- "off": no cgroups.

Device access: cgroup v2 controls device access only through BPF programs
(BPF_PROG_TYPE_CGROUP_DEVICE), which take CAP_SYS_ADMIN or CAP_BPF, a capability the agent's
unit does not grant (and would hand to nothing else); so ranks are not limited to their own
GPUs by their cgroup. The unit's DevicePolicy=closed limits the whole unit to GPUs and RDMA
devices, and CUDA_VISIBLE_DEVICES tells each rank which GPUs are its own.

Restarts: systemd before 254 (no DelegateSubgroup=) puts a restarted agent back into the
unit's cgroup itself, which the kernel refuses while controllers are enabled for its
children. So on a clean stop the agent turns the controllers of its subtree off again
(the running ranks keep their cgroups, so cgroup.kill still finds everything, but their
limits lapse until the agent is back and re-applies them, see ranks/supervisor.py's recover).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from gpuorch.logs import get_logger

log = get_logger("agent.cgroups")

LIMIT_CONTROLLERS = ("pids", "memory")
"""The controllers the agent enables for the ranks' cgroups, where available."""

FALLBACK_KILL_ROUNDS = 50
"""Rounds of freeze, kill every pid, thaw, where cgroup.kill is missing (a fork bomb may need several)."""


@dataclass(frozen=True)
class RankLimits:
    """Limits of one rank's cgroup; 0 = none."""

    pids_max: int = 0
    memory_max_bytes: int = 0


NO_LIMITS = RankLimits()


def effective_limits(requested: RankLimits, node_default: RankLimits) -> RankLimits:
    """The job's own limits, each falling back to the node's default where the job sets none."""
    return RankLimits(
        pids_max=requested.pids_max or node_default.pids_max,
        memory_max_bytes=requested.memory_max_bytes or node_default.memory_max_bytes,
    )


def limit_writes(limits: RankLimits, controllers: frozenset[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(file, value) to write into a rank's cgroup for `limits`, and the limits that cannot be enforced
    because their controller is not enabled for the ranks' cgroups."""
    writes: list[tuple[str, str]] = []
    unenforced: list[str] = []
    for controller, file, value in (("pids", "pids.max", limits.pids_max), ("memory", "memory.max", limits.memory_max_bytes)):
        if not value:
            continue
        if controller in controllers:
            writes.append((file, str(value)))
        else:
            unenforced.append(f"{file}={value} (no {controller} controller)")
    return writes, unenforced


def cgroup2_mount(mountinfo: str) -> str | None:
    """Mount point of the cgroup v2 hierarchy in /proc/self/mountinfo's text (unified or hybrid layout)."""
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return before.split()[4].replace("\\040", " ")
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """The process's cgroup v2 path (from /proc/self/cgroup's "0::/path" line)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def rank_cgroup_name(job_id: str, attempt: int, rank: int) -> str:
    return f"{job_id}@{attempt}@{rank}"


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def is_empty(cgroup: Path) -> bool:
    """No live process in `cgroup` or below (zombies do not count: they hold nothing); a cgroup that
    is gone is empty."""
    try:
        events = (cgroup / "cgroup.events").read_text()
    except FileNotFoundError:
        return True
    return "populated 0" in events.splitlines()


def procs(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def kill(cgroup: Path) -> None:
    """SIGKILLs every process in `cgroup` and below; returns at once (they die asynchronously)."""
    try:
        _write(cgroup / "cgroup.kill", "1")
        return
    except FileNotFoundError:
        if not cgroup.is_dir():
            return  # gone: nothing left to kill
    kill_listed(cgroup)


def kill_listed(cgroup: Path) -> None:
    """What kill() does before Linux 5.14 (no cgroup.kill): freeze, so nothing forks meanwhile, kill
    every pid in cgroup.procs, thaw (a frozen process dies once thawed); again while any is left, in
    case a fork slipped in before the freeze."""
    for _ in range(FALLBACK_KILL_ROUNDS):
        pids = procs(cgroup)
        if not pids:
            return
        with contextlib.suppress(OSError):
            _write(cgroup / "cgroup.freeze", "1")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            _write(cgroup / "cgroup.freeze", "0")
        time.sleep(0.01)


async def empty_and_remove(cgroup: Path, *, complain_every: float = 10.0) -> None:
    """Kills what is left in a rank's cgroup and waits until none of it lives, then removes the
    cgroup: a rank's end, which frees its GPUs, is reported only after this. A cgroup that stays
    populated (a process in D state) is complained about every `complain_every` seconds."""
    waited = 0.0
    while not is_empty(cgroup):
        kill(cgroup)
        await asyncio.sleep(0.02)
        waited += 0.02
        if waited >= complain_every:
            log.error("rank's cgroup still not empty after SIGKILL", cgroup=str(cgroup))
            waited = 0.0
    remove(cgroup)


def remove(cgroup: Path) -> None:
    """Removes an empty rank cgroup; one still populated (or gone) is left as it is."""
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot remove a rank's cgroup", cgroup=str(cgroup), error=error.strerror)


class RankCgroups:
    """The agent's cgroup subtree: creates, limits, kills and removes the ranks' cgroups."""

    def __init__(self, ranks_dir: Path, controllers: frozenset[str], *, release_dirs: tuple[Path, ...] = ()) -> None:
        self.ranks_dir = ranks_dir
        self.controllers = controllers
        """Controllers enabled for the ranks' cgroups (a subset of LIMIT_CONTROLLERS)."""
        self.release_dirs = release_dirs
        """Where release_controllers() turns the controllers off again, deepest first."""

    def path(self, job_id: str, attempt: int, rank: int) -> Path:
        return self.ranks_dir / rank_cgroup_name(job_id, attempt, rank)

    def create(self, job_id: str, attempt: int, rank: int, limits: RankLimits) -> Path:
        """The rank's cgroup, made (or reused, for a rerun of the same rank) with `limits` applied."""
        cgroup = self.path(job_id, attempt, rank)
        with contextlib.suppress(FileExistsError):
            os.mkdir(cgroup)
        self.apply_limits(cgroup, limits)
        return cgroup

    def apply_limits(self, cgroup: Path, limits: RankLimits) -> None:
        writes, unenforced = limit_writes(limits, self.controllers)
        for file, value in writes:
            _write(cgroup / file, value)
        if unenforced:
            log.warning("rank limits not enforced on this node", cgroup=str(cgroup), limits=unenforced)

    def release_controllers(self) -> None:
        """Turns the controllers off again (see the module docstring: restarts); rank cgroups stay."""
        for directory in self.release_dirs:
            with contextlib.suppress(OSError):
                _write(directory / "cgroup.subtree_control", " ".join(f"-{name}" for name in self.controllers))


def _enable_controllers(directory: Path, wanted: tuple[str, ...]) -> frozenset[str]:
    """Enables what it can of `wanted` for the children of `directory`; returns what is enabled."""
    try:
        available = set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()
    enabled = set()
    for name in wanted:
        if name not in available:
            continue
        try:
            _write(directory / "cgroup.subtree_control", f"+{name}")
            enabled.add(name)
        except OSError as error:
            log.warning(
                "cannot enable a cgroup controller for ranks", cgroup=str(directory), controller=name, error=error.strerror
            )
    return frozenset(enabled)


def _delegated(directory: Path) -> bool:
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(directory, name) == b"1":
                return True
    return False


def open_rank_cgroups(setting: str, *, mountinfo: str | None = None, proc_cgroup: str | None = None) -> RankCgroups | None:
    """The ranks' cgroup subtree for agent setting `cgroup_root` (see the module docstring), or None
    (said in the log) where there is none to use. In the delegated case, moves the agent into its leaf."""
    if setting == "off":
        return None
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    mount = cgroup2_mount(mountinfo)
    if mount is None:
        log.warning("no cgroup v2 hierarchy mounted; ranks run without cgroups (cancel may miss processes that call setsid)")
        return None
    try:
        if setting:
            return _open_directory(Path(setting))
        if proc_cgroup is None:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        return _open_delegated(Path(mount), own_cgroup(proc_cgroup))
    except OSError as error:
        log.warning("cannot set up the ranks' cgroups; ranks run without", cgroup_root=setting, error=str(error))
        return None


def _open_directory(root: Path) -> RankCgroups:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "cgroup.procs").exists():
        raise OSError(errno.ENOTDIR, f"{root} is not a cgroup v2 directory")
    controllers = _enable_controllers(root, LIMIT_CONTROLLERS)
    log.info(
        "rank cgroups", root=str(root), controllers=sorted(controllers), kill="cgroup.kill" if _has_kill(root) else "fallback"
    )
    return RankCgroups(root, controllers)


def _open_delegated(mount: Path, own: str | None) -> RankCgroups | None:
    if not own or own == "/":
        log.info("ranks run without cgroups: the agent's cgroup is not delegated to it (set cgroup_root, or Delegate=yes)")
        return None
    unit = mount / own.lstrip("/")
    if unit.name == "agent" and _delegated(unit.parent):
        unit = unit.parent  # a restarted agent that moved itself already
    if not _delegated(unit):
        log.info("ranks run without cgroups: the agent's cgroup is not delegated to it", cgroup=str(unit))
        return None
    leaf, ranks = unit / "agent", unit / "ranks"
    leaf.mkdir(exist_ok=True)
    ranks.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", str(os.getpid()))
    controllers = _enable_controllers(unit, LIMIT_CONTROLLERS)
    controllers = _enable_controllers(ranks, tuple(sorted(controllers)))
    log.info(
        "rank cgroups", root=str(ranks), controllers=sorted(controllers), kill="cgroup.kill" if _has_kill(ranks) else "fallback"
    )
    return RankCgroups(ranks, controllers, release_dirs=(ranks, unit))


def _has_kill(directory: Path) -> bool:
    return (directory / "cgroup.kill").exists()
