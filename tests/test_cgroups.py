"""Ranks in cgroups of their own: the pure rules, and (where cgroup v2 is writable) real ranks that
try to escape a cancel with setsid(), killed with their cgroup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.identity import IdentityPolicy
from agent.ranks import cgroups
from agent.ranks.cgroups import RankLimits, cgroup2_mount, effective_limits, limit_writes, open_rank_cgroups, own_cgroup
from agent.ranks.supervisor import Supervisor
from agent.settings import AgentSettings
from gpuorch.v1 import agent_pb2

RUNNING = agent_pb2.TASK_STATE_RUNNING
EXITED = agent_pb2.TASK_STATE_EXITED

HYBRID_MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,pids
"""


# ---- the pure rules -----------------------------------------------------------------------------


def test_the_cgroup2_mount_is_found_in_a_hybrid_and_a_unified_layout():
    assert cgroup2_mount(HYBRID_MOUNTINFO) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount("30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n") == "/sys/fs/cgroup"
    assert cgroup2_mount("27 25 0:24 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n") is None


def test_own_cgroup_is_the_v2_line_of_proc_self_cgroup():
    assert own_cgroup("4:memory:/x\n0::/system.slice/gpuorch-agent.service\n") == "/system.slice/gpuorch-agent.service"
    assert own_cgroup("4:memory:/x\n") is None


def test_a_jobs_own_limits_win_and_the_nodes_defaults_fill_in():
    node = RankLimits(pids_max=4096, memory_max_bytes=64 << 30)
    assert effective_limits(RankLimits(), node) == node
    assert effective_limits(RankLimits(pids_max=100), node) == RankLimits(100, 64 << 30)
    assert effective_limits(RankLimits(memory_max_bytes=1 << 30), RankLimits()) == RankLimits(0, 1 << 30)


def test_limits_are_written_only_where_their_controller_is_enabled_and_the_rest_is_named():
    limits = RankLimits(pids_max=100, memory_max_bytes=1 << 30)
    assert limit_writes(limits, frozenset({"pids", "memory"})) == ([("pids.max", "100"), ("memory.max", str(1 << 30))], [])
    assert limit_writes(limits, frozenset({"pids"})) == ([("pids.max", "100")], [f"memory.max={1 << 30} (no memory controller)"])
    assert limit_writes(RankLimits(), frozenset()) == ([], [])


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ({"cgroup_root": "relative/dir"}, "cgroup_root must be empty"),
        ({"default_pids_max": -1}, "default_pids_max and default_memory_max_bytes must be >= 0"),
        ({"max_log_bytes": 100}, "max_log_bytes must be 0"),
    ],
)
def test_bad_cgroup_and_log_settings_are_named(setting, error):
    with pytest.raises(ValueError, match=error):
        AgentSettings(**setting).validate()


def test_no_cgroups_when_off_or_when_the_agent_sits_in_a_cgroup_not_delegated_to_it():
    assert open_rank_cgroups("off") is None
    assert open_rank_cgroups("", mountinfo=HYBRID_MOUNTINFO, proc_cgroup="0::/\n") is None
    assert open_rank_cgroups("", mountinfo="", proc_cgroup="0::/x.service\n") is None


# ---- real cgroups (root, and a writable cgroup v2 hierarchy) ----------------------------------


def writable_cgroup2() -> tuple[Path | None, str]:
    """The cgroup v2 mount, if this process may make cgroups in it; else why not."""
    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    probe = Path(mount) / f"gpuorch-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as error:
        return None, f"cgroup v2 at {mount} is not writable here: {error.strerror}"
    has_kill = (probe / "cgroup.kill").exists()
    probe.rmdir()
    if not has_kill:
        return None, f"no cgroup.kill at {mount} (Linux {os.uname().release} < 5.14)"
    return Path(mount), ""


CGROUP2, NO_CGROUP2 = writable_cgroup2()
needs_cgroup2 = pytest.mark.skipif(CGROUP2 is None, reason=NO_CGROUP2 or "")


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie does not: it holds nothing, and init here may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def remove_tree(root: Path) -> None:
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            cgroups.kill(directory)
            time.sleep(0.05)
            directory.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


@pytest.fixture
def cgroup_root():
    assert CGROUP2 is not None
    root = CGROUP2 / f"gpuorch-test-{uuid.uuid4().hex[:8]}"
    yield root
    remove_tree(root)


class Reports(list):
    async def wait_for(self, state: int, timeout: float = 10.0) -> agent_pb2.TaskStatus:
        deadline = time.monotonic() + timeout
        while not (found := [status for status in self if status.state == state]):
            assert time.monotonic() < deadline, f"no {agent_pb2.TaskState.Name(state)} within {timeout}s: {list(self)}"
            await asyncio.sleep(0.02)
        return found[0]


