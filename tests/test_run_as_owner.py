"""Jobs run as their owner: the pure identity decision, the agent's settings, and (as root) real
ranks started with the owner's uid, gid and groups through the real supervisor and shim, when the
coordinator vouches for owners, and refused through a real agent when it does not."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.identity import (
    AS_AGENT,
    UNAUTHENTICATED_OWNERS,
    Account,
    IdentityPolicy,
    RankIdentity,
    decide_rank_identity,
    lookup_account,
)
from agent.ranks.supervisor import Supervisor
from agent.settings import AgentSettings
from gpuorch.settings import load_settings
from gpuorch.v1 import agent_pb2, job_pb2
from tests.harness import LocalCluster, wait_for

ALICE = Account("alice", 1001, 1001, "/home/alice", (1001, 27, 44), ("alice", "sudo", "video"))
BOB = Account("bob", 1002, 1002, "/home/bob", (1002,), ("bob",))
TOOR = Account("toor", 0, 0, "/root", (0,), ("root",))
ACCOUNTS = {account.name: account for account in (ALICE, BOB, TOOR, Account("root", 0, 0, "/root", (0,), ("root",)))}


def decide(owner: str, agent_uid: int = 0, authenticated: bool = True, **policy) -> RankIdentity | str:
    return decide_rank_identity(
        owner, IdentityPolicy(**policy), agent_uid=agent_uid, lookup=ACCOUNTS.get, owners_authenticated=authenticated
    )


# ---- the decision -------------------------------------------------------------------------------


def test_a_root_agent_runs_ranks_as_the_owner_with_uid_gid_groups_and_home():
    assert decide("alice") == RankIdentity(
        switch=True,
        uid=1001,
        gid=1001,
        groups=(1001, 27, 44),
        env=(("HOME", "/home/alice"), ("USER", "alice"), ("LOGNAME", "alice")),
    )


@pytest.mark.parametrize("owner", ["root", "toor"])
def test_a_root_agent_refuses_root_under_any_name_unless_allowed(owner):
    refusal = decide(owner)
    assert isinstance(refusal, str) and f"owner {owner!r} is root (uid 0)" in refusal and "allow_root_ranks" in refusal
    assert decide(owner, allow_root_ranks=True) == AS_AGENT


def test_a_root_agent_refuses_a_job_without_owner_unless_root_ranks_are_allowed():
    refusal = decide("")
    assert isinstance(refusal, str) and "no owner" in refusal and "allow_root_ranks is off" in refusal
    assert decide("", allow_root_ranks=True) == AS_AGENT
    assert "allowed_users" in decide("", allow_root_ranks=True, allowed_users=("alice",))


def test_an_owner_without_an_account_on_the_node_is_refused():
    assert decide("mallory") == "owner 'mallory' has no account on this node"


def test_allowed_users_match_names_and_groups():
    assert decide("alice", allowed_users=("alice",)).uid == 1001
    assert decide("alice", allowed_users=("@video",)).uid == 1001
    assert decide("bob", allowed_users=("alice", "@video")) == "owner 'bob' is not in this node's allowed_users"
    assert decide("root", allow_root_ranks=True, allowed_users=("alice",)) == "owner 'root' is not in this node's allowed_users"


def test_an_agent_that_is_not_root_runs_ranks_as_itself_and_still_applies_allowed_users():
    assert decide("alice", agent_uid=1002) == AS_AGENT
    assert decide("", agent_uid=1002) == AS_AGENT
    assert decide("mallory", agent_uid=1002) == AS_AGENT
    assert decide("alice", agent_uid=1002, allowed_users=("@sudo",)) == AS_AGENT
    assert decide("bob", agent_uid=1002, allowed_users=("@sudo",)) == "owner 'bob' is not in this node's allowed_users"
    assert decide("mallory", agent_uid=1002, allowed_users=("alice",)) == "owner 'mallory' is not in this node's allowed_users"


@pytest.mark.parametrize(
    ("owner", "policy"), [("alice", {}), ("root", {"allow_root_ranks": True}), ("", {"allow_root_ranks": True})]
)
def test_a_root_agent_refuses_owners_no_one_authenticated(owner, policy):
    """With tokens off the owner is whatever the submitter typed: a root agent must not switch to it, nor to root."""
    refusal = decide(owner, authenticated=False, **policy)
    assert refusal == UNAUTHENTICATED_OWNERS
    assert "Turn tokens on at the coordinator" in refusal and "--single-user" in refusal
    assert decide(owner, authenticated=True, **policy) != UNAUTHENTICATED_OWNERS


@pytest.mark.parametrize("agent_uid", [0, 1002])
def test_a_single_user_node_runs_every_rank_as_the_agent_whatever_the_owner(agent_uid):
    for owner in ("alice", "root", "", "mallory"):
        assert decide(owner, agent_uid=agent_uid, authenticated=False, single_user=True) == AS_AGENT
        assert decide(owner, agent_uid=agent_uid, authenticated=True, single_user=True) == AS_AGENT
    assert decide("bob", agent_uid=agent_uid, single_user=True, allowed_users=("alice",)) == (
        "owner 'bob' is not in this node's allowed_users"
    )


def test_an_agent_that_is_not_root_needs_no_authenticated_owners():
    assert decide("alice", agent_uid=1002, authenticated=False) == AS_AGENT


def test_lookup_reads_the_nodes_accounts():
    root = lookup_account("root")
    assert root is not None and root.uid == 0 and 0 in root.groups and "root" in root.group_names
    assert lookup_account("no-such-user-gpuorch") is None
    assert lookup_account("bad\0name") is None


# ---- settings -----------------------------------------------------------------------------------


def test_allowed_users_and_allow_root_ranks_come_from_toml_env_and_flags(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('allowed_users = ["alice", "@ml"]\nallow_root_ranks = true\n')
    settings = load_settings(AgentSettings, config_file=config, env={})
    assert settings.allowed_users == ["alice", "@ml"] and settings.allow_root_ranks is True
    from_env = load_settings(AgentSettings, env={"GPUORCH_ALLOWED_USERS": "bob, @ops"})
    assert from_env.allowed_users == ["bob", "@ops"] and from_env.allow_root_ranks is False
    from_flag = load_settings(AgentSettings, env={}, overrides={"allowed_users": "carol"})
    assert from_flag.allowed_users == ["carol"]


def test_single_user_comes_from_toml_env_and_flags(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("single_user = true\n")
    assert load_settings(AgentSettings, config_file=config, env={}).single_user is True
    assert load_settings(AgentSettings, env={"GPUORCH_SINGLE_USER": "true"}).single_user is True
    assert load_settings(AgentSettings, env={}, overrides={"single_user": True}).single_user is True
    assert load_settings(AgentSettings, env={}).single_user is False


def test_an_allowed_users_entry_that_names_nothing_is_refused():
    with pytest.raises(ValueError, match="allowed_users: '@' names no user or group"):
        AgentSettings(allowed_users=["alice", "@"]).validate()


# ---- the agent learns it from the coordinator ---------------------------------------------------


@pytest.mark.parametrize("vouches", [True, False])
async def test_the_agent_takes_owners_authenticated_from_the_register_ack(tmp_path, vouches):
    import grpc

    from agent.coordinator_link import CoordinatorLink
    from agent.telemetry import open_source
    from gpuorch.v1 import agent_pb2_grpc

    class Coordinator(agent_pb2_grpc.AgentServiceServicer):
        async def Connect(self, request_iterator, context):
            async for message in request_iterator:
                if message.WhichOneof("payload") == "register":
                    ack = agent_pb2.RegisterAck(heartbeat_interval_seconds=1, owners_authenticated=vouches)
                    yield agent_pb2.CoordinatorMessage(register_ack=ack)

    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(Coordinator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    source = open_source(simulate_gpus=1, node_id="n1", faults_file=str(tmp_path / "faults.json"))
    agent = CoordinatorLink(coordinator=f"127.0.0.1:{port}", node_id="n1", source=source)
    agent.owners_authenticated = not vouches  # what it believed before this coordinator told it
    stopping = asyncio.Event()
    running = asyncio.create_task(agent.run(stopping))
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert agent.owners_authenticated is vouches
    finally:
        stopping.set()
        await running
        await server.stop(0)
        source.close()


# ---- real ranks through the real supervisor and shim (needs root, and the `nobody` account) ------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the agent to run as root")

EXITED = agent_pb2.TASK_STATE_EXITED
FAILED_TO_START = agent_pb2.TASK_STATE_FAILED_TO_START

PROBE = r"""
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME user=$USER logname=$LOGNAME"
touch "$GPUORCH_PROGRESS_FILE" && echo progress=ok
touch made-by-rank && echo workdir=ok
( : > "${GPUORCH_PROGRESS_FILE%.progress}.exit" ) 2>/dev/null && echo records=WRITABLE || echo records=protected
( : > "$(dirname "$GPUORCH_PROGRESS_FILE")/planted" ) 2>/dev/null && echo attempt_dir=WRITABLE || echo attempt_dir=protected
"""


@pytest.fixture
def node_root():
    """A directory every user may traverse (pytest's own temp dirs are root's alone): ranks that run
    as another user must reach their working directory under the agent's state dir."""
    root = Path(tempfile.mkdtemp(prefix="gpuorch-owner-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Node:
    """A root agent's supervisor on `state_dir`, told that the coordinator authenticates owners (or not)."""

    def __init__(self, state_dir: Path, policy: IdentityPolicy | None = None, *, authenticated: bool = True) -> None:
        self.statuses: list[agent_pb2.TaskStatus] = []
        self.state_dir = state_dir
        self.supervisor = Supervisor(
            state_dir,
            self.statuses.append,
            identity_policy=policy or IdentityPolicy(),
            owners_authenticated=lambda: authenticated,
        )

    async def launch(self, owner: str, argv: list[str], **fields) -> None:
        await self.supervisor.recover()
        rank = agent_pb2.RankLaunch(rank=0)
        await self.supervisor.launch(
            agent_pb2.LaunchTask(job_id="j-1", attempt=1, argv=argv, owner=owner, ranks=[rank], **fields)
        )

    async def end(self, timeout: float = 30) -> agent_pb2.TaskStatus:
        deadline = time.monotonic() + timeout
        while not (ended := [s for s in self.statuses if s.state in (EXITED, FAILED_TO_START)]):
            assert time.monotonic() < deadline, f"the rank did not end within {timeout}s: {self.statuses}"
            await asyncio.sleep(0.02)
        return ended[0]

    def log(self) -> str:
        path = self.state_dir / "jobs" / "j-1" / "attempt-1" / "rank-0.log"
        return path.read_text() if path.exists() else ""

    async def run(self, owner: str, argv: list[str], **fields) -> agent_pb2.TaskStatus:
        try:
            await self.launch(owner, argv, **fields)
            return await self.end()
        finally:
            await self.supervisor.close()


@needs_root
async def test_with_owners_authenticated_a_root_agent_starts_ranks_as_their_owner_and_keeps_its_records_out_of_their_reach(
    node_root,
):
    nobody = pwd.getpwnam("nobody")
    node = Node(node_root / "agent")
    end = await node.run("nobody", ["/bin/sh", "-c", PROBE])
    output = node.log()
    assert (end.state, end.exit_code) == (EXITED, 0), (end, output)
    groups = " ".join(map(str, os.getgrouplist("nobody", nobody.pw_gid)))
    assert f"uid={nobody.pw_uid} gid={nobody.pw_gid} groups={groups} home={nobody.pw_dir} user=nobody logname=nobody" in output
    assert "progress=ok" in output and "workdir=ok" in output, output
    assert "records=protected" in output and "attempt_dir=protected" in output, output
    made = node_root / "agent" / "jobs" / "j-1" / "work" / "made-by-rank"
    assert made.stat().st_uid == nobody.pw_uid
    work_dir, log = made.parent.stat(), (node_root / "agent" / "jobs" / "j-1" / "attempt-1" / "rank-0.log").stat()
    assert (work_dir.st_uid, stat.S_IMODE(work_dir.st_mode)) == (nobody.pw_uid, 0o700), "other users of the node cannot look in"
    assert (log.st_uid, stat.S_IMODE(log.st_mode)) == (nobody.pw_uid, 0o600), (
        "the owner, and only the owner, reads the log on the node"
    )


@needs_root
async def test_argv_reaches_the_rank_literally_with_no_shell_in_between(node_root):
    node = Node(node_root / "agent")
    tricky = ["$HOME", "`id`", "a; echo injected", "*", "'quoted'"]
    assert (await node.run("nobody", ["/bin/echo", *tricky])).state == EXITED
    assert node.log() == " ".join(tricky) + "\n"


@needs_root
@pytest.mark.parametrize(
    ("owner", "why"),
    [
        ("root", "owner 'root' is root (uid 0), and this node does not run ranks as root (allow_root_ranks is off)"),
        ("", "the job has no owner, and this node's agent runs as root"),
        ("no-such-user-gpuorch", "owner 'no-such-user-gpuorch' has no account on this node"),
        ("nobody", "owner 'nobody' is not in this node's allowed_users"),
    ],
)
async def test_a_root_agent_refuses_with_the_reason(node_root, owner, why):
    node = Node(node_root / "agent", IdentityPolicy(allowed_users=("daemon", "@daemon")))
    marker = node_root / "ran"
    end = await node.run(owner, ["/usr/bin/touch", str(marker)])
    assert end.state == FAILED_TO_START and why in end.message, end
    assert not marker.exists(), "nothing was started"


@needs_root
async def test_an_allowed_user_runs_where_others_are_refused(node_root):
    daemon = pwd.getpwnam("daemon")
    node = Node(node_root / "agent", IdentityPolicy(allowed_users=("@daemon",)))
    end = await node.run("daemon", ["/usr/bin/id", "-u"])
    assert (end.state, end.exit_code) == (EXITED, 0), end
    assert node.log().strip() == str(daemon.pw_uid)


@needs_root
async def test_a_working_dir_the_owner_may_not_enter_fails_the_start_with_the_owners_permission_error(node_root):
    private = node_root / "roots-only"
    private.mkdir(mode=0o700)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    end = await Node(node_root / "agent").run("nobody", ["/bin/true"], working_dir=str(private))
    assert end.state == FAILED_TO_START
    assert end.message == f"cannot enter working directory {str(private)!r}: Permission denied", end


@needs_root
async def test_the_jobs_environment_reaches_only_the_rank_never_the_shim_that_runs_as_root(node_root):
    """A job's LD_PRELOAD (or any loader variable) in the environment of the root shim would run the owner's code as root."""
    node = Node(node_root / "agent")
    env = {"GPUORCH_TEST_SECRET": "s3cret", "LD_LIBRARY_PATH": "/nonexistent/owner-libs"}
    probe = 'echo "shim=$PPID secret=$GPUORCH_TEST_SECRET ld=$LD_LIBRARY_PATH"; sleep 30'
    try:
        await node.launch("nobody", ["/bin/sh", "-c", probe], env=env)
        deadline = time.monotonic() + 30
        while not (line := next((line for line in node.log().splitlines() if line.startswith("shim=")), None)):
            assert time.monotonic() < deadline, "the rank printed nothing"
            await asyncio.sleep(0.02)
        shim_pid = int(line.split()[0].removeprefix("shim="))
        assert "secret=s3cret ld=/nonexistent/owner-libs" in line, "the rank gets the job's environment"
        shim_env = Path(f"/proc/{shim_pid}/environ").read_bytes()
        assert Path(f"/proc/{shim_pid}/status").read_text().count("Uid:\t0\t") == 1, "the shim is the root process"
        assert b"GPUORCH_TEST_SECRET" not in shim_env and b"/nonexistent/owner-libs" not in shim_env, shim_env
    finally:
        await node.supervisor.stop(agent_pb2.StopTask(job_id="j-1", grace_seconds=0))
        await node.supervisor.close()


@needs_root
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the preloaded library")
async def test_a_jobs_ld_preload_runs_only_as_the_owner(node_root):
    """The attack itself: a library a user preloads records every uid it was loaded into."""
    witness_dir = node_root / "witness"
    witness_dir.mkdir(parents=True)
    os.chmod(witness_dir, 0o777)
    source = node_root / "witness.c"
    source.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n"
        f'__attribute__((constructor)) static void witness(void) {{ FILE *f = fopen("{witness_dir}/uids", "a");'
        ' if (f) { fprintf(f, "%d\\n", (int)getuid()); fclose(f); } }\n'
    )
    library = node_root / "witness.so"
    await asyncio.to_thread(subprocess.run, ["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    end = await Node(node_root / "agent").run("nobody", ["/bin/true"], env={"LD_PRELOAD": str(library)})
    assert (end.state, end.exit_code) == (EXITED, 0), end
    loaded_as = set((witness_dir / "uids").read_text().split())
    assert loaded_as == {str(pwd.getpwnam("nobody").pw_uid)}, f"the preloaded library ran as uids {loaded_as}"


# ---- through a real coordinator and agent -------------------------------------------------------


@pytest.fixture
def cluster(node_root):
    local = LocalCluster(node_root / "cluster")
    os.chmod(node_root / "cluster", 0o755)
    yield local
    local.stop()


def wait_final(cluster: LocalCluster, job_id: str) -> job_pb2.Job:
    final = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED)
    return wait_for(lambda: (job := cluster.client().get_job(job_id)).state in final and job, timeout=30, what=f"{job_id} to end")


@needs_root
@pytest.mark.parametrize(("owner", "flags"), [("nobody", ()), ("root", ("--allow-root-ranks",)), ("", ("--allow-root-ranks",))])
def test_with_tokens_off_a_root_agent_refuses_to_let_the_owner_field_choose_the_user(cluster, owner, flags):
    """Owner spoofing: without tokens anyone may write any owner; a root agent must not become it (nor root)."""
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, *flags, single_user=False)
    cluster.wait_for_nodes(1)
    marker = cluster.root / "ran"
    job_id = cluster.client().submit_job(argv=["/usr/bin/touch", str(marker)], gpus=1, owner=owner, max_restarts=0)
    job = wait_final(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert "rank 0 on node n1 failed to start" in job.reason and "does not authenticate job owners" in job.reason, job.reason
    assert "--single-user" in job.reason, "the reason says what to do"
    assert not marker.exists(), "nothing was started"


@needs_root
def test_a_single_user_node_runs_ranks_as_the_agents_user_whatever_owner_the_job_names(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, single_user=True)
    cluster.wait_for_nodes(1)
    job_id = cluster.client().submit_job(argv=["/usr/bin/id", "-u"], gpus=1, owner="nobody", max_restarts=0)
    job = wait_final(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.reason
    assert b"".join(cluster.client().job_logs(job_id, 0)).decode().strip() == str(os.geteuid())
