"""The scheduler's view of running jobs (coordinator/control/running_view.py), built by the real JobManager
on the in-memory store and a fake clock: what each pass hands `scheduler.schedule(..., running=...)`."""

from __future__ import annotations

import asyncio

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.rules.liveness import LivenessPolicy
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2


def cluster_with(nodes: int, gpus: int) -> ClusterView:
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    for n in range(nodes):
        message = agent_pb2.Register(node_id=f"n{n}", addresses=["127.0.0.1"])
        for index in range(gpus):
            message.devices.add(uuid=f"GPU-{n}-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
        cluster.register(message)
    return cluster


def report(
    manager: JobManager, job_id: str, state: agent_pb2.TaskState, exit_code: int = 0, ranks: tuple[int, ...] | None = None
) -> None:
    """Every rank of the job's current attempt (or those named) reports `state`, as its agent would."""
    job = manager.get(job_id).job
    for node in job.placement.nodes:
        for local in range(len(node.device_uuids)):
            rank = node.first_rank + local
            if ranks is None or rank in ranks:
                status = agent_pb2.TaskStatus(job_id=job_id, attempt=job.attempt, rank=rank, state=state, exit_code=exit_code)
                manager.on_task_status(node.node_id, status)


async def test_a_pass_hands_the_scheduler_every_live_attempt(monkeypatch):
    clock = FakeClock()
    manager = JobManager(cluster_with(2, 2), MemoryJobStore(), clock=clock)
    await manager.start()
    seen: list[list[scheduler.RunningJob]] = []
    real_schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        seen.append(list(kwargs["running"]))
        return real_schedule(*args, **kwargs)

    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    first = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, owner="ann", priority=3, estimated_runtime_seconds=600))
    assert await manager.schedule_pass() == [first]
    assert seen[-1] == [], "nothing ran when the first job was placed"
    started = clock.wall()
    clock.advance(10)
    second = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=1, owner="bob", non_preemptible=True))
    assert await manager.schedule_pass() == [second]
    (running,) = seen[-1]
    assert running.job_id == first and running.owner == "ann" and running.priority == 3
    assert running.start_time == started and running.estimated_end_time == started + 600
    assert running.gpus == 2 and running.nodes == (scheduler.NodeShare("n0", ("GPU-0-0", "GPU-0-1")),)
    assert running.preemptible and not running.stopping and running.attained_service_seconds == 0
    by_id = {job.job_id: job for job in manager.scheduling.running_jobs()}
    assert set(by_id) == {first, second}
    assert by_id[second].estimated_end_time == 0.0, "no estimate: end unknown"
    assert not by_id[second].preemptible, "submitted with non_preemptible"


async def test_a_stopping_attempt_is_marked_until_its_ranks_end_and_the_next_one_carries_its_service():
    clock = FakeClock()
    manager = JobManager(cluster_with(1, 2), MemoryJobStore(), clock=clock)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, max_restarts=1))
    await manager.schedule_pass()
    report(manager, job_id, agent_pb2.TASK_STATE_RUNNING)
    clock.advance(30)
    report(manager, job_id, agent_pb2.TASK_STATE_EXITED, exit_code=1, ranks=(0,))
    (stopping,) = manager.scheduling.running_jobs()
    assert stopping.stopping and stopping.job_id == job_id, "rank 1 still holds its GPU while it stops"
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_PENDING
    clock.advance(2)
    report(manager, job_id, agent_pb2.TASK_STATE_EXITED, exit_code=143, ranks=(1,))
    assert manager.scheduling.running_jobs() == []
    assert await manager.schedule_pass() == [job_id]
    (second,) = manager.scheduling.running_jobs()
    assert not second.stopping and second.start_time == clock.wall()
    assert second.attained_service_seconds == 2 * 30, "two GPUs for the 30 s the first attempt ran"


async def test_a_priority_change_reaches_the_running_record():
    manager = JobManager(cluster_with(1, 1), MemoryJobStore(), clock=FakeClock())
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=1, priority=1))
    await manager.schedule_pass()
    assert [job.priority for job in manager.scheduling.running_jobs()] == [1]
    await manager.set_priority(job_id, 7)
    assert [job.priority for job in manager.scheduling.running_jobs()] == [7]


async def test_a_cancelled_job_stays_in_the_view_while_its_ranks_stop():
    manager = JobManager(cluster_with(1, 1), MemoryJobStore(), clock=FakeClock())
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=1))
    await manager.schedule_pass()
    report(manager, job_id, agent_pb2.TASK_STATE_RUNNING)
    await manager.cancel(job_id)
    assert [(job.job_id, job.stopping) for job in manager.scheduling.running_jobs()] == [(job_id, True)]
    report(manager, job_id, agent_pb2.TASK_STATE_EXITED, exit_code=143)
    assert manager.scheduling.running_jobs() == []
    assert job_id not in manager.scheduling._requests, "a final job's request is not kept"


async def test_attempts_restored_after_a_coordinator_restart_are_in_the_view():
    clock = FakeClock()
    store = MemoryJobStore()
    manager = JobManager(cluster_with(1, 2), store, clock=clock)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, estimated_runtime_seconds=100))
    await manager.schedule_pass()
    await asyncio.sleep(0)
    started = manager.get(job_id).job.start_time.ToNanoseconds() / 1e9
    clock.advance(5)
    restarted = JobManager(cluster_with(1, 2), store, clock=clock)
    await restarted.start()
    (running,) = restarted.scheduling.running_jobs()
    assert running.job_id == job_id and running.start_time == started and running.estimated_end_time == started + 100
    assert not running.stopping


async def test_a_restored_attempt_of_a_restarting_job_is_stopping():
    """Stored while one rank had failed and the other was still in its stop grace: after a restart, the
    attempt holds its GPUs until the agents report that rank's end, and it is marked stopping."""
    store = MemoryJobStore()
    manager = JobManager(cluster_with(1, 2), store, clock=FakeClock())
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, max_restarts=1))
    await manager.schedule_pass()
    report(manager, job_id, agent_pb2.TASK_STATE_RUNNING)
    report(manager, job_id, agent_pb2.TASK_STATE_EXITED, exit_code=1, ranks=(0,))
    await asyncio.sleep(0)
    restarted = JobManager(cluster_with(1, 2), store, clock=FakeClock())
    await restarted.start()
    assert [(job.job_id, job.stopping) for job in restarted.scheduling.running_jobs()] == [(job_id, True)]