ESCAPING_RANK = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()  # leaves the rank's session and process group
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        while True:
            time.sleep(1)
    os._exit(0)
if sys.argv[2] == "stay":
    while True:
        time.sleep(1)
"""


async def launch_escaping_rank(supervisor: Supervisor, reports: Reports, tmp_path: Path, main_rank: str) -> tuple[int, int]:
    """Starts ESCAPING_RANK; returns (rank pid, grandchild pid) once the grandchild runs."""
    pid_file = tmp_path / "grandchild.pid"
    argv = [sys.executable, "-c", ESCAPING_RANK, str(pid_file), main_rank]
    await supervisor.launch(agent_pb2.LaunchTask(job_id="j-esc", attempt=1, argv=argv, ranks=[agent_pb2.RankLaunch(rank=0)]))
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the grandchild did not start"
        await asyncio.sleep(0.02)
    return (await reports.wait_for(RUNNING)).pid, int(pid_file.read_text())


@pytest.fixture
async def supervisor_in_cgroups(tmp_path, cgroup_root):
    reports = Reports()
    supervisor = Supervisor(
        tmp_path / "agent",
        reports.append,
        identity_policy=IdentityPolicy(single_user=True),
        cgroups=open_rank_cgroups(str(cgroup_root)),
    )
    assert supervisor.cgroups is not None
    await supervisor.recover()
    yield supervisor, reports
    await supervisor.close()


@needs_cgroup2
async def test_a_rank_that_ignores_sigterm_and_double_forks_with_setsid_is_killed_with_its_cgroup_on_cancel(
    supervisor_in_cgroups, tmp_path
):
    supervisor, reports = supervisor_in_cgroups
    rank_pid, grandchild = await launch_escaping_rank(supervisor, reports, tmp_path, "stay")
    cgroup = supervisor.cgroups.path("j-esc", 1, 0)
    assert grandchild in cgroups.procs(cgroup) and rank_pid in cgroups.procs(cgroup)
    assert os.getpgid(grandchild) != rank_pid, "the grandchild left the rank's process group"
    await supervisor.stop(agent_pb2.StopTask(job_id="j-esc", grace_seconds=0.3))
    exited = await reports.wait_for(EXITED)
    assert exited.signal == signal.SIGKILL
    assert not alive(grandchild), "the escaped grandchild survived the cancel"
    assert not cgroup.exists(), "the rank's cgroup is removed once empty"


@needs_cgroup2
async def test_what_a_rank_left_behind_with_setsid_dies_before_its_end_is_reported(supervisor_in_cgroups, tmp_path):
    """A rank's end frees its GPUs: it is reported only once nothing of the rank lives on."""
    supervisor, reports = supervisor_in_cgroups
    _, grandchild = await launch_escaping_rank(supervisor, reports, tmp_path, "exit")
    exited = await reports.wait_for(EXITED)
    assert (exited.exit_code, exited.signal) == (0, 0)
    assert not alive(grandchild), "the daemonised helper outlived the rank's reported end"


@needs_cgroup2
async def test_without_a_cgroup_an_escaped_grandchild_survives_the_cancel(tmp_path):
    """Why the cgroup is needed: the process group alone misses what called setsid()."""
    reports = Reports()
    supervisor = Supervisor(tmp_path / "agent", reports.append, identity_policy=IdentityPolicy(single_user=True))
    await supervisor.recover()
    _, grandchild = await launch_escaping_rank(supervisor, reports, tmp_path, "stay")
    try:
        await supervisor.stop(agent_pb2.StopTask(job_id="j-esc", grace_seconds=0.3))
        await reports.wait_for(EXITED)
        assert alive(grandchild)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
        await supervisor.close()


@needs_cgroup2
def test_the_fallback_without_cgroup_kill_kills_every_listed_process(cgroup_root):
    """Linux < 5.14 has no cgroup.kill: freeze, kill every pid in cgroup.procs, thaw."""
    cgroup = open_rank_cgroups(str(cgroup_root)).create("j-fb", 1, 0, RankLimits())
    sleepers = [
        subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec sleep 60"], start_new_session=True)
        for _ in range(3)
    ]
    deadline = time.monotonic() + 10
    while len(cgroups.procs(cgroup)) < 3:
        assert time.monotonic() < deadline, cgroups.procs(cgroup)
        time.sleep(0.02)
    cgroups.kill_listed(cgroup)
    for sleeper in sleepers:
        assert sleeper.wait(10) == -signal.SIGKILL
    assert cgroups.is_empty(cgroup)


