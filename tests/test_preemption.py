"""Preemption, the control side: the pure rule (coordinator/rules/job_machine.preempt and rules/preemption.py)
on a fake clock, and the JobManager applying a scheduler's SchedulingResult.preemptions on the in-memory store
(with a stand-in scheduler that asks for them, so these tests do not depend on which victims a policy picks)."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest

from coordinator import scheduler
from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.control.node_links import AgentSession
from coordinator.model.cluster import Allocations
from coordinator.model.jobs import JobEntry
from coordinator.rules import effects as fx
from coordinator.rules import job_machine, job_reasons, job_rules
from coordinator.rules.liveness import LivenessPolicy
from coordinator.rules.recovery import RecoveryPolicy
from coordinator.store.memory import MemoryJobStore
from gpuorch import worker
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2

CONFIG = job_machine.MachineConfig(
    RecoveryPolicy(backoff_initial_seconds=5.0), stop_grace_seconds=3.0, checkpoint_root="/ckpt", preemption_grace_seconds=20.0
)
RUNNING, EXITED = agent_pb2.TASK_STATE_RUNNING, agent_pb2.TASK_STATE_EXITED


def now(clock: FakeClock) -> job_machine.Now:
    return job_machine.Now(clock.wall(), clock.monotonic())


def status(attempt: int, rank: int, state: agent_pb2.TaskState, code: int = 0, job_id: str = "j-1") -> agent_pb2.TaskStatus:
    return agent_pb2.TaskStatus(job_id=job_id, attempt=attempt, rank=rank, state=state, exit_code=code)


def running_entry(clock: FakeClock, allocations: Allocations, **spec_fields) -> JobEntry:
    """A 2-rank job placed on n1 and running."""
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["train"], gpus=2, **spec_fields))
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29500, world_size=2)
    placement.nodes.add(node_id="n1", node_rank=0, device_uuids=["GPU-0", "GPU-1"], first_rank=0, device_indexes=[0, 1])
    job_machine.place(entry, placement, now(clock), allocations, {}, CONFIG)
    for rank in (0, 1):
        job_machine.rank_reported(entry, "n1", status(1, rank, RUNNING), now(clock), allocations, CONFIG)
    return entry


def test_a_preempted_job_is_stopped_with_the_grace_and_requeued_without_using_a_restart():
    clock, allocations = FakeClock(), Allocations()
    entry = running_entry(clock, allocations, max_restarts=0)
    clock.advance(100)
    effects = job_machine.preempt(entry, "j-9", "preempted for j-9 (priority 10 > 0)", now(clock), CONFIG)
    assert fx.Stop("n1", "j-1", 1, 20.0, "preempted for j-9 (priority 10 > 0)") in effects, "SIGTERM, then SIGKILL after 20 s"
    assert fx.Preempted("j-1", 1, "j-9", "preempted for j-9 (priority 10 > 0)") in effects
    assert fx.Save("j-1") in effects and fx.QueueChanged("j-1") in effects
    assert not any(isinstance(effect, fx.AttemptFailed) for effect in effects), "a preemption is no failure"
    job = entry.job
    assert (job.state, job.restarts, job.pending_restart_reason) == (job_pb2.JOB_STATE_PENDING, 0, "preempted")
    assert not job.HasField("restart_not_before") and entry.not_before == 0.0, "no restart backoff"
    assert job.attempts[0].end_reason == "preempted for j-9 (priority 10 > 0)"
    assert job.attempts[0].end_time.ToNanoseconds() / 1e9 == clock.wall()
    assert job.reason == "requeued after preemption (uses no restart: 0 of 0 used)"
    # Its GPUs stay held, and its next attempt waits, until every rank's end is confirmed.
    assert dict(allocations) == {"GPU-0": ("j-1", 1), "GPU-1": ("j-1", 1)}
    assert job_reasons.waiting_for_previous(entry) == "waiting for 2 rank(s) of attempt 1 to end"
    # A rank that checkpoints and exits 0, and one killed at the end of the grace: neither decides the job.
    clock.advance(5)
    effects = job_machine.rank_reported(entry, "n1", status(1, 0, EXITED), now(clock), allocations, CONFIG)
    assert job.state == job_pb2.JOB_STATE_PENDING and not any(isinstance(e, fx.Finished) for e in effects)
    assert dict(allocations) == {"GPU-1": ("j-1", 1)}
    effects = job_machine.rank_reported(entry, "n1", status(1, 1, EXITED, code=137), now(clock), allocations, CONFIG)
    assert job.state == job_pb2.JOB_STATE_PENDING and job.restarts == 0
    assert not any(isinstance(e, fx.AttemptFailed | fx.Finished) for e in effects)
    assert fx.AttemptOver("n1", "j-1", 1) in effects and dict(allocations) == {}
    assert job_reasons.waiting_for_previous(entry) is None
    # The next attempt is told why it starts.
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29501, world_size=2)
    placement.nodes.add(node_id="n1", node_rank=0, device_uuids=["GPU-0", "GPU-1"], first_rank=0, device_indexes=[0, 1])
    job_machine.place(entry, placement, now(clock), allocations, {}, CONFIG)
    (launch,) = [effect.launch for effect in job_machine.launches(entry, CONFIG, allocations) if isinstance(effect, fx.Launch)]
    assert (launch.attempt, launch.env["GPUORCH_RESTART_REASON"]) == (2, "preempted")
    assert launch.env["GPUORCH_CHECKPOINT_DIR"] == "/ckpt/j-1", "the same checkpoint directory as the attempt it resumes"
    assert [record.restart_reason for record in job.attempts] == ["", "preempted"]


def test_the_reason_always_says_preempted_and_names_the_job_it_makes_room_for():
    clock, allocations = FakeClock(), Allocations()
    entry = running_entry(clock, allocations)
    job_machine.preempt(entry, "j-9", "a higher priority", now(clock), CONFIG)
    assert entry.job.attempts[0].end_reason == "preempted: a higher priority (for j-9)"


@pytest.mark.parametrize("case", ["non-preemptible", "pending", "final"])
def test_a_job_that_is_not_running_or_not_preemptible_is_left_alone(case):
    clock, allocations = FakeClock(), Allocations()
    entry = running_entry(clock, allocations, non_preemptible=case == "non-preemptible")
    if case == "pending":
        job_machine.rank_reported(entry, "n1", status(1, 0, EXITED, code=1), now(clock), allocations, CONFIG)
    elif case == "final":
        job_machine.cancel(entry, now(clock), CONFIG)
    before = job_pb2.Job()
    before.CopyFrom(entry.job)
    assert job_machine.preempt(entry, "j-9", "preempted for j-9", now(clock), CONFIG) == []
    assert entry.job == before


def test_a_preempted_rank_reported_running_again_gets_the_stop_with_the_grace_left_not_a_kill():
    """Its agent re-registered (or the coordinator restarted) during the grace: a superseded attempt's rank is
    usually fenced with no grace; a preempted one is still checkpointing and keeps what is left of its grace."""
    clock, allocations = FakeClock(), Allocations()
    entry = running_entry(clock, allocations)
    job_machine.preempt(entry, "j-9", "preempted for j-9", now(clock), CONFIG)
    assert job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG) == [], (
        "the node was just sent the stop"
    )
    clock.advance(8)
    (stop,) = job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG)
    assert isinstance(stop, fx.Stop) and (stop.node_id, stop.attempt) == ("n1", 1)
    assert stop.grace_seconds == pytest.approx(12.0), "20 s of grace, 8 s of it gone"
    assert job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG) == [], (
        "one stop covers every rank of the node"
    )
    clock.advance(30)
    (late,) = job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG)
    assert isinstance(late, fx.Stop) and 0 < late.grace_seconds < 1, "past the grace: killed, but never a zero-grace forget"


def test_a_rank_still_launching_when_preempted_gets_a_stop_of_its_own_when_it_starts():
    """Its agent may have handled the stop before the launch, and then nothing would ever stop it."""
    clock, allocations = FakeClock(), Allocations()
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["train"], gpus=2))
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29500, world_size=2)
    placement.nodes.add(node_id="n1", node_rank=0, device_uuids=["GPU-0", "GPU-1"], first_rank=0, device_indexes=[0, 1])
    job_machine.place(entry, placement, now(clock), allocations, {}, CONFIG)
    job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG)
    job_machine.preempt(entry, "j-9", "preempted for j-9", now(clock), CONFIG)
    assert job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG) == [], (
        "rank 0 ran when the stop was sent: covered"
    )
    clock.advance(0.2)
    (stop,) = job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG)
    assert isinstance(stop, fx.Stop) and stop.grace_seconds == pytest.approx(19.8)
    assert job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG) == []


# -- the JobManager applying a pass's preemptions ----------------------------------------------


def cluster_with(gpus: int) -> ClusterView:
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    cluster.register(register_message(gpus))
    return cluster


def register_message(gpus: int, tasks: tuple[agent_pb2.TaskStatus, ...] = ()) -> agent_pb2.Register:
    message = agent_pb2.Register(node_id="n1", addresses=["127.0.0.1"], tasks=tasks)
    for index in range(gpus):
        message.devices.add(uuid=f"GPU-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
    return message


def preempting_scheduler(real_schedule):
    """A stand-in for the scheduler's victim selection: a pending job that does not fit preempts the
    lowest-priority running job below it (one that may be preempted and is not already stopping)."""

    def schedule(nodes, pending, config, **options):
        result = real_schedule(nodes, pending, config, **options)
        running = options.get("running", ())
        placed = {decision.job_id for decision in result.placed}
        candidates = sorted((job for job in running if job.preemptible and not job.stopping), key=lambda job: job.priority)
        preemptions = []
        for request in pending:
            if request.job_id not in placed and candidates and candidates[0].priority < request.priority:
                victim = candidates.pop(0)
                reason = f"preempted for {request.job_id} (priority {request.priority} > {victim.priority})"
                preemptions.append(scheduler.Preemption(victim.job_id, request.job_id, reason))
        return replace(result, preemptions=tuple(preemptions))

    return schedule


def outbox(manager: JobManager) -> list[agent_pb2.CoordinatorMessage]:
    session = manager.cluster.nodes["n1"].session
    assert isinstance(session, AgentSession)
    messages = []
    while not session.outbox.empty():
        messages.append(session.outbox.get_nowait())
    return messages


async def test_the_manager_applies_a_passs_preemptions_durably_before_stopping_anything(monkeypatch):
    monkeypatch.setattr(scheduler, "schedule", preempting_scheduler(scheduler.schedule))
    clock, store = FakeClock(), MemoryJobStore()
    manager = JobManager(cluster_with(2), store, clock=clock, preemption_grace_seconds=7.0)
    await manager.start()
    low = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, priority=0, max_restarts=0))
    assert await manager.schedule_pass() == [low]
    for rank in (0, 1):
        manager.on_task_status("n1", status(1, rank, RUNNING, job_id=low))
    outbox(manager)
    written_when_stopped: list[int] = []
    session = manager.cluster.nodes["n1"].session
    assert session is not None
    real_send = session.send

    def send(message):
        if message.WhichOneof("payload") == "stop_task":
            written_when_stopped.append(store.commits)
        return real_send(message)

    monkeypatch.setattr(session, "send", send)
    clock.advance(50)
    high = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, priority=10, non_preemptible=True))
    commits_before = store.commits
    assert await manager.schedule_pass() == [], "the high job waits for the victim's GPUs"
    (stop,) = [message.stop_task for message in outbox(manager) if message.WhichOneof("payload") == "stop_task"]
    assert (stop.job_id, stop.attempt, stop.grace_seconds) == (low, 1, 7.0)
    assert f"preempted for {high}" in stop.reason
    assert written_when_stopped and written_when_stopped[0] > commits_before, "the preemption was written before the stop"
    assert manager.restarts_by_reason == {"preempted": 1}
    victim = manager.get(low).job
    assert victim.state == job_pb2.JOB_STATE_PENDING and victim.restarts == 0
    assert manager.scheduling.request(manager.get(low)).attained_service_seconds == 2 * 50, (
        "requeued, it carries the GPU-seconds it ran (least-attained-service policies)"
    )
    assert [(job.job_id, job.stopping) for job in manager.scheduling.running_jobs()] == [(low, True)]
    assert await manager.schedule_pass() == [], "nothing is placed on the GPUs the victim still holds"
    assert not [m for m in outbox(manager) if m.WhichOneof("payload") == "stop_task"], "the victim is not preempted twice"
    for rank in (0, 1):
        manager.on_task_status("n1", status(1, rank, EXITED, code=143, job_id=low))
    assert await manager.schedule_pass() == [high]
    # The victim goes back to the queue and runs again once the high job is done: it uses no restart.
    for rank in (0, 1):
        manager.on_task_status("n1", status(1, rank, EXITED, job_id=high))
    assert manager.get(high).job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert await manager.schedule_pass() == [low]
    (launch,) = [
        m.launch_task for m in outbox(manager) if m.WhichOneof("payload") == "launch_task" and m.launch_task.job_id == low
    ]
    assert (launch.job_id, launch.attempt, launch.env["GPUORCH_RESTART_REASON"]) == (low, 2, "preempted")


async def test_a_preemption_survives_a_coordinator_restart_during_the_grace():
    clock, store = FakeClock(), MemoryJobStore()
    manager = JobManager(cluster_with(2), store, clock=clock, preemption_grace_seconds=20.0)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["t"], gpus=2, max_restarts=0))
    await manager.schedule_pass()
    for rank in (0, 1):
        manager.on_task_status("n1", status(1, rank, RUNNING, job_id=job_id))
    for write in manager.apply(
        job_machine.preempt(manager.get(job_id), "j-9", "preempted for j-9", manager.now(), manager.machine)
    ):
        await write
    clock.advance(5)
    # The coordinator restarts; the agent re-registers with both ranks still checkpointing.
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    restarted = JobManager(cluster, store, clock=clock, preemption_grace_seconds=20.0)
    await restarted.start()
    entry = restarted.get(job_id)
    assert entry.job.state == job_pb2.JOB_STATE_PENDING and entry.job.pending_restart_reason == "preempted"
    assert job_reasons.waiting_for_previous(entry) is not None, "its GPUs are held until the agent reports"
    register = register_message(2, tuple(status(1, rank, RUNNING, job_id=job_id) for rank in (0, 1)))
    cluster.register(register)
    restarted.on_register("n1", register)
    stops = [m.stop_task for m in outbox(restarted) if m.WhichOneof("payload") == "stop_task"]
    assert len(stops) == 1 and stops[0].grace_seconds == pytest.approx(15.0), "one stop, with what is left of the grace"
    assert await restarted.schedule_pass() == [], "still held"
    for rank in (0, 1):
        restarted.on_task_status("n1", status(1, rank, EXITED, code=0, job_id=job_id))
    assert entry.job.state == job_pb2.JOB_STATE_PENDING, "a rank that checkpointed and exited 0 is no success"
    assert await restarted.schedule_pass() == [job_id]
    assert (entry.job.attempt, entry.job.restarts, entry.job.attempts[-1].restart_reason) == (2, 0, "preempted")


# -- inside a rank -------------------------------------------------------------------------------


def test_a_rank_knows_its_attempt_before_was_preempted(monkeypatch):
    monkeypatch.setenv("GPUORCH_RESTART_REASON", "preempted")
    reason = worker.restart_reason()
    assert reason == worker.RestartReason("preempted", raw="preempted") and reason.preempted and reason.is_restart
    monkeypatch.setenv("GPUORCH_RESTART_REASON", "rank_exit:0:1")
    assert not worker.restart_reason().preempted


def test_stop_on_sigterm_turns_the_signal_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    try:
        stop = worker.stop_on_sigterm()
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5), "the process goes on, the event is set"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM (a stop sent again) is as harmless
        assert stop.is_set()
    finally:
        signal.signal(signal.SIGTERM, before)
        worker._stop_requested.clear()
