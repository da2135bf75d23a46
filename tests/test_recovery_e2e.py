"""Failure recovery with real processes on loopback: ranks, agents, GPUs and the coordinator fail."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import gpuorch
from gpuorch.errors import GpuorchError
from gpuorch.v1 import job_pb2
from tests.harness import REPO, wait_for
from tests.test_jobs_e2e import RANK, _alive, _rank_pids, logs, wait_state

TRAINER = str(REPO / "tests" / "workloads" / "trainer.py")
PENDING, RUNNING = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED
FINAL = (SUCCEEDED, FAILED, CANCELLED)


def start(cluster, nodes=("n1", "n2"), gpus=2, *coordinator_args):
    cluster.start_coordinator(
        "--stop-grace-period", "1", "--node-grace-period", "1.5", "--restart-backoff-base", "0.2", *coordinator_args
    )
    for node_id in nodes:
        cluster.add_agent(node_id, gpus, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(len(nodes))
    return cluster.client()


def trainer(*args: str) -> list[str]:
    return [sys.executable, TRAINER, *args]


def starts(client, job_id, rank=0) -> list[str]:
    return [line for line in logs(client, job_id, rank).splitlines() if line.startswith("START")]


def kill_node(cluster, node_id) -> None:
    """The node dies: its agent and every rank on it."""
    agent_dir = cluster.root / f"agent-{node_id}"
    cluster.agents[node_id].kill()
    for pid_file in agent_dir.glob("jobs/*/attempt-*/rank-*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def no_gpu_held_twice(cluster) -> None:
    """No two live rank processes use the same GPU: read each live rank's own environment."""
    seen: dict[str, str] = {}
    for pid_file in cluster.root.glob("agent-*/jobs/*/attempt-*/rank-*.pid"):
        try:
            environ = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{int(pid_file.read_text())}/environ").read_text().split("\0")
                if "=" in item
            )
        except (OSError, ValueError):
            continue  # ended
        if "GPUORCH_JOB_ID" not in environ:
            continue
        gpu = environ["CUDA_VISIBLE_DEVICES"].split(",")[int(environ["LOCAL_RANK"])]
        owner = f"{environ['GPUORCH_JOB_ID']} attempt {environ['GPUORCH_ATTEMPT']} rank {environ['RANK']}"
        assert gpu not in seen, f"GPU {gpu} used by {seen[gpu]} and {owner}"
        seen[gpu] = owner


def test_killed_rank_restarts_the_gang_which_resumes_from_its_checkpoint(cluster):
    client = start(cluster)
    job_id = client.submit_job(argv=trainer("--steps", "8", "--step-seconds", "0.15"), gpus=4, max_restarts=2)
    wait_for(
        lambda: (
            (p := _rank_pids(cluster, job_id))
            and len(p) == 4
            and b"step"
            and (cluster.root / "coordinator" / "checkpoints" / job_id / "step").exists()
        ),
        what="a checkpoint",
    )
    pids = _rank_pids(cluster, job_id)
    os.kill(pids[2], signal.SIGKILL)
    job = wait_state(client, job_id, SUCCEEDED)
    assert job.attempt == 2 and job.restarts == 1
    assert job.attempts[0].end_reason.startswith("rank 2 on node") and "signal 9" in job.attempts[0].end_reason
    assert job.attempts[1].restart_reason == "rank_exit:2:137"
    assert job.attempts[0].placement.master_port != job.attempts[1].placement.master_port or True
    second = starts(client, job_id)[-1]
    assert "attempt=2 reason=rank_exit:2:137" in second
    assert "resumed_from=0" not in second, f"the new attempt resumes from the checkpoint: {second}"
    assert not any(_alive(pid) for pid in pids.values()), "every rank of the first attempt was stopped"