@needs_cgroup2
def test_limits_are_set_where_the_controllers_are_available(cgroup_root):
    rank_cgroups = open_rank_cgroups(str(cgroup_root))
    if "pids" not in rank_cgroups.controllers:
        available = (cgroup_root / "cgroup.controllers").read_text().split()
        pytest.skip(f"the pids controller is not available to {cgroup_root} (has: {available or 'none'}), e.g. a hybrid layout")
    cgroup = rank_cgroups.create("j-lim", 1, 0, RankLimits(pids_max=7))
    assert (cgroup / "pids.max").read_text().strip() == "7"


@needs_cgroup2
def test_a_delegated_agent_moves_itself_into_a_leaf_and_puts_ranks_beside_it(cgroup_root):
    """As under systemd with Delegate=yes: the unit's cgroup (marked trusted.delegate) holds agent/ and ranks/."""
    cgroup_root.mkdir()
    os.setxattr(cgroup_root, "trusted.delegate", b"1")
    program = (
        "import os, sys; from agent.ranks.cgroups import open_rank_cgroups; "
        "(mount, own) = sys.argv[1:]; "
        "open(os.path.join(mount, own.lstrip('/'), 'cgroup.procs'), 'w').write(str(os.getpid())); "
        "subtree = open_rank_cgroups(''); print('ranks=' + str(subtree.ranks_dir)); "
        "print('own=' + open('/proc/self/cgroup').read().split('0::')[1])"
    )
    own = "/" + str(cgroup_root.relative_to(CGROUP2))
    result = subprocess.run(
        [sys.executable, "-c", program, str(CGROUP2), own], capture_output=True, text=True, timeout=30, check=True
    )
    said = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.startswith(("ranks=", "own=")))
    assert said["ranks"] == str(cgroup_root / "ranks")
    assert said["own"] == f"{own}/agent", "the agent left the unit's cgroup for its leaf"


def test_the_agent_unit_delegates_its_cgroup_subtree_and_leaves_it_writable():
    from tests.test_systemd import UNITS, unit_directives

    agent = unit_directives(UNITS["agent"])
    assert agent["Delegate"] == ["yes"]
    assert "ProtectControlGroups" not in agent, "ProtectControlGroups= makes the delegated subtree read-only too"


@needs_cgroup2
def test_cancel_through_a_real_cluster_kills_the_escaped_grandchild_and_only_then_frees_the_gpu(tmp_path, cgroup_root):
    from tests.harness import LocalCluster, wait_for

    cluster = LocalCluster(tmp_path / "cluster")
    try:
        cluster.start_coordinator("--stop-grace-period", "0.5")
        cluster.add_agent("n1", 1, "--cgroup-root", str(cgroup_root))
        cluster.wait_for_nodes(1)
        client = cluster.client()
        pid_file = tmp_path / "grandchild.pid"
        job_id = client.submit_job(argv=[sys.executable, "-c", ESCAPING_RANK, str(pid_file), "stay"], gpus=1, max_restarts=0)
        wait_for(pid_file.exists, timeout=20, what="the grandchild to start")
        grandchild = int(pid_file.read_text())
        assert (cgroup_root / f"{job_id}@1@0").is_dir()
        client.cancel_job(job_id)
        wait_for(
            lambda: not any(True for node in client.list_nodes() for device in node.devices if device.allocated_job_id),
            timeout=15,
            what="the GPU freed",
        )
        assert not alive(grandchild), "the GPU was reported free while the escaped grandchild still ran"
    finally:
        cluster.stop()


def test_limits_go_to_their_files_and_a_stopping_agent_turns_its_controllers_off_again(tmp_path):
    """The writes themselves, on plain files standing in for a cgroup with both controllers (this test
    machine may have none in cgroup v2): what the kernel would receive."""
    unit, ranks, rank = tmp_path / "unit", tmp_path / "unit" / "ranks", tmp_path / "unit" / "ranks" / "j@1@0"
    rank.mkdir(parents=True)
    for path in (unit / "cgroup.subtree_control", ranks / "cgroup.subtree_control", rank / "pids.max", rank / "memory.max"):
        path.write_text("")
    subtree = cgroups.RankCgroups(ranks, frozenset({"pids", "memory"}), release_dirs=(ranks, unit))
    subtree.apply_limits(rank, RankLimits(pids_max=512, memory_max_bytes=8 << 30))
    assert ((rank / "pids.max").read_text(), (rank / "memory.max").read_text()) == ("512", str(8 << 30))
    subtree.release_controllers()
    released = {(unit / "cgroup.subtree_control").read_text(), (ranks / "cgroup.subtree_control").read_text()}
    assert released in ({"-memory -pids"}, {"-pids -memory"})
