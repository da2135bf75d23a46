"""Agents, gpuctl and the SDK given several coordinators reach the leader: real processes on loopback.

The standby is tests/standby_stub.py, a real gRPC server that answers as a standby does
(UNAVAILABLE, the leader in `gpuorch-leader`); the leaders are real coordinators.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

import gpuorch
from gpuorch.v1 import cluster_pb2, job_pb2
from tests.harness import REPO, free_port, wait_for
from tests.standby_stub import StandbyStub
from tests.test_cli import gpuctl

RANK = str(REPO / "tests" / "workloads" / "rank.py")
READY = cluster_pb2.NODE_STATE_READY


@pytest.fixture
def coordinator(cluster):
    cluster.start_coordinator()
    return cluster


@pytest.fixture
def standby(coordinator):
    with StandbyStub(leader=coordinator.address) as stub:
        yield stub


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def wait_job(client, job_id: str, state: int, timeout: float = 30.0):
    name = job_pb2.JobState.Name(state)
    return wait_for(lambda: (job := client.get_job(job_id)).state == state and job, timeout=timeout, what=f"{job_id} {name}")


def test_gpuctl_given_a_standby_first_reaches_the_leader_it_names(coordinator, standby):
    shown = gpuctl("--coordinator", f"{standby.address},{coordinator.address}", "-o", "json", "status", "--timeout", "10")
    assert shown.returncode == 0, shown.stderr
    assert int(json.loads(shown.stdout)["coordinator_epoch"]) == coordinator.client().cluster_status().coordinator_epoch
    assert standby.calls == ["/gpuorch.v1.ClusterService/GetClusterStatus"]


def test_gpuctl_given_a_dead_coordinator_first_reaches_the_next(coordinator):
    listed = gpuctl("--coordinator", f"{dead_address()},{coordinator.address}", "-o", "json", "nodes", "--timeout", "10")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"nodes": []}


def test_a_unix_socket_can_be_an_entry_of_the_list(coordinator):
    """The coordinator's local socket (unix:PATH) after a dead address: the socket answers."""
    local = f"unix:{coordinator.root / 'coordinator' / 'gpuorch.sock'}"
    shown = gpuctl("--coordinator", f"{dead_address()},{local}", "-o", "json", "nodes")
    assert shown.returncode == 0 and json.loads(shown.stdout) == {"nodes": []}, shown.stderr


def test_gpuctl_reads_a_list_from_the_environment_and_names_a_bad_entry(coordinator, standby):
    shown = gpuctl("status", env={"GPUORCH_COORDINATOR": f"{standby.address}, {coordinator.address}"})
    assert shown.returncode == 0, shown.stderr
    bad = gpuctl("--coordinator", f"{coordinator.address},head:http", "status")
    assert bad.returncode == 2 and "'head:http' is not HOST[:PORT]" in bad.stderr, bad.stderr


def test_gpuctl_fails_naming_every_address_when_none_serves():
    first, second = dead_address(), dead_address()
    with StandbyStub(leader="") as lost:  # a standby that knows no leader yet
        failed = gpuctl("--coordinator", f"{first},{lost.address},{second}", "--timeout", "3", "status")
        assert failed.returncode == 1 and f"{first},{lost.address},{second}" in failed.stderr, failed.stderr
        assert len(lost.calls) >= 2  # every round came back to it, after a backoff


def test_the_sdk_follows_the_standby_for_reads_submissions_and_a_cancel(coordinator, standby):
    with gpuorch.Client(f"{standby.address},{coordinator.address}", timeout=10) as client:
        job_id = client.submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True)
        assert client.address == coordinator.address  # the leader, remembered for the next calls
        assert client.get_job(job_id).state == job_pb2.JOB_STATE_PENDING
        assert standby.calls == ["/gpuorch.v1.JobService/SubmitJob"]
    # CancelJob is not resent after an ambiguous failure; a standby's answer is never ambiguous.
    with gpuorch.Client(f"{standby.address},{coordinator.address}", timeout=10) as client:
        assert client.cancel_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
    with gpuorch.Client(f"{dead_address()},{coordinator.address}", timeout=10) as client:
        assert client.get_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
        assert client.address == coordinator.address
    assert coordinator.client().get_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
    assert len(coordinator.client().list_jobs()[0]) == 1  # one submission, not one per try


def test_a_cancel_with_several_addresses_first_finds_the_leader_with_a_read(coordinator):
    job_id = coordinator.client().submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True)
    with StandbyStub(leader="") as lost, gpuorch.Client(f"{dead_address()},{lost.address},{coordinator.address}") as client:
        assert client.cancel_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
        assert lost.calls == ["/gpuorch.v1.ClusterService/GetClusterStatus"]


def test_the_async_sdk_follows_the_leader_for_calls_and_streams(coordinator, standby):
    async def scenario():
        async with gpuorch.AsyncClient(f"{standby.address},{coordinator.address}", timeout=10) as client:
            job_id = await client.submit_job(argv=[sys.executable, RANK], gpus=64, hold_if_too_big=True)
            await client.cancel_job(job_id)
        async with gpuorch.AsyncClient(f"{standby.address},{coordinator.address}", timeout=10) as client:
            return [job.state async for job in client.watch_job(job_id)]

    assert asyncio.run(scenario())[-1] == job_pb2.JOB_STATE_CANCELLED
    assert standby.calls == ["/gpuorch.v1.JobService/SubmitJob", "/gpuorch.v1.JobService/WatchJob"]


def test_an_agent_given_dead_standby_and_leader_registers_with_the_leader_and_runs_a_job(coordinator):
    # The stand-in names a dead address to clients and the real coordinator to agents: agents read theirs.
    with StandbyStub(leader=dead_address(), leader_agents=coordinator.address) as standby:
        coordinator.add_agent("n1", 2, coordinator=f"{dead_address()},{standby.address},{coordinator.address}")
        coordinator.wait_for_nodes(1, timeout=20)
        assert standby.agent_calls() == ["/gpuorch.v1.AgentService/Connect"]
    client = coordinator.client()
    job_id = client.submit_job(argv=[sys.executable, RANK], gpus=2)
    wait_job(client, job_id, job_pb2.JOB_STATE_SUCCEEDED)


def test_an_agent_follows_its_coordinator_restarted_on_the_address_listed_second(cluster):
    cluster.start_coordinator()
    first, second = cluster.address, f"127.0.0.1:{free_port()}"
    cluster.add_agent("n1", 2, coordinator=f"{first},{second}")
    cluster.wait_for_nodes(1, timeout=20)
    client = cluster.client()
    job_id = client.submit_job(argv=[sys.executable, RANK, "--sleep", "4"], gpus=2)
    wait_job(client, job_id, job_pb2.JOB_STATE_RUNNING)
    cluster.coordinator.kill()  # SIGKILL
    cluster.move_to_port(int(second.rsplit(":", 1)[1]))
    cluster.start_coordinator()  # same state dir: the same cluster, on the other address
    cluster.wait_node_state("n1", READY, timeout=20)
    done = wait_job(cluster.client(), job_id, job_pb2.JOB_STATE_SUCCEEDED)
    assert done.attempt == 1  # adopted where it ran, not relaunched
