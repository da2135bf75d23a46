"""Pools and time limits end to end: a real coordinator, real agents with simulated GPUs in two
pools, real ranks, and gpuctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gpuorch.v1 import job_pb2
from tests.harness import REPO, wait_for

FAILED, RUNNING, PENDING = job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_PENDING
STOP_GRACE = 1.0


@pytest.fixture
def pools(cluster):
    cluster.start_coordinator("--stop-grace-period", str(STOP_GRACE))
    cluster.add_agent("a1", 2, "--pool", "train")
    cluster.add_agent("b1", 2)  # the default pool
    cluster.wait_for_nodes(2)
    return cluster


def gpuctl(cluster, *args):
    return subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_job_past_its_time_limit_fails_with_reason_time_limit_and_its_rank_is_gone(pools):
    client = pools.client()
    submitted = gpuctl(pools, "submit", "--time-limit", "2s", "--max-restarts", "2", "--", "sleep", "60")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    started = time.monotonic()
    wait_for(lambda: client.get_job(job_id).state == RUNNING and client.get_job(job_id).attempts, timeout=10, what="running")
    job = wait_for(lambda: (j := client.get_job(job_id)).state == FAILED and j, timeout=2 + STOP_GRACE + 8, what="FAILED")
    assert time.monotonic() - started < 2 + STOP_GRACE + 8
    assert job.reason.startswith("time_limit: rank 0 on node b1 was stopped at the job's time limit"), job.reason
    assert job.restarts == 0 and len(job.attempts) == 1, "a time limit is not retried"
    pids = [
        record["pid"]
        for line in pools.agents["b1"].output().splitlines()
        if line.startswith("{") and (record := json.loads(line)).get("event") == "rank started" and record.get("job") == job_id
    ]
    assert pids and _gone(pids[0])
    shown = gpuctl(pools, "job", job_id)
    assert "time limit 2s" in shown.stdout and "FAILED: time_limit:" in shown.stdout, shown.stdout


def test_a_job_pinned_to_a_pool_lands_only_on_that_pools_agent_and_gpuctl_shows_the_pools(pools):
    client = pools.client()
    pinned = [client.submit_job(argv=["sleep", "30"], gpus=1, pool="train") for _ in range(3)]
    unpinned = client.submit_job(argv=["sleep", "30"], gpus=2)
    wait_for(lambda: client.get_job(unpinned).state == RUNNING, timeout=10, what="the default-pool job to run")
    wait_for(lambda: [client.get_job(j).state for j in pinned].count(RUNNING) == 2, timeout=10, what="two pinned jobs running")
    for job_id in pinned:
        job = client.get_job(job_id)
        assert {n.node_id for n in job.placement.nodes} <= {"a1"}
        assert job.spec.pool == "train"
    waiting = next(client.get_job(j) for j in pinned if client.get_job(j).state == PENDING)
    assert waiting.reason.startswith("reserving a1:"), waiting.reason  # not b1: its free GPUs are the default pool's
    assert [n.node_id for n in client.get_job(unpinned).placement.nodes] == ["b1"]

    unknown = client.submit_job(argv=["true"], gpus=1, pool="nowhere")
    reason = wait_for(lambda: client.get_job(unknown).reason, timeout=5, what="a pending reason")
    assert "'nowhere'" in reason and "known pools: default, train" in reason, reason

    table = gpuctl(pools, "nodes").stdout.splitlines()
    header = table[0].split()
    assert "POOL" in header
    pools_by_node = {line.split()[0]: line.split()[header.index("POOL")] for line in table[1:]}
    assert pools_by_node == {"a1": "train", "b1": "default"}
    as_json = json.loads(gpuctl(pools, "nodes", "-o", "json").stdout)
    assert {n["node_id"]: n["pool"] for n in as_json["nodes"]} == {"a1": "train", "b1": "default"}
    jobs_table = gpuctl(pools, "jobs").stdout
    assert "POOL" in jobs_table.splitlines()[0] and "train" in jobs_table and "nowhere" in jobs_table

    bad = gpuctl(pools, "submit", "--pool", "Bad Pool", "--", "true")
    assert bad.returncode == 2 and "'Bad Pool' is not a valid pool name" in bad.stderr
    bad = gpuctl(pools, "submit", "--time-limit", "soon", "--", "true")
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
    for job_id in [*pinned, unpinned, unknown]:
        client.cancel_job(job_id)


def test_a_time_limit_holds_across_a_coordinator_restart(pools):
    client = pools.client()
    job_id = client.submit_job(argv=["sleep", "60"], gpus=1, pool="train", time_limit="4s")
    wait_for(lambda: client.get_job(job_id).state == RUNNING, timeout=10, what="running")
    pools.coordinator.stop()
    pools.start_coordinator("--stop-grace-period", str(STOP_GRACE))
    job = wait_for(lambda: (j := client.get_job(job_id)).state == FAILED and j, timeout=4 + STOP_GRACE + 10, what="FAILED")
    assert job.reason.startswith("time_limit: rank 0 on node a1"), job.reason
    assert job.spec.time_limit_seconds == 4
