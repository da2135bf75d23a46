"""A launch that never finishes fails its attempt (coordinator/rules/launch_timeout.py): in-process with a
fake clock, then with a real coordinator and an agent that heartbeats but never starts what it is sent."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from agent.telemetry.simulated import SimulatedSource
from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.rules.liveness import LivenessPolicy
from coordinator.settings import CoordinatorSettings
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, agent_pb2_grpc, job_pb2
from tests.harness import wait_for
from tests.test_job_manager import register, sent

RUNNING, PENDING, FAILED, SUCCEEDED = (
    job_pb2.JOB_STATE_RUNNING,
    job_pb2.JOB_STATE_PENDING,
    job_pb2.JOB_STATE_FAILED,
    job_pb2.JOB_STATE_SUCCEEDED,
)


async def manager_with(nodes: int, launch_timeout: float) -> tuple[JobManager, FakeClock, list]:
    clock = FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    sessions = [register(cluster, f"n{number}") for number in range(1, nodes + 1)]
    manager = JobManager(cluster, MemoryJobStore(), clock=clock, launch_timeout_seconds=launch_timeout)
    await manager.start()
    return manager, clock, sessions


def status(job_id: str, rank: int, state: int, attempt: int = 1) -> agent_pb2.TaskStatus:
    return agent_pb2.TaskStatus(job_id=job_id, attempt=attempt, rank=rank, state=state)


async def test_a_rank_not_started_within_the_launch_timeout_fails_the_attempt_and_the_job_restarts():
    manager, clock, (first, second) = await manager_with(nodes=2, launch_timeout=30)
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=2, gpus_per_node=1, max_restarts=1))
    assert await manager.scheduling.step() == [job_id]
    placed = {node.node_id: node.first_rank for node in manager.get(job_id).job.placement.nodes}
    manager.on_task_status("n1", status(job_id, placed["n1"], agent_pb2.TASK_STATE_RUNNING))  # n2 never answers
    clock.advance(29)
    await manager.scheduling.step()
    assert manager.get(job_id).job.state == RUNNING, "within the timeout"
    assert [sent(session, "stop_task") for session in (first, second)] == [[], []], "no stop within the timeout"
    clock.advance(2)
    await manager.scheduling.step()
    job = manager.get(job_id).job
    assert (job.state, job.restarts, job.pending_restart_reason) == (PENDING, 1, "launch_timeout:n2"), job.reason
    assert job.attempts[0].end_reason == f"rank(s) {placed['n2']} on n2 did not start within 30s of the launch (launch_timeout)"
    assert [stop.attempt for stop in sent(first, "stop_task")] == [1], "the rank that did start is stopped"
    assert [stop.attempt for stop in sent(second, "stop_task")] == [1], "so is the one that may start late"
    stopped = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=placed["n1"], state=agent_pb2.TASK_STATE_EXITED, signal=15)
    manager.on_task_status("n1", stopped)
    assert "GPU-n1-0" not in manager.cluster.allocations, "the GPU of the rank that started is free again"
    assert await manager.scheduling.step() == [], "the next attempt waits for the rank that did not start"
    assert "waiting for 1 rank(s) of attempt 1 to end" in manager.get(job_id).job.reason
    late = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=placed["n2"], state=agent_pb2.TASK_STATE_FAILED_TO_START)
    manager.on_task_status("n2", late)
    assert await manager.scheduling.step() == [job_id]
    assert manager.get(job_id).job.attempt == 2


async def test_no_restarts_left_fails_the_job_with_the_launch_timeout_as_its_reason():
    manager, clock, _ = await manager_with(nodes=1, launch_timeout=5)
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
    assert await manager.scheduling.step() == [job_id]
    clock.advance(5)
    await manager.scheduling.step()
    job = manager.get(job_id).job
    assert job.state == FAILED and job.reason == "rank(s) 0 on n1 did not start within 5s of the launch (launch_timeout)"


async def test_started_or_quickly_ended_ranks_and_a_timeout_of_zero_never_time_out():
    manager, clock, _ = await manager_with(nodes=3, launch_timeout=10)
    started = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    ended_at_once = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=2, gpus_per_node=1))
    assert sorted(await manager.scheduling.step()) == sorted([started, ended_at_once])
    manager.on_task_status(manager.get(started).job.placement.nodes[0].node_id, status(started, 0, agent_pb2.TASK_STATE_RUNNING))
    for node in manager.get(ended_at_once).job.placement.nodes:  # rank 0 ended before rank 1 reported anything
        if node.first_rank == 0:
            manager.on_task_status(node.node_id, status(ended_at_once, 0, agent_pb2.TASK_STATE_EXITED))
    clock.advance(5)
    (late,) = [n.node_id for n in manager.get(ended_at_once).job.placement.nodes if n.first_rank == 1]
    manager.on_task_status(late, status(ended_at_once, 1, agent_pb2.TASK_STATE_RUNNING))
    clock.advance(1000)
    await manager.scheduling.step()
    assert manager.get(started).job.state == RUNNING
    assert manager.get(ended_at_once).job.state == RUNNING, manager.get(ended_at_once).job.reason

    off, clock, _ = await manager_with(nodes=1, launch_timeout=0)
    never_started = await off.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    assert await off.scheduling.step() == [never_started]
    clock.advance(10**6)
    await off.scheduling.step()
    assert off.get(never_started).job.state == RUNNING


def test_a_negative_launch_timeout_is_refused_with_its_name():
    with pytest.raises(ValueError, match="launch_timeout_seconds must be >= 0"):
        CoordinatorSettings(launch_timeout_seconds=-1).validate()


async def test_a_rank_on_a_node_that_is_not_ready_is_left_to_liveness():
    """A SUSPECT node (its stream broke) may come back with the rank started; if it does not, it goes DOWN and
    the attempt fails as node_down. The launch timeout judges only launches on READY nodes."""
    manager, clock, (session,) = await manager_with(nodes=1, launch_timeout=5)
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
    assert await manager.scheduling.step() == [job_id]
    manager.cluster.stream_closed(session)
    clock.advance(6)
    await manager.scheduling.step()
    assert manager.get(job_id).job.state == RUNNING, manager.get(job_id).job.reason


async def test_a_rank_its_agent_lists_as_still_starting_at_a_re_registration_is_not_adopted_as_started():
    """An agent whose stream broke while a shim was starting a rank lists that rank in its Register as RUNNING
    with `starting` set: the coordinator keeps it (no fence, no second launch) but does not count it as started,
    so a start that hangs still fails at the launch timeout. A rank listed as running (no `starting`) is adopted."""
    manager, clock, _ = await manager_with(nodes=2, launch_timeout=30)
    stuck = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
    adopted = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=0))
    assert sorted(await manager.scheduling.step()) == sorted([stuck, adopted])
    for job_id, starting in ((stuck, True), (adopted, False)):
        (node_id,) = [node.node_id for node in manager.get(job_id).job.placement.nodes]
        again = agent_pb2.Register(node_id=node_id, addresses=["127.0.0.1"])
        again.devices.add(uuid=f"GPU-{node_id}-0", index=0, name="H100 80GB", memory_total_bytes=80 * 2**30)
        listed = status(job_id, 0, agent_pb2.TASK_STATE_RUNNING)
        listed.starting, listed.pid = starting, 0 if starting else 4242
        again.tasks.append(listed)
        _, session, _ = manager.cluster.register(again)
        manager.on_register(node_id, again)
        assert sent(session, "launch_task") == [] and sent(session, "stop_task") == [], "kept: neither launched again nor fenced"
    clock.advance(31)
    await manager.scheduling.step()
    assert manager.get(stuck).job.state == FAILED, "a rank still starting is not started"
    assert "did not start within 30s of the launch (launch_timeout)" in manager.get(stuck).job.reason
    assert manager.get(adopted).job.state == RUNNING, manager.get(adopted).job.reason


class SilentAgent:
    """An agent stream that registers simulated GPUs and heartbeats, and starts nothing it is sent."""

    def __init__(self, address: str, node_id: str, gpus: int) -> None:
        self.address, self.node_id = address, node_id
        self.source = SimulatedSource(gpus, node_id=node_id, seed=1)
        self.received: list[str] = []

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            register = agent_pb2.Register(node_id=self.node_id, addresses=["127.0.0.1"], devices=self.source.devices())
            await call.write(agent_pb2.AgentMessage(register=register))
            reader = asyncio.create_task(self._read(call))
            try:
                for sequence in range(1, 10**6):
                    heartbeat = agent_pb2.Heartbeat(sequence=sequence, devices=self.source.sample())
                    await call.write(agent_pb2.AgentMessage(heartbeat=heartbeat))
                    await asyncio.sleep(0.5)
            finally:
                reader.cancel()
                call.cancel()

    async def _read(self, call) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            self.received.append(message.WhichOneof("payload"))


async def test_a_real_coordinator_fails_a_launch_its_agent_never_started_and_serves_on(cluster):
    cluster.start_coordinator("--launch-timeout-seconds", "2", "--node-grace-period", "1")
    agent = SilentAgent(cluster.address, "n1", gpus=1)
    beating = asyncio.create_task(agent.run())
    try:
        client = cluster.client()
        await asyncio.to_thread(wait_for, client.list_nodes, 15, 0.1, "the silent agent to register")
        job_id = await asyncio.to_thread(client.submit_job, argv=["sleep", "60"], gpus=1, max_restarts=0)

        def failed() -> job_pb2.Job | None:
            job = client.get_job(job_id)
            return job if job.state == FAILED else None

        job = await asyncio.to_thread(wait_for, failed, 20, 0.2, f"{job_id} to fail at its launch timeout")
        assert job.reason == "rank(s) 0 on n1 did not start within 2s of the launch (launch_timeout)"
        assert "launch_task" in agent.received and "stop_task" in agent.received
        assert cluster.coordinator.process.poll() is None
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