def test_past_the_budget_the_job_fails_with_its_history(cluster):
    client = start(cluster)
    job_id = client.submit_job(argv=[sys.executable, RANK, "--exit-code-for-rank", "1:5"], gpus=2, max_restarts=1)
    job = wait_state(client, job_id, FAILED)
    assert job.attempt == 2 and job.restarts == 1
    assert "no restarts left of 1" in job.reason and "attempt 1: rank 1" in job.reason and "attempt 2: rank 1" in job.reason


def test_cancel_during_backoff(cluster):
    client = start(cluster, ("n1",), 2, "--restart-backoff-base", "30")
    job_id = client.submit_job(argv=[sys.executable, RANK, "--exit-code-for-rank", "0:1"], gpus=1, max_restarts=5)
    wait_for(lambda: client.get_job(job_id).restarts == 1, what="first restart")  # immediate
    job = wait_for(lambda: (j := client.get_job(job_id)).restarts == 2 and j, timeout=20, what="waiting out the backoff")
    assert job.state == PENDING and job.HasField("restart_not_before") and "restart 2 of 5" in job.reason
    assert client.cancel_job(job_id).state == CANCELLED
    time.sleep(1)
    assert client.get_job(job_id).attempt == 2, "no attempt after the cancel"


def test_killed_agent_leaves_its_ranks_running_and_comes_back(cluster):
    client = start(cluster)
    release = cluster.root / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=4, max_restarts=2)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: len(_rank_pids(cluster, job_id)) == 4, what="rank pids")
    pids = _rank_pids(cluster, job_id)
    cluster.agents["n1"].kill()
    wait_for(lambda: client.get_node("n1").state == 2, timeout=2, what="n1 SUSPECT")
    time.sleep(0.3)
    assert all(_alive(pid) for pid in pids.values()), "ranks outlive their agent"
    cluster.add_agent("n1", 2, "--heartbeat-interval", "0.25")
    cluster.wait_node_state("n1", 1)
    release.touch()
    job = wait_state(client, job_id, SUCCEEDED)
    assert job.attempt == 1 and job.restarts == 0, "the job never noticed"


def test_agent_learns_exit_codes_of_ranks_that_ended_while_it_was_down(cluster):
    client = start(cluster, ("n1",), 2, "--node-grace-period", "30")
    release = cluster.root / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release), "--exit-code-for-rank", "1:6"], gpus=2)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: len(_rank_pids(cluster, job_id)) == 2, what="rank pids")
    cluster.agents["n1"].kill()
    release.touch()
    time.sleep(1.0)  # both ranks end with no agent watching
    cluster.add_agent("n1", 2)
    job = wait_state(client, job_id, FAILED)
    assert "rank 1 on node n1 exited with code 6" in job.reason


def test_lost_node_restarts_the_job_elsewhere_and_it_resumes(cluster):
    client = start(cluster, ("n1", "n2", "n3"))
    job_id = client.submit_job(argv=trainer("--steps", "12", "--step-seconds", "0.2"), gpus=2, max_restarts=2)
    job = wait_state(client, job_id, RUNNING)
    node_id = job.placement.nodes[0].node_id
    checkpoint = cluster.root / "coordinator" / "checkpoints" / job_id / "step"
    wait_for(lambda: checkpoint.exists() and int(checkpoint.read_text()) >= 2, what="progress")
    kill_node(cluster, node_id)
    job = wait_for(lambda: (j := client.get_job(job_id)).attempt == 2 and j, timeout=10, what="a second attempt")
    assert job.attempts[1].restart_reason == f"node_down:{node_id}"
    assert node_id not in [n.node_id for n in job.placement.nodes]
    job = wait_state(client, job_id, SUCCEEDED, timeout=60)
    resumed = [line for line in logs(client, job_id, 0).splitlines() if line.startswith("START")][-1]
    assert "attempt=2" in resumed and "resumed_from=0" not in resumed


