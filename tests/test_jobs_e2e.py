"""Jobs end to end with real processes: coordinator, two agents with 2 simulated GPUs each, real ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from gpuorch.client import build_job_spec
from gpuorch.errors import FailedPrecondition, InvalidArgument, NotFound
from gpuorch.v1 import job_pb2
from tests.harness import ON_A_GPU_NODE, REPO, grpcurl_binary, wait_for
from tests.test_job_rules import with_unknown_field

RANK = str(REPO / "tests" / "workloads" / "rank.py")
ALLREDUCE = str(REPO / "examples" / "allreduce.py")
PENDING, RUNNING = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")


@pytest.fixture
def two_nodes(cluster):
    cluster.start_coordinator("--stop-grace-period", "1")
    cluster.add_agent("n1", 2)
    cluster.add_agent("n2", 2)
    cluster.wait_for_nodes(2)
    return cluster


def wait_state(client, job_id, state, timeout=30.0):
    name = job_pb2.JobState.Name(state)
    return wait_for(lambda: (job := client.get_job(job_id)).state == state and job, timeout=timeout, what=f"{job_id} {name}")


def logs(client, job_id, rank) -> str:
    return b"".join(client.job_logs(job_id, rank)).decode()


def env_of(client, job_id, rank) -> dict:
    line = next(line for line in logs(client, job_id, rank).splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


def devices_in_use(client) -> dict[str, str]:
    return {d.uuid: d.allocated_job_id for n in client.list_nodes() for d in n.devices if d.allocated_job_id}


@needs_torch
def test_four_rank_gloo_allreduce_through_the_real_launcher(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, ALLREDUCE], gpus=4, backend="gloo", name="allreduce")
    states = [job.state for job in client.watch_job(job_id)]
    assert states[-1] == SUCCEEDED, client.get_job(job_id).reason
    job = client.get_job(job_id)
    assert job.reason == "all 4 ranks exited with code 0"
    assert {node.node_id for node in job.placement.nodes} == {"n1", "n2"}
    for rank in range(4):
        output = logs(client, job_id, rank)
        assert f"rank {rank}/4" in output and "all_reduce ok (10, expected 10)" in output
    assert devices_in_use(client) == {}, "a finished job gives its GPUs back"


def test_every_rank_gets_the_torchrun_environment(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK], gpus=4, gpus_per_node=2, env={"USER_VAR": "hello"}, backend="gloo")
    wait_state(client, job_id, SUCCEEDED)
    job = client.get_job(job_id)
    envs = [env_of(client, job_id, rank) for rank in range(4)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert {e["MASTER_PORT"] for e in envs} == {str(job.placement.master_port)}
    for node in job.placement.nodes:
        for local_rank in range(2):
            assert envs[node.first_rank + local_rank]["CUDA_VISIBLE_DEVICES"] == ",".join(node.device_uuids)
    assert {e["GPUORCH_JOB_ID"] for e in envs} == {job_id} and {e["GPUORCH_ATTEMPT"] for e in envs} == {"1"}
    assert {e["USER_VAR"] for e in envs} == {"hello"} and {e["GPUORCH_BACKEND"] for e in envs} == {"gloo"}
    assert "stderr line from rank 2" in logs(client, job_id, 2), "stderr is captured too"


def test_two_jobs_share_the_cluster_on_disjoint_gpus(two_nodes, tmp_path):
    client = two_nodes.client()
    release = tmp_path / "release"
    first = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2)
    second = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=2)
    wait_state(client, first, RUNNING)
    wait_state(client, second, RUNNING)
    uuids = [{u for n in client.get_job(j).placement.nodes for u in n.device_uuids} for j in (first, second)]
    assert len(uuids[0]) == 2 and len(uuids[1]) == 2 and not uuids[0] & uuids[1]
    assert [len(client.get_job(j).placement.nodes) for j in (first, second)] == [1, 1], "2-GPU jobs are packed on one node"
    assert set(devices_in_use(client).values()) == {first, second}
    release.touch()
    wait_state(client, first, SUCCEEDED)
    wait_state(client, second, SUCCEEDED)


def test_a_job_larger_than_the_cluster_pends_with_its_reason(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK], gpus=5, hold_if_too_big=True)
    job = wait_for(lambda: (j := client.get_job(job_id)).reason.startswith("needs 5") and j, what="a reason")
    assert job.state == PENDING
    assert "needs 5 GPUs" in job.reason and "4 exist" in job.reason, job.reason
    big_memory = client.submit_job(
        argv=[sys.executable, RANK], gpus=1, requirements={"min_memory_per_gpu_bytes": 100 * 1024**3}, hold_if_too_big=True
    )
    job = wait_for(lambda: (j := client.get_job(big_memory)).reason.startswith("needs") and j, what="a reason")
    assert "100 GiB" in job.reason or "GiB" in job.reason, job.reason


def test_priority_decides_who_gets_freed_gpus(two_nodes, tmp_path):
    client = two_nodes.client()
    release = tmp_path / "release"
    blocker = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=4)
    wait_state(client, blocker, RUNNING)
    low = client.submit_job(argv=[sys.executable, RANK, "--sleep", "1"], gpus=4, priority=1)
    high = client.submit_job(argv=[sys.executable, RANK, "--sleep", "1"], gpus=4, priority=5)
    time.sleep(0.5)
    assert client.get_job(low).state == PENDING and client.get_job(high).state == PENDING
    release.touch()
    wait_state(client, high, RUNNING)
    assert client.get_job(low).state == PENDING, "the lower priority job waits"
    wait_state(client, high, SUCCEEDED)
    wait_state(client, low, SUCCEEDED)
    assert client.get_job(low).start_time.ToNanoseconds() > client.get_job(high).end_time.ToNanoseconds() - 10**9


def test_set_priority_reorders_the_queue(two_nodes, tmp_path):
    client = two_nodes.client()
    release = tmp_path / "release"
    blocker = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=4)
    wait_state(client, blocker, RUNNING)
    first = client.submit_job(argv=[sys.executable, RANK], gpus=4)
    second = client.submit_job(argv=[sys.executable, RANK], gpus=4)
    assert client.set_job_priority(second, 10).spec.priority == 10
    release.touch()
    wait_state(client, second, RUNNING)
    assert client.get_job(first).state == PENDING
    wait_state(client, first, SUCCEEDED)


def test_cancel_stops_every_rank(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK, "--sleep", "60", "--ignore-sigterm"], gpus=4)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: all(logs(client, job_id, r) for r in range(4)), what="every rank to start")
    pids = _rank_pids(two_nodes, job_id)
    assert len(pids) == 4
    cancelled = client.cancel_job(job_id)
    assert cancelled.state == CANCELLED and cancelled.reason == "cancelled by user"
    wait_for(
        lambda: not any(_alive(pid) for pid in pids.values()), timeout=10, what="ranks to be killed (SIGKILL after the 1s grace)"
    )
    wait_for(lambda: devices_in_use(client) == {}, what="GPUs released")
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        client.cancel_job(job_id)
    pending = client.submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True)
    assert client.cancel_job(pending).state == CANCELLED


def test_a_failing_rank_fails_the_job_and_stops_its_peers(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK, "--exit-code-for-rank", "3:7", "--sleep", "0.5"], gpus=4)
    wait_state(client, job_id, RUNNING)
    time.sleep(0.2)
    job = wait_state(client, job_id, FAILED)
    assert "rank 3" in job.reason and "exited with code 7" in job.reason, job.reason


def test_a_failing_rank_stops_peers_that_would_run_long(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK, "--exit-code-for-rank", "0:2", "--sleep", "60"], gpus=4)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: len(_rank_pids(two_nodes, job_id)) == 4, what="rank pids")
    pids = _rank_pids(two_nodes, job_id)
    # Rank 0 sleeps too; make it fail now by killing it.
    os.kill(pids[0], 9)
    job = wait_state(client, job_id, FAILED)
    assert "rank 0" in job.reason and "signal 9" in job.reason, job.reason
    wait_for(lambda: not any(_alive(pid) for pid in pids.values()), timeout=10, what="peers stopped")
    wait_for(lambda: devices_in_use(client) == {}, what="GPUs released")


def test_a_program_that_does_not_exist_fails_with_a_clear_reason(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=["/nonexistent/trainer"], gpus=1)
    job = wait_state(client, job_id, FAILED)
    assert "failed to start" in job.reason and "/nonexistent/trainer" in job.reason, job.reason


def test_bad_requests_name_the_field(two_nodes):
    client = two_nodes.client()
    with pytest.raises(InvalidArgument, match=r"spec\.argv is empty"):
        client.submit_job(argv=[], gpus=1)
    with pytest.raises(InvalidArgument, match=r"spec\.gpus must be at least 1"):
        client.submit_job(argv=["x"], gpus=0)
    with pytest.raises(InvalidArgument, match=r"spec\.min_gpus"):
        client.submit_job(argv=["x"], gpus=2, min_gpus=3)
    with pytest.raises(InvalidArgument, match="does not divide"):
        client.submit_job(argv=["x"], gpus=4, gpus_per_node=3)
    with pytest.raises(InvalidArgument, match="backend 'mpi'"):
        client.submit_job(argv=["x"], gpus=1, backend="mpi")
    with pytest.raises(NotFound, match="job 'j-999999' does not exist"):
        client.get_job("j-999999")
    with pytest.raises(NotFound):
        client.cancel_job("nope")
    with pytest.raises(InvalidArgument, match="page_token"):
        client.list_jobs(page_token="garbage")
    assert client.list_jobs()[0] == [], "nothing was queued by bad requests"


def test_list_jobs_filters_and_pages(two_nodes):
    client = two_nodes.client()
    ids = [
        client.submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True, owner="alice" if i % 2 else "bob")
        for i in range(5)
    ]
    page, token = client.list_jobs(page_size=2)
    assert [j.job_id for j in page] == ids[::-1][:2] and token
    page2, token2 = client.list_jobs(page_size=2, page_token=token)
    page3, token3 = client.list_jobs(page_size=2, page_token=token2)
    assert [j.job_id for j in page2 + page3] == ids[::-1][2:] and token3 == ""
    assert {j.spec.owner for j in client.list_jobs(owner="alice")[0]} == {"alice"}
    assert len(client.list_jobs(["pending"])[0]) == 5 and client.list_jobs(["running"])[0] == []
    retried = client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, client_request_id="req-1")
    assert client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, client_request_id="req-1") == retried, "idempotent retry"
    others = client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, owner="carol", client_request_id="req-1")
    assert others != retried, "one user's request id never names another user's job"
    assert client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, owner="carol", client_request_id="req-1") == others


def test_pages_of_large_jobs_fit_in_a_message_and_unknown_fields_are_not_stored(two_nodes):
    client = two_nodes.client()
    big_env = {"BIG": "e" * 120_000}  # within the 128 KiB limit; 40 of them are more than one 4 MiB message
    ids = [client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, env=big_env) for _ in range(40)]
    first, token = client.list_jobs(page_size=100)
    assert 0 < len(first) < 40 and token, "the page is cut by size, not by count"
    listed = [job.job_id for job in first]
    while token:
        page, token = client.list_jobs(page_size=100, page_token=token)
        listed += [job.job_id for job in page]
    assert listed == ids[::-1]
    padded = with_unknown_field(build_job_spec(argv=["x"], gpus=64, hold_if_too_big=True, name="padded"), 3_000_000)
    job_id = client.submit_job(padded)
    stored = client.get_job(job_id)
    assert stored.spec.name == "padded" and stored.spec.ByteSize() < 200, "the unknown 3 MB are not kept"


def test_a_submitted_job_survives_a_coordinator_kill(two_nodes):
    client = two_nodes.client()
    job_id = client.submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True, name="durable")
    two_nodes.coordinator.kill()
    two_nodes.start_coordinator("--stop-grace-period", "1")
    job = client.get_job(job_id)
    assert job.spec.name == "durable" and job.state == PENDING


def test_a_running_job_is_adopted_after_a_coordinator_restart(two_nodes, tmp_path):
    client = two_nodes.client()
    release = tmp_path / "release"
    job_id = client.submit_job(argv=[sys.executable, RANK, "--wait-for", str(release)], gpus=4)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: len(_rank_pids(two_nodes, job_id)) == 4, what="rank pids")
    pids = _rank_pids(two_nodes, job_id)
    two_nodes.coordinator.kill()
    two_nodes.start_coordinator("--stop-grace-period", "1")
    two_nodes.wait_for_nodes(2)
    assert client.get_job(job_id).state == RUNNING and client.get_job(job_id).attempt == 1
    assert all(_alive(pid) for pid in pids.values()), "adopted, not relaunched"
    release.touch()
    job = wait_state(client, job_id, SUCCEEDED)
    assert job.attempt == 1


def test_gpuctl_submit_watch_logs_and_jobs(two_nodes):
    def gpuctl(*args):
        return subprocess.run(
            [sys.executable, "-m", "gpuorch.cli", "--coordinator", two_nodes.address, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    submitted = gpuctl("submit", "--gpus", "2", "--name", "cli", "--env", "USER_VAR=via-cli", "--", sys.executable, RANK)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = gpuctl("watch", job_id)
    assert watched.returncode == 0 and watched.stdout.strip().splitlines()[-1].startswith(f"{job_id} SUCCEEDED")
    assert '"USER_VAR": "via-cli"' in gpuctl("logs", job_id, "--rank", "1").stdout
    assert gpuctl("logs", job_id, "--tail-bytes", "10").stdout == logs(two_nodes.client(), job_id, 0)[-10:]
    assert gpuctl("logs", job_id, "--tail", "2").stdout.splitlines() == logs(two_nodes.client(), job_id, 0).splitlines()[-2:]
    listed = gpuctl("jobs")
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    failing = gpuctl("submit", "--gpus", "1", "--watch", "--", sys.executable, RANK, "--exit-code-for-rank", "0:4")
    assert failing.returncode == 1 and "FAILED" in failing.stdout
    assert gpuctl("submit", "--gpus", "1").returncode == 2
    assert "already SUCCEEDED" in gpuctl("cancel", job_id).stderr


def test_grpcurl_submits_and_watches_a_job(two_nodes):
    binary = grpcurl_binary()
    if binary is None:
        pytest.skip("grpcurl not installed")
    request = json.dumps({"spec": {"argv": [sys.executable, RANK], "gpus": 2, "backend": "gloo"}})
    submitted = subprocess.run(
        [binary, "-plaintext", "-d", request, two_nodes.address, "gpuorch.v1.JobService/SubmitJob"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    body = json.loads(submitted.stdout)
    job_id = body.get("job_id", body.get("jobId"))
    watched = subprocess.run(
        [binary, "-plaintext", "-d", json.dumps({"job_id": job_id}), two_nodes.address, "gpuorch.v1.JobService/WatchJob"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watched.returncode == 0, watched.stderr
    assert "JOB_STATE_SUCCEEDED" in watched.stdout


def _rank_pids(cluster, job_id) -> dict[int, int]:
    """Rank -> pid of a job's rank processes, from the agents' pid files (jobs/<job>/attempt-N/rank-R.pid)."""
    pids = {}
    for node_id in cluster.agents:
        for path in (cluster.root / f"agent-{node_id}" / "jobs" / job_id).glob("attempt-*/rank-*.pid"):
            try:
                pids[int(path.stem.removeprefix("rank-"))] = int(path.read_text().strip())
            except ValueError:
                pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


def test_following_logs_streams_output_until_the_job_ends(two_nodes):
    client = two_nodes.client()
    program = "import time\nfor i in range(6):\n    print('line', i, flush=True)\n    time.sleep(0.3)\n"
    job_id = client.submit_job(argv=[sys.executable, "-c", program], gpus=1)
    wait_state(client, job_id, RUNNING)
    wait_for(lambda: logs(client, job_id, 0), what="first output")
    followed = b"".join(client.job_logs(job_id, 0, follow=True)).decode()
    assert list(followed.splitlines()) == [f"line {i}" for i in range(6)]
    assert client.get_job(job_id).state == SUCCEEDED, "the stream ended because the job did"
    assert b"".join(client.job_logs(job_id, 0, tail_bytes=7)).decode() == "line 5\n"
    assert b"".join(client.job_logs(job_id, 0, tail_bytes=2**64 - 1)).decode() == followed, (
        "a tail longer than the log is all of it"
    )
    with pytest.raises(InvalidArgument, match="no rank 5"):
        list(client.job_logs(job_id, 5))


def test_an_agent_with_a_relative_state_dir_runs_ranks_in_another_working_dir(cluster, tmp_path):
    cluster.start_coordinator()
    state_dir = os.path.relpath(tmp_path / "relative-agent-state", REPO)  # agents run with cwd = REPO
    agent = cluster.add_agent("rel", 1)
    agent.stop()
    agent.argv[agent.argv.index("--state-dir") + 1] = state_dir
    agent.start()
    cluster.wait_for_nodes(1)
    client = cluster.client()
    job_id = client.submit_job(argv=[sys.executable, "-c", "print('ran')"], gpus=1, working_dir=str(tmp_path))
    wait_state(client, job_id, job_pb2.JOB_STATE_SUCCEEDED)
    assert logs(client, job_id, 0).strip() == "ran"


@pytest.mark.skipif(not ON_A_GPU_NODE or importlib.util.find_spec("torch") is None, reason="needs NVIDIA GPUs and torch")
def test_nccl_allreduce_on_the_real_gpus_of_an_agent_reading_nvml(cluster):
    cluster.start_coordinator()
    cluster.add_agent("gpu-node", 0)  # 0 simulated GPUs: the agent reads the real ones through NVML
    cluster.wait_for_nodes(1)
    client = cluster.client()
    gpus = len(client.get_node("gpu-node").devices)
    assert gpus >= 1
    job_id = client.submit_job(argv=[sys.executable, ALLREDUCE], gpus=gpus, backend="nccl", max_restarts=0)
    job = wait_for(lambda: (j := client.get_job(job_id)).state in (SUCCEEDED, FAILED) and j, timeout=120, what="the job to end")
    outputs = [logs(client, job_id, rank) for rank in range(gpus)]
    assert job.state == SUCCEEDED, (job.reason, outputs)
    for rank, output in enumerate(outputs):
        assert f"rank {rank}/{gpus} local_rank {rank} backend nccl device cuda:{rank}: all_reduce ok" in output, output
