"""The directories the agent hands a rank, where it runs, and how big its log grows: real ranks
through the real supervisor and shim."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent.identity import IdentityPolicy
from agent.ranks.owned_dirs import UnsafeDirectory, ensure_owned_directory
from agent.ranks.supervisor import Supervisor
from gpuorch.v1 import agent_pb2

RUNNING = agent_pb2.TASK_STATE_RUNNING
EXITED = agent_pb2.TASK_STATE_EXITED
FAILED_TO_START = agent_pb2.TASK_STATE_FAILED_TO_START
SINGLE_USER = IdentityPolicy(single_user=True)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files of another user, ranks as another user")


class Node:
    """A supervisor on `state_dir` and what it reported."""

    def __init__(self, state_dir: Path, policy: IdentityPolicy = SINGLE_USER, **options) -> None:
        self.statuses: list[agent_pb2.TaskStatus] = []
        self.state_dir = state_dir
        self.supervisor = Supervisor(
            state_dir, self.statuses.append, identity_policy=policy, owners_authenticated=lambda: True, **options
        )

    async def wait_for(self, *states: int, timeout: float = 20) -> agent_pb2.TaskStatus:
        deadline = time.monotonic() + timeout
        while not (found := [status for status in self.statuses if status.state in states]):
            assert time.monotonic() < deadline, f"no {states} within {timeout}s: {self.statuses}"
            await asyncio.sleep(0.02)
        return found[0]

    async def run(self, argv: list[str], owner: str = "", env: dict[str, str] | None = None, **fields) -> agent_pb2.TaskStatus:
        """Launches job j-1's rank 0 and returns how it ended."""
        await self.supervisor.recover()
        launch = agent_pb2.LaunchTask(
            job_id="j-1", attempt=1, argv=argv, owner=owner, env=env or {}, ranks=[agent_pb2.RankLaunch(rank=0)], **fields
        )
        try:
            await self.supervisor.launch(launch)
            return await self.wait_for(EXITED, FAILED_TO_START)
        finally:
            await self.supervisor.close()

    def log(self) -> str:
        return (self.state_dir / "jobs" / "j-1" / "attempt-1" / "rank-0.log").read_text()


# ---- the checkpoint directory -------------------------------------------------------------------


async def test_a_planted_symlink_at_the_jobs_checkpoint_dir_is_refused(tmp_path):
    shared_root, attackers = tmp_path / "checkpoints", tmp_path / "attackers-dir"
    shared_root.mkdir()
    attackers.mkdir()
    (shared_root / "j-1").symlink_to(attackers)
    marker = tmp_path / "ran"
    node = Node(tmp_path / "agent")
    end = await node.run(["/usr/bin/touch", str(marker)], env={"GPUORCH_CHECKPOINT_DIR": str(shared_root / "j-1")})
    assert end.state == FAILED_TO_START
    assert end.message == f"unsafe checkpoint directory: {str(shared_root / 'j-1')!r} is a symbolic link, not a directory"
    assert not marker.exists(), "nothing ran"


async def test_a_group_or_world_writable_checkpoint_dir_is_refused(tmp_path):
    planted = tmp_path / "checkpoints" / "j-1"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    end = await Node(tmp_path / "agent").run(["/bin/true"], env={"GPUORCH_CHECKPOINT_DIR": str(planted)})
    assert end.state == FAILED_TO_START and "is writable by its group or by others (mode 0777)" in end.message, end


@needs_root
async def test_a_checkpoint_dir_of_another_user_is_refused(tmp_path):
    planted = tmp_path / "checkpoints" / "j-1"
    planted.mkdir(parents=True, mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    end = await Node(tmp_path / "agent").run(["/bin/true"], env={"GPUORCH_CHECKPOINT_DIR": str(planted)})
    assert end.state == FAILED_TO_START
    assert f"belongs to nobody (uid {nobody.pw_uid}), not to the job's user" in end.message, end


async def test_a_missing_checkpoint_dir_is_made_the_rank_users_alone_and_an_existing_own_one_is_reused(tmp_path):
    checkpoint = tmp_path / "new-root" / "sub" / "j-1"
    node = Node(tmp_path / "agent")
    end = await node.run(
        ["/bin/sh", "-c", 'touch "$GPUORCH_CHECKPOINT_DIR/step-1"'], env={"GPUORCH_CHECKPOINT_DIR": str(checkpoint)}
    )
    assert (end.state, end.exit_code) == (EXITED, 0), end
    made = checkpoint.stat()
    assert (made.st_uid, stat.S_IMODE(made.st_mode)) == (os.geteuid(), 0o700)
    assert (checkpoint / "step-1").exists()
    again = Node(tmp_path / "agent")
    launch = agent_pb2.LaunchTask(
        job_id="j-1",
        attempt=2,
        argv=["/bin/true"],
        env={"GPUORCH_CHECKPOINT_DIR": str(checkpoint)},
        ranks=[agent_pb2.RankLaunch(rank=0)],
    )
    await again.supervisor.recover()
    await again.supervisor.launch(launch)
    assert (await again.wait_for(EXITED, FAILED_TO_START)).state == EXITED
    await again.supervisor.close()


def test_ensure_owned_directory_refuses_a_symlink_and_a_file_and_makes_the_missing_components(tmp_path):
    uid, gid = os.geteuid(), os.getegid()
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectory, match="is a symbolic link"):
        ensure_owned_directory(str(tmp_path / "link"), uid, gid)
    with pytest.raises(UnsafeDirectory, match="is not a directory"):
        ensure_owned_directory(str(tmp_path / "file"), uid, gid)
    assert ensure_owned_directory(str(tmp_path / "a" / "b" / "c"), uid, gid) is True
    assert stat.S_IMODE((tmp_path / "a" / "b" / "c").stat().st_mode) == 0o700
    assert ensure_owned_directory(str(tmp_path / "a" / "b" / "c"), uid, gid) is False