def test_xid_on_a_gpu_restarts_the_job_on_other_gpus(cluster):
    client = start(cluster, ("n1", "n2"), 2)
    release = cluster.root / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2, max_restarts=1)
    job = wait_state(client, job_id, RUNNING)
    placed = job.placement.nodes[0]
    bad_uuid, bad_index = placed.device_uuids[1], placed.device_indexes[1]
    cluster.faults_file(placed.node_id).write_text(json.dumps({str(bad_index): {"xid": 79}}))
    job = wait_for(lambda: (j := client.get_job(job_id)).attempt == 2 and j, timeout=10, what="a second attempt")
    assert job.attempts[1].restart_reason == f"gpu_unhealthy:{bad_uuid}"
    assert "xid 79" in job.attempts[0].end_reason
    assert bad_uuid not in [u for n in job.placement.nodes for u in n.device_uuids]
    bad = next(d for d in client.get_node(placed.node_id).devices if d.uuid == bad_uuid)
    assert not bad.healthy and "xid 79" in bad.unhealthy_reason
    release.touch()
    wait_state(client, job_id, SUCCEEDED)


def test_elastic_job_shrinks_then_grows_back(cluster):
    client = start(cluster, ("n1", "n2"), 2)
    grow = cluster.root / "grow"
    job_id = client.submit_job(
        argv=trainer("--steps", "6", "--step-seconds", "0.1", "--exit-when-world-below", "4", "--until-file", str(grow)),
        gpus=4,
        min_gpus=2,
        gpus_per_node=2,
        max_restarts=3,
    )
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: len(_rank_pids(cluster, job_id)) == 4, what="rank pids")
    kill_node(cluster, "n2")
    job = wait_for(
        lambda: (j := client.get_job(job_id)).attempt == 2 and j.state == RUNNING and j, timeout=10, what="a shrunken attempt"
    )
    assert job.placement.world_size == 2 and [n.node_id for n in job.placement.nodes] == ["n1"]
    assert "2 of 4 GPUs (elastic)" in job.reason
    cluster.add_agent("n2", 2, "--heartbeat-interval", "0.25")
    cluster.wait_node_state("n2", 1)
    grow.touch()
    job = wait_state(client, job_id, SUCCEEDED, timeout=40)
    assert job.attempts[-1].placement.world_size == 4, "grown back to full size"
    assert [a.placement.world_size for a in job.attempts] == [4, 2, 4]


def test_hung_gang_is_restarted(cluster):
    client = start(cluster, ("n1",), 2)
    job_id = client.submit_job(
        argv=trainer(
            "--steps",
            "4",
            "--step-seconds",
            "0.1",
            "--fail-attempt",
            "1",
            "--fail-rank",
            "0",
            "--fail-at-step",
            "1",
            "--fail-mode",
            "hang",
        ),
        gpus=2,
        max_restarts=1,
        progress_timeout_seconds=2,
    )
    job = wait_state(client, job_id, SUCCEEDED, timeout=40)
    assert job.attempts[1].restart_reason == "hang"
    assert "no rank reported progress for 2s" in job.attempts[0].end_reason


def test_returning_node_has_ranks_of_superseded_attempts_fenced(cluster):
    client = start(cluster, ("n1", "n2"), 2)
    job_id = client.submit_job(argv=[sys.executable, RANK, "--sleep", "60"], gpus=2, gpus_per_node=2, max_restarts=1)
    job = wait_state(client, job_id, RUNNING)
    node_id = job.placement.nodes[0].node_id
    wait_for(lambda: len(_rank_pids(cluster, job_id)) == 2, what="rank pids")
    old_pids = _rank_pids(cluster, job_id)
    agent = cluster.agents[node_id]
    agent.signal(signal.SIGSTOP)  # a partition: the node goes DOWN, its ranks keep running
    job = wait_for(
        lambda: (j := client.get_job(job_id)).attempt == 2 and j.state == RUNNING and j, timeout=10, what="attempt 2 elsewhere"
    )
    assert job.placement.nodes[0].node_id != node_id
    assert all(_alive(pid) for pid in old_pids.values())
    agent.signal(signal.SIGCONT)  # the partition heals: the agent re-registers with attempt 1's ranks
    wait_for(lambda: not any(_alive(pid) for pid in old_pids.values()), timeout=10, what="stale ranks fenced")
    assert client.get_job(job_id).attempt == 2 and client.get_job(job_id).state == RUNNING
    client.cancel_job(job_id)


