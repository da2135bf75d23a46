"""Job history end to end: a real coordinator on loopback and a real agent; jobs end, the coordinator restarts
keeping only two ended jobs in memory, and every read of the older ones is answered from the store."""

from __future__ import annotations

import json
import sys
import time

import grpc
import pytest

from gpuorch.errors import FailedPrecondition, NotFound
from gpuorch.v1 import job_pb2, job_pb2_grpc
from tests.harness import wait_for
from tests.test_cli import gpuctl

SUCCEEDED, FAILED, CANCELLED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED


def wait_state(client, job_id, state, timeout=60.0):
    return wait_for(lambda: client.get_job(job_id).state == state, timeout=timeout, what=f"{job_id} {state}")


@pytest.fixture
def history_cluster(cluster, monkeypatch):
    monkeypatch.setenv("GPUORCH_RECENT_ENDED_JOBS", "2")
    cluster.start_coordinator("--stop-grace-period", "1")
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    return cluster


def test_old_jobs_are_read_from_the_store_after_a_restart(history_cluster):
    cluster = history_cluster
    client = cluster.client()
    hello = client.submit_job(
        argv=[sys.executable, "-c", "print('hello from history')"],
        gpus=1,
        owner="alice",
        name="hello",
        client_request_id="hello-1",
    )
    failing = client.submit_job(
        argv=[sys.executable, "-c", "raise SystemExit(3)"], gpus=1, owner="bob", name="fails", max_restarts=0
    )
    wait_state(client, hello, SUCCEEDED)
    wait_state(client, failing, FAILED)
    held = [client.submit_job(argv=["x"], gpus=64, hold_if_too_big=True, owner="carol", name=f"held{n}") for n in range(3)]
    for job_id in held:
        client.cancel_job(job_id)
    every = [*held[::-1], failing, hello]
    assert [job.job_id for job in client.list_jobs()[0]] == every

    cluster.coordinator.stop()
    cluster.start_coordinator("--stop-grace-period", "1")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    # Two ended jobs are in memory (the last two cancelled); the rest come from the store.
    old = client.get_job(hello)
    assert old.state == SUCCEEDED and old.spec.name == "hello"
    assert b"".join(client.job_logs(hello)) == b"hello from history\n"  # its placement read from the store
    assert [job.state for job in client.watch_job(hello)] == [SUCCEEDED]
    with pytest.raises(FailedPrecondition, match="already SUCCEEDED"):
        client.cancel_job(hello)
    with pytest.raises(FailedPrecondition, match="already FAILED"):
        client.set_job_priority(failing, 9)
    with pytest.raises(NotFound):
        client.get_job("j-999999-zzzzzz")
    again = client.submit_job(argv=[sys.executable, "-c", "print('again')"], gpus=1, owner="alice", client_request_id="hello-1")
    assert again == hello, "a retried submission finds its job in the store"
    assert [job.job_id for job in client.iter_jobs(page_size=2)] == every
    assert [job.job_id for job in client.iter_jobs(page_size=1, states=["failed", "succeeded"])] == [failing, hello]
    assert [job.job_id for job in client.iter_jobs(owner="alice", since=time.time() - 3600)] == [hello]
    assert list(client.iter_jobs(until=time.time() - 3600)) == []

    listed = gpuctl("--coordinator", cluster.address, "history", "-o", "json", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    assert [job["job_id"] for job in json.loads(listed.stdout)["jobs"]] == every
    failed = gpuctl("--coordinator", cluster.address, "history", "--state", "failed", "--user", "bob", "--since", "2020-01-01")
    assert failed.returncode == 0, failed.stderr
    header, *rows = failed.stdout.splitlines()
    assert header.split() == ["JOB", "NAME", "OWNER", "STATE", "GPUS", "SUBMIT", "START", "END", "ELAPSED", "REASON"]
    assert len(rows) == 1 and rows[0].split()[:5] == [failing, "fails", "bob", "FAILED", "1"], failed.stdout
    assert "exited with code 3" in rows[0]  # the reason column says how it ended
    limited = gpuctl("--coordinator", cluster.address, "history", "--limit", "2", "-o", "json")
    assert [job["job_id"] for job in json.loads(limited.stdout)["jobs"]] == every[:2]
    assert gpuctl("--coordinator", cluster.address, "history", "--since", "1h", "--user", "nobody").stdout.splitlines()[1:] == []


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--since", "last tuesday"], "--since"),
        (["--until", "2026-13-45"], "--until"),
        (["--limit", "0"], "--limit"),
        (["--state", "exploded"], "unknown state 'exploded'"),
        (["--since", "1h", "--until", "2h"], "--until 2h is before --since 1h"),
    ],
)
def test_gpuctl_history_names_the_bad_value(history_cluster, arguments, named):
    result = gpuctl("--coordinator", history_cluster.address, "history", *arguments)
    assert result.returncode == 2 and named in result.stderr, result.stderr


def test_list_jobs_refuses_a_time_no_timestamp_can_hold(history_cluster):
    request = job_pb2.ListJobsRequest()
    request.active_since.seconds = 2**62
    with grpc.insecure_channel(history_cluster.address) as channel, pytest.raises(grpc.RpcError) as refused:
        job_pb2_grpc.JobServiceStub(channel).ListJobs(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "active_since is not a valid time" in refused.value.details()
