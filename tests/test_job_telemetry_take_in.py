"""A heartbeat's progress reports are kept, not read, and taken in once per window (control/job_telemetry.py):
in-process, with a real job manager, cluster view and in-memory store, a fake clock and no network.

Reading every rank's report of every heartbeat cost the coordinator 40 % more CPU per heartbeat at
2,000 nodes of 8 reporting ranks (bench/heartbeats.py --progress); what is kept must still say what
every report said, and a hang must never be judged on stamps not yet taken in.
"""

from __future__ import annotations

from coordinator.control import job_telemetry as job_telemetry_loop
from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.control.job_telemetry import SLICE, JobTelemetry
from coordinator.rules.job_telemetry import TelemetryConfig
from coordinator.rules.liveness import LivenessPolicy
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2


async def running_job(progress_timeout_seconds: int = 0, gpus: int = 2, jobs: int = 1):
    clock = FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    register = agent_pb2.Register(node_id="n1", addresses=["127.0.0.1"])
    for index in range(gpus):
        register.devices.add(uuid=f"GPU-n1-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
    cluster.register(register)
    manager = JobManager(cluster, MemoryJobStore(), clock=clock)
    await manager.start()
    telemetry = JobTelemetry(manager, cluster, TelemetryConfig(), window_seconds=10.0)
    manager.take_in_progress = telemetry.take_in  # as coordinator/wiring.py does
    spec = job_pb2.JobSpec(argv=["train"], gpus=gpus // jobs, progress_timeout_seconds=progress_timeout_seconds)
    job_ids = [await manager.submit(spec) for _ in range(jobs)]
    assert sorted(await manager.schedule_pass()) == sorted(job_ids)
    for job_id in job_ids:
        for rank in range(gpus // jobs):
            status = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=rank, state=agent_pb2.TASK_STATE_RUNNING, pid=100)
            manager.on_task_status("n1", status)
    return clock, manager, telemetry, job_ids[0] if jobs == 1 else job_ids


def heartbeat(job_id: str, step: int, wall: float, ranks: int = 2, step_seconds: float = 1.0) -> agent_pb2.Heartbeat:
    message = agent_pb2.Heartbeat()
    for rank in range(ranks):
        report = message.progress.add(job_id=job_id, attempt=1, rank=rank, step=step, samples=32 * step)
        report.step_seconds = step_seconds
        report.last_progress_time.FromNanoseconds(int(wall * 1e9))
        if rank == 0:
            report.scalars["loss"] = 1.0 / step
    return message


async def test_a_hang_is_judged_on_the_reports_kept_since_the_last_take_in():
    clock, manager, telemetry, job_id = await running_job(progress_timeout_seconds=5)
    clock.advance(4)
    telemetry.on_progress("n1", heartbeat(job_id, step=1, wall=clock.wall()).progress)
    assert telemetry.unread, "a report is kept, not read, when its heartbeat comes"
    clock.advance(4)  # 8 s since the start, 4 s since the report: not hung
    manager.detect_hangs()
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_RUNNING, manager.get(job_id).job.reason
    assert not telemetry.unread
    clock.advance(2)  # 6 s since the last report
    manager.detect_hangs()
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_FAILED
    assert "hang" in manager.get(job_id).job.reason


async def test_the_latest_report_of_a_window_counts_every_step_of_it_and_the_rate_over_it():
    clock, _manager, telemetry, job_id = await running_job()
    telemetry.on_progress("n1", heartbeat(job_id, step=10, wall=clock.wall()).progress)
    telemetry.take_in()
    for step in range(11, 21):  # ten heartbeats of a window, one step each; only the last is kept
        clock.advance(1)
        telemetry.on_progress("n1", heartbeat(job_id, step=step, wall=clock.wall(), step_seconds=0.5).progress)
    assert len(telemetry.unread) == 1
    await telemetry.take_in_unhurried()
    state = telemetry.attempts[job_id]
    assert state.step == 20
    assert [steps.steps_per_second for steps in state.ranks.values()] == [1.0, 1.0]
    assert [steps.samples_per_second for steps in state.ranks.values()] == [32.0, 32.0]
    assert state.histogram.count == 2 * 20, "each rank's every step is counted once"
    assert state.histogram.total_seconds == 2 * (10 * 1.0 + 10 * 0.5)
    assert state.scalars == {"loss": 1.0 / 20}


async def test_a_take_in_in_slices_and_a_hang_check_meanwhile_share_what_is_left():
    clock, manager, telemetry, job_id = await running_job(progress_timeout_seconds=5)
    for node in range(3 * SLICE):  # other nodes' reports, of jobs gone: nothing to take but time
        telemetry.on_progress(f"gone-{node}", heartbeat("j-gone", step=1, wall=clock.wall()).progress)
    clock.advance(4)
    telemetry.on_progress("n1", heartbeat(job_id, step=1, wall=clock.wall()).progress)
    slices = telemetry.take_in_unhurried()
    slices.send(None)  # the first slice is taken in, then it yields to the loop: n1's report is not reached yet
    assert telemetry._backlog
    clock.advance(4)
    manager.detect_hangs()  # the hang check takes in what the slices left too
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_RUNNING, manager.get(job_id).job.reason
    assert not telemetry._backlog
    slices.close()


async def test_a_window_in_slices_skips_a_job_that_ended_while_it_paused(monkeypatch):
    monkeypatch.setattr(job_telemetry_loop, "SLICE", 1)
    clock, manager, telemetry, (first, second) = await running_job(gpus=2, jobs=2)
    for job_id in (first, second):
        telemetry.on_progress(f"n1-{job_id}", heartbeat(job_id, step=1, wall=clock.wall(), ranks=1).progress)
    telemetry.take_in()
    telemetry.attempts.clear()  # as after a coordinator restart: the window starts each attempt's telemetry again
    slices = telemetry._window_in_slices()
    next(slices)  # one job judged, then the pause
    judged, waiting = (first, second) if first in telemetry.attempts else (second, first)
    assert waiting not in telemetry.attempts
    await manager.cancel(waiting, "cancelled during the window")
    assert list(slices) == []
    assert waiting not in telemetry.attempts, "a job that ended during the pause is not judged"
    assert manager.get(judged).job.telemetry.update_time.seconds, "the job judged before the pause shows its figures"