def test_coordinator_killed_during_a_burst_of_submissions(cluster):
    client = start(cluster, ("n1", "n2"), 2)
    acknowledged: dict[str, str] = {}
    errors: list[str] = []

    def submit_all():
        with gpuorch.Client(cluster.address, timeout=5) as submitter:
            for number in range(200):
                request_id = f"burst-{number}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        acknowledged[request_id] = submitter.submit_job(
                            argv=[sys.executable, RANK, "--sleep", "0.2"], gpus=1 + number % 2, client_request_id=request_id
                        )
                        break
                    except GpuorchError as error:
                        if time.monotonic() > deadline:
                            errors.append(f"{request_id}: {error}")
                            break
                        time.sleep(0.05)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    wait_for(lambda: len(acknowledged) >= 60, timeout=60, what="60 acknowledged submissions")
    cluster.coordinator.kill()
    cluster.start_coordinator("--stop-grace-period", "1", "--node-grace-period", "1.5", "--restart-backoff-base", "0.2")
    submitter.join(120)
    assert not errors, errors
    assert len(acknowledged) == 200
    everything = []
    token = ""
    while True:
        page, token = client.list_jobs(page_size=1000, page_token=token)
        everything += page
        if not token:
            break
    assert len(everything) == 200, "every acknowledged job exists exactly once"
    assert {job.job_id for job in everything} == set(acknowledged.values())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        no_gpu_held_twice(cluster)
        states = [job.state for job in client.list_jobs(page_size=1000)[0]]
        if all(state in FINAL for state in states):
            break
        time.sleep(0.5)
    final = client.list_jobs(page_size=1000)[0]
    assert all(job.state == SUCCEEDED for job in final), [(j.job_id, j.reason) for j in final if j.state != SUCCEEDED][:5]


RECORD_REASON = (
    "import os, pathlib, sys\n"
    "attempt = int(os.environ['GPUORCH_ATTEMPT'])\n"
    "pathlib.Path(sys.argv[1], f'attempt-{attempt}').write_text(os.environ.get('GPUORCH_RESTART_REASON', '<unset>'))\n"
    "sys.exit({1: 3, 2: 4}.get(attempt, 0))\n"
)
"""A rank that writes the restart reason it was started with, then exits 3 in attempt 1, 4 in attempt 2, 0 after."""


def test_restart_reason_outlives_a_coordinator_killed_during_the_backoff(cluster, tmp_path):
    """Attempt 1 exits 3 (restart 1 at once), attempt 2 exits 4 (restart 2 after a backoff); the coordinator
    is SIGKILLed while the job waits out that backoff. Attempt 3 must still be told why it runs: attempt 2
    exited 4 — not attempt 2's own start reason, and not nothing."""
    backoff = ("--restart-backoff-base", "4")
    client = start(cluster, ("n1",), 1, *backoff)
    seen = tmp_path / "reasons"
    seen.mkdir()
    job_id = client.submit_job(argv=[sys.executable, "-c", RECORD_REASON, str(seen)], gpus=1, max_restarts=3)
    job = wait_for(
        lambda: (j := client.get_job(job_id)).restarts == 2 and j.state == PENDING and j, timeout=20, what="the backoff"
    )
    assert job.HasField("restart_not_before") and (seen / "attempt-2").read_text() == "rank_exit:0:3"
    cluster.coordinator.kill()
    cluster.start_coordinator("--stop-grace-period", "1", "--node-grace-period", "1.5", *backoff)
    job = wait_state(client, job_id, SUCCEEDED, timeout=30)
    assert job.attempt == 3 and job.attempts[2].restart_reason == "rank_exit:0:4"
    assert (seen / "attempt-3").read_text() == "rank_exit:0:4", "the third attempt is told why it runs"