# ---- where the rank runs ------------------------------------------------------------------------


async def test_a_rank_runs_in_the_submit_dir_and_says_so_on_running(tmp_path):
    submit_dir = tmp_path / "project"
    submit_dir.mkdir()
    node = Node(tmp_path / "agent")
    end = await node.run(["/bin/sh", "-c", "pwd"], submit_dir=str(submit_dir))
    assert (end.state, end.exit_code) == (EXITED, 0), end
    assert node.log().strip() == str(submit_dir)
    running = [status for status in node.statuses if status.state == RUNNING]
    assert running[0].working_dir == str(submit_dir)


async def test_a_submit_dir_this_node_lacks_gives_way_to_the_jobs_own_directory(tmp_path):
    node = Node(tmp_path / "agent")
    end = await node.run(["/bin/sh", "-c", "pwd"], submit_dir=str(tmp_path / "only-on-the-laptop"))
    assert (end.state, end.exit_code) == (EXITED, 0), end
    default_dir = str(tmp_path / "agent" / "jobs" / "j-1" / "work")
    assert node.log().strip() == default_dir
    assert [status.working_dir for status in node.statuses if status.state == RUNNING] == [default_dir]


async def test_working_dir_wins_over_submit_dir(tmp_path):
    node = Node(tmp_path / "agent")
    end = await node.run(["/bin/sh", "-c", "pwd"], working_dir=str(tmp_path), submit_dir="/")
    assert (end.state, node.log().strip()) == (EXITED, str(tmp_path))


@pytest.fixture
def traversable_root():
    root = Path(tempfile.mkdtemp(prefix="gpuorch-hardening-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@needs_root
async def test_whether_a_root_only_path_exists_does_not_leak_through_working_dir(traversable_root):
    """The check happens as the owner: an existing and a missing directory behind root's 0700 look the same."""
    private = traversable_root / "roots-only"
    (private / "exists").mkdir(parents=True)
    private.chmod(0o700)
    answers = []
    for name in ("exists", "absent"):
        node = Node(traversable_root / f"agent-{name}", IdentityPolicy())
        end = await node.run(["/bin/true"], owner="nobody", working_dir=str(private / name))
        answers.append((end.state, end.message.replace(name, "NAME")))
    assert (
        answers[0]
        == answers[1]
        == (FAILED_TO_START, f"cannot enter working directory {str(private / 'NAME')!r}: Permission denied")
    )


@needs_root
async def test_a_submit_dir_the_owner_may_not_enter_gives_way_to_the_jobs_own_directory(traversable_root):
    private = traversable_root / "roots-only"
    private.mkdir(mode=0o700)
    node = Node(traversable_root / "agent", IdentityPolicy())
    end = await node.run(["/bin/sh", "-c", "pwd"], owner="nobody", submit_dir=str(private))
    assert (end.state, end.exit_code) == (EXITED, 0), end
    assert node.log().strip() == str(traversable_root / "agent" / "jobs" / "j-1" / "work")


# ---- the rank's log -----------------------------------------------------------------------------

CHATTY_RANK = """
import sys, time
sys.stdout.write("first " * 2000 + "\\n")  # 12 kB, past the 4 kB cap
sys.stdout.flush()
time.sleep(1.5)  # the shim checks the size every 0.5 s
print("after the rotation", flush=True)
"""


async def test_a_rank_log_past_max_log_bytes_is_rotated_keeping_one_old_file(tmp_path):
    node = Node(tmp_path / "agent", max_log_bytes=4096)
    end = await node.run([sys.executable, "-c", CHATTY_RANK])
    assert (end.state, end.exit_code) == (EXITED, 0), end
    attempt_dir = tmp_path / "agent" / "jobs" / "j-1" / "attempt-1"
    rotated = (attempt_dir / "rank-0.log.1").read_text()
    assert rotated.startswith("first first") and len(rotated) > 12000
    assert stat.S_IMODE((attempt_dir / "rank-0.log.1").stat().st_mode) == 0o600, "the rotated log is as private as the log"
    assert node.log() == "after the rotation\n"
    chunk = node.supervisor.read_log(agent_pb2.ReadLogs(job_id="j-1", attempt=1, rank=0, offset=0))
    assert (chunk.data, chunk.error) == (b"after the rotation\n", "")


async def test_a_log_under_the_cap_is_left_alone(tmp_path):
    node = Node(tmp_path / "agent", max_log_bytes=1 << 20)
    end = await node.run([sys.executable, "-c", CHATTY_RANK])
    assert end.state == EXITED
    assert node.log().startswith("first") and node.log().endswith("after the rotation\n")
    assert not (tmp_path / "agent" / "jobs" / "j-1" / "attempt-1" / "rank-0.log.1").exists()
