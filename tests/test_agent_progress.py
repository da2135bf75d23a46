"""Step telemetry from a real rank through a real agent: a python rank (no torch) calls
gpuorch.worker.report_progress(step=..., samples=..., loss=...) inside compute(), and the agent (a real
process on simulated GPUs) carries step, samples, step time and rank 0's scalars in its heartbeats to a
coordinator played here by an in-test AgentService server that records what it is sent."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest

from gpuorch.v1 import agent_pb2, agent_pb2_grpc
from tests.harness import REPO, LocalCluster

RANK = """
import time
from gpuorch import worker

for step in range(1, 2000):  # about two minutes at most, should nobody stop it
    with worker.compute():
        time.sleep(0.02)  # this rank's own work
    time.sleep(0.1)  # waiting on its peers (a collective): not its step time
    worker.report_progress(step=step, samples=4, loss=1.0 / step, min_interval_seconds=0.2)
"""


class Coordinator(agent_pb2_grpc.AgentServiceServicer):
    """Acks the agent's Register, then launches `launch`; records heartbeats and task statuses."""

    def __init__(self, launch: agent_pb2.LaunchTask) -> None:
        self.launch = launch
        self.heartbeats: list[agent_pb2.Heartbeat] = []
        self.statuses: list[agent_pb2.TaskStatus] = []
        self.outbox: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()

    async def Connect(self, request_iterator, context):
        async def read() -> None:
            async for message in request_iterator:
                kind = message.WhichOneof("payload")
                if kind == "register":
                    ack = agent_pb2.RegisterAck(heartbeat_interval_seconds=0.2, coordinator_epoch=1, down_after_seconds=60)
                    await self.outbox.put(agent_pb2.CoordinatorMessage(register_ack=ack))
                    await self.outbox.put(agent_pb2.CoordinatorMessage(launch_task=self.launch))
                elif kind == "heartbeat":
                    self.heartbeats.append(message.heartbeat)
                elif kind == "task_status":
                    self.statuses.append(message.task_status)

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                yield await self.outbox.get()
        finally:
            reader.cancel()

    def latest(self, rank: int) -> agent_pb2.RankProgress | None:
        for heartbeat in reversed(self.heartbeats):
            for report in heartbeat.progress:
                if report.rank == rank:
                    return report
        return None


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)
    return value


@pytest.fixture
async def coordinator():
    ranks = [agent_pb2.RankLaunch(rank=r, local_rank=r, env={"RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    launch = agent_pb2.LaunchTask(
        job_id="j-progress", attempt=1, argv=[sys.executable, "-c", RANK], ranks=ranks, owner="tester",
        env={"PYTHONPATH": str(REPO), "WORLD_SIZE": "2"}, stop_grace_seconds=5,
    )  # fmt: skip
    servicer = Coordinator(launch)
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    await server.stop(0)


async def test_a_ranks_steps_samples_step_time_and_rank_0s_scalars_reach_the_agents_heartbeats(coordinator, tmp_path):
    cluster = LocalCluster(tmp_path)
    agent = cluster.add_agent("n1", 2, coordinator=coordinator.address)
    try:
        first = await until(lambda: coordinator.latest(0), 60, "a heartbeat with rank 0's progress")
        await until(lambda: (r := coordinator.latest(0)) and r.step >= first.step + 10, 60, "ten more steps of rank 0")
        zero, one = coordinator.latest(0), await until(lambda: coordinator.latest(1), 10, "rank 1's progress")
        assert (zero.job_id, zero.attempt) == ("j-progress", 1)
        assert zero.samples == 4 * zero.step, "samples are the sum of every call's, written with its step"
        assert 0.019 <= zero.step_seconds < 0.09, f"the time inside compute(), not the 0.12 s wall step: {zero.step_seconds}"
        assert dict(zero.scalars) == {"loss": pytest.approx(1.0 / zero.step)}, "rank 0's latest loss"
        assert one.step > 0 and one.samples == 4 * one.step and one.step_seconds > 0
        assert not one.scalars, "scalars travel for rank 0 only"
        assert zero.last_progress_time.ToNanoseconds() > 0
        stamps = {r.last_progress_time.ToNanoseconds() for hb in coordinator.heartbeats for r in hb.progress if r.rank == 0}
        assert len(stamps) > 5, "the file's mtime moves with every write: it is still the hang detector's stamp"
    finally:
        stop = agent_pb2.StopTask(job_id="j-progress", reason="test over", grace_seconds=5)
        await coordinator.outbox.put(agent_pb2.CoordinatorMessage(stop_task=stop))
        exited = agent_pb2.TASK_STATE_EXITED
        try:
            await until(lambda: {s.rank for s in coordinator.statuses if s.state == exited} == {0, 1}, 30, "both ranks to end")
        finally:
            await asyncio.to_thread(cluster.stop)
    assert agent.process is not None and agent.process.returncode is not None
