"""Jobs run as their owner: the pure identity decision, the agent's settings, and (as root) real
ranks started with the owner's uid, gid and groups through a real agent."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.identity import AS_AGENT, Account, IdentityPolicy, RankIdentity, decide_rank_identity, lookup_account
from agent.settings import AgentSettings
from gpuorch.settings import load_settings
from gpuorch.v1 import job_pb2
from tests.harness import LocalCluster, wait_for

ALICE = Account("alice", 1001, 1001, "/home/alice", (1001, 27, 44), ("alice", "sudo", "video"))
BOB = Account("bob", 1002, 1002, "/home/bob", (1002,), ("bob",))
TOOR = Account("toor", 0, 0, "/root", (0,), ("root",))
ACCOUNTS = {account.name: account for account in (ALICE, BOB, TOOR, Account("root", 0, 0, "/root", (0,), ("root",)))}


def decide(owner: str, agent_uid: int = 0, **policy) -> RankIdentity | str:
    return decide_rank_identity(owner, IdentityPolicy(**policy), agent_uid=agent_uid, lookup=ACCOUNTS.get)


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


def test_an_allowed_users_entry_that_names_nothing_is_refused():
    with pytest.raises(ValueError, match="allowed_users: '@' names no user or group"):
        AgentSettings(allowed_users=["alice", "@"]).validate()


# ---- real ranks through a real agent (needs root, and the `nobody` account) --------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the agent to run as root")

PROBE = r"""
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME user=$USER logname=$LOGNAME"
touch "$GPUORCH_PROGRESS_FILE" && echo progress=ok
touch made-by-rank && echo workdir=ok
( : > "${GPUORCH_PROGRESS_FILE%.progress}.exit" ) 2>/dev/null && echo records=WRITABLE || echo records=protected
( : > "$(dirname "$GPUORCH_PROGRESS_FILE")/planted" ) 2>/dev/null && echo attempt_dir=WRITABLE || echo attempt_dir=protected
"""


@pytest.fixture
def cluster():
    """A cluster under a directory every user may traverse (pytest's own temp dirs are root's alone):
    ranks that run as another user must reach their working directory."""
    root = Path(tempfile.mkdtemp(prefix="gpuorch-owner-"))
    os.chmod(root, 0o755)
    local = LocalCluster(root / "cluster")
    os.chmod(root / "cluster", 0o755)
    yield local
    local.stop()
    shutil.rmtree(root, ignore_errors=True)


def submit(cluster: LocalCluster, owner: str, argv: list[str]) -> str:
    return cluster.client().submit_job(argv=argv, gpus=1, owner=owner, max_restarts=0)


def wait_final(cluster: LocalCluster, job_id: str) -> job_pb2.Job:
    final = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED)
    return wait_for(lambda: (job := cluster.client().get_job(job_id)).state in final and job, timeout=30, what=f"{job_id} to end")


def rank_log(cluster: LocalCluster, job_id: str) -> str:
    return b"".join(cluster.client().job_logs(job_id, 0)).decode()


@needs_root
def test_a_root_agent_starts_ranks_as_their_owner_and_keeps_its_records_out_of_their_reach(cluster):
    nobody = pwd.getpwnam("nobody")
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    job_id = submit(cluster, "nobody", ["/bin/sh", "-c", PROBE])
    job = wait_final(cluster, job_id)
    output = rank_log(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, (job.reason, output)
    groups = " ".join(map(str, os.getgrouplist("nobody", nobody.pw_gid)))
    assert f"uid={nobody.pw_uid} gid={nobody.pw_gid} groups={groups} home={nobody.pw_dir} user=nobody logname=nobody" in output
    assert "progress=ok" in output and "workdir=ok" in output, output
    assert "records=protected" in output and "attempt_dir=protected" in output, output
    made = next((cluster.root / "agent-n1" / "jobs" / job_id).glob("work/made-by-rank"))
    assert made.stat().st_uid == nobody.pw_uid
    work_dir, log = made.parent.stat(), next((cluster.root / "agent-n1" / "jobs" / job_id).glob("attempt-1/rank-0.log")).stat()
    assert (work_dir.st_uid, stat.S_IMODE(work_dir.st_mode)) == (nobody.pw_uid, 0o700), "other users of the node cannot look in"
    assert (log.st_uid, stat.S_IMODE(log.st_mode)) == (nobody.pw_uid, 0o600), "the owner, and only the owner, reads the log on the node"


@needs_root
def test_argv_reaches_the_rank_literally_with_no_shell_in_between(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    tricky = ["$HOME", "`id`", "a; echo injected", "*", "'quoted'"]
    job_id = submit(cluster, "nobody", ["/bin/echo", *tricky])
    assert wait_final(cluster, job_id).state == job_pb2.JOB_STATE_SUCCEEDED
    assert rank_log(cluster, job_id) == " ".join(tricky) + "\n"


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
def test_a_root_agent_refuses_with_the_reason_on_the_job(cluster, owner, why):
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, "--allowed-users", "daemon,@daemon", allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    marker = cluster.root / "ran"
    job_id = submit(cluster, owner, ["/usr/bin/touch", str(marker)])
    job = wait_final(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert "rank 0 on node n1 failed to start" in job.reason and why in job.reason, job.reason
    assert not marker.exists(), "nothing was started"


@needs_root
def test_an_allowed_user_runs_where_others_are_refused(cluster):
    daemon = pwd.getpwnam("daemon")
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, "--allowed-users", "@daemon", allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    job_id = submit(cluster, "daemon", ["/usr/bin/id", "-u"])
    job = wait_final(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job.reason
    assert rank_log(cluster, job_id).strip() == str(daemon.pw_uid)


@needs_root
def test_a_working_dir_the_owner_may_not_enter_fails_the_start_with_the_owners_permission_error(cluster):
    private = cluster.root / "roots-only"
    private.mkdir(mode=0o700)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    job_id = cluster.client().submit_job(argv=["/bin/true"], gpus=1, owner="nobody", max_restarts=0, working_dir=str(private))
    job = wait_final(cluster, job_id)
    assert job.state == job_pb2.JOB_STATE_FAILED
    assert f"cannot enter working directory {str(private)!r}: Permission denied" in job.reason, job.reason


@needs_root
def test_the_jobs_environment_reaches_only_the_rank_never_the_shim_that_runs_as_root(cluster):
    """A job's LD_PRELOAD (or any loader variable) in the environment of the root shim would run the owner's code as root."""
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    env = {"GPUORCH_TEST_SECRET": "s3cret", "LD_LIBRARY_PATH": "/nonexistent/owner-libs"}
    probe = 'echo "shim=$PPID secret=$GPUORCH_TEST_SECRET ld=$LD_LIBRARY_PATH"; sleep 30'
    job_id = cluster.client().submit_job(argv=["/bin/sh", "-c", probe], gpus=1, owner="nobody", max_restarts=0, env=env)
    line = wait_for(lambda: next((line for line in rank_log(cluster, job_id).splitlines() if line.startswith("shim=")), None), timeout=30, what="the rank's line")
    shim_pid = int(line.split()[0].removeprefix("shim="))
    assert "secret=s3cret ld=/nonexistent/owner-libs" in line, "the rank gets the job's environment"
    shim_env = Path(f"/proc/{shim_pid}/environ").read_bytes()
    assert Path(f"/proc/{shim_pid}/status").read_text().count("Uid:\t0\t") == 1, "the shim is the root process"
    assert b"GPUORCH_TEST_SECRET" not in shim_env and b"/nonexistent/owner-libs" not in shim_env, shim_env
    cluster.client().cancel_job(job_id)


@needs_root
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the preloaded library")
def test_a_jobs_ld_preload_runs_only_as_the_owner(cluster):
    """The attack itself: a library a user preloads records every uid it was loaded into."""
    witness_dir = cluster.root / "witness"
    witness_dir.mkdir(parents=True)
    os.chmod(witness_dir, 0o777)
    source = cluster.root / "witness.c"
    source.write_text(
        '#include <stdio.h>\n#include <unistd.h>\n'
        f'__attribute__((constructor)) static void witness(void) {{ FILE *f = fopen("{witness_dir}/uids", "a");'
        ' if (f) { fprintf(f, "%d\\n", (int)getuid()); fclose(f); } }\n'
    )
    library = cluster.root / "witness.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    os.chmod(cluster.root, 0o755)
    cluster.start_coordinator()
    cluster.add_agent("n1", 1, allow_root_ranks=False)
    cluster.wait_for_nodes(1)
    job_id = cluster.client().submit_job(argv=["/bin/true"], gpus=1, owner="nobody", max_restarts=0, env={"LD_PRELOAD": str(library)})
    assert wait_final(cluster, job_id).state == job_pb2.JOB_STATE_SUCCEEDED
    loaded_as = set((witness_dir / "uids").read_text().split())
    assert loaded_as == {str(pwd.getpwnam("nobody").pw_uid)}, f"the preloaded library ran as uids {loaded_as}"
