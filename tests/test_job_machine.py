"""One job's whole life through the pure job rules (coordinator/rules/job_machine.py) and the
in-memory store, on a fake clock: no processes, no gRPC, no event loop beyond the store's futures."""

from __future__ import annotations

import time

from coordinator import scheduler
from coordinator.model.cluster import Allocations
from coordinator.model.jobs import AttemptState, JobEntry
from coordinator.rules import effects as fx
from coordinator.rules import job_machine, job_reasons, job_rules
from coordinator.rules.recovery import RecoveryPolicy
from coordinator.store.api import StoredJob
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2

CONFIG = job_machine.MachineConfig(RecoveryPolicy(backoff_initial_seconds=5.0), stop_grace_seconds=3.0, checkpoint_root="/ckpt")
NODE = scheduler.NodeView(
    "n1",
    True,
    tuple(scheduler.GpuView(f"GPU-{i}", i, "H100", 80 << 30, 0, 0.0, 30.0, healthy=True, free=True) for i in range(2)),
)


def now(clock: FakeClock) -> job_machine.Now:
    return job_machine.Now(clock.wall(), clock.monotonic())


def placement_for(entry: JobEntry, allocations: Allocations) -> job_pb2.Placement:
    """What the scheduler decides for the job on one 2-GPU node, as the wire placement."""
    view = scheduler.NodeView(
        NODE.node_id, True, tuple(scheduler.GpuView(**{**_fields(g), "free": g.uuid not in allocations}) for g in NODE.gpus)
    )
    request = scheduler.JobRequest(entry.job.job_id, entry.job.spec.gpus)
    (decision,) = scheduler.schedule([view], [request], scheduler.SchedulerConfig(), now=0.0).placed
    placement = job_pb2.Placement(master_addr="10.0.0.1", master_port=29500, world_size=2)
    (share,) = decision.nodes
    placement.nodes.add(node_id=share.node_id, node_rank=0, device_uuids=share.gpu_uuids, first_rank=0, device_indexes=[0, 1])
    return placement


def _fields(gpu: scheduler.GpuView) -> dict:
    return {name: getattr(gpu, name) for name in scheduler.GpuView.__slots__}


def status(attempt: int, rank: int, state: int, code: int = 0, signum: int = 0) -> agent_pb2.TaskStatus:
    return agent_pb2.TaskStatus(job_id="j-1", attempt=attempt, rank=rank, state=state, exit_code=code, signal=signum)


RUNNING, EXITED = agent_pb2.TASK_STATE_RUNNING, agent_pb2.TASK_STATE_EXITED


async def test_one_jobs_whole_life_through_the_rules_on_a_fake_clock():
    started = time.perf_counter()
    clock, store, allocations = FakeClock(), MemoryJobStore(), Allocations()
    await store.open()

    async def persist(entry: JobEntry, effects: list) -> list:
        for effect in effects:
            if isinstance(effect, fx.Save):
                await store.save([StoredJob(entry.sequence, entry.job)])
        return effects

    # submit
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["train"], gpus=2, max_restarts=2))
    job_rules.validate_spec(spec)
    entry = JobEntry(
        1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING, submit_time=job_machine.stamp(clock.wall()))
    )
    await store.save([StoredJob(1, entry.job)])

    # place and launch
    effects = await persist(
        entry, job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    )
    assert fx.Save("j-1") in effects, "the placement is written before anything is launched"
    launches = [effect for effect in job_machine.launches(entry, CONFIG, allocations) if isinstance(effect, fx.Launch)]
    assert entry.job.state == job_pb2.JOB_STATE_RUNNING and entry.job.attempt == 1 and len(launches) == 1
    assert (
        launches[0].launch.env["GPUORCH_RESTART_REASON"] == "" and launches[0].launch.env["GPUORCH_CHECKPOINT_DIR"] == "/ckpt/j-1"
    )
    assert dict(allocations) == {"GPU-0": ("j-1", 1), "GPU-1": ("j-1", 1)}
    clock.advance(0.5)
    assert job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG) == []
    (all_started,) = job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG)
    assert all_started == fx.AllStarted("j-1", 0.5) and entry.current.state is AttemptState.RUNNING

    # a rank dies: its peer is stopped, and the job waits out its restart backoff
    clock.advance(60)
    effects = await persist(
        entry, job_machine.rank_reported(entry, "n1", status(1, 1, EXITED, signum=9), now(clock), allocations, CONFIG)
    )
    assert fx.Stop("n1", "j-1", 1, 3.0, "rank 1 on node n1 was killed by signal 9") in effects
    assert any(isinstance(effect, fx.AttemptFailed) and effect.restart and effect.kind == "rank_exit" for effect in effects)
    job = entry.job
    assert (job.state, job.restarts, job.pending_restart_reason) == (job_pb2.JOB_STATE_PENDING, 1, "rank_exit:1:137")
    assert job.reason == "restart 1 of 2 after rank_exit:1:137" and entry.not_before == clock.wall() + 5
    assert job_reasons.waiting_for_previous(entry) == "waiting for 1 rank(s) of attempt 1 to end"
    effects = job_machine.rank_reported(entry, "n1", status(1, 0, EXITED, signum=15), now(clock), allocations, CONFIG)
    assert fx.AttemptOver("n1", "j-1", 1) in effects and fx.Release("n1", 29500) in effects
    assert job_reasons.waiting_for_previous(entry) is None and dict(allocations) == {}
    stored = (await store.open()).jobs[0].job
    assert stored.state == job_pb2.JOB_STATE_PENDING and stored.pending_restart_reason == "rank_exit:1:137", (
        "durable while it waits"
    )

    # the backoff ends: restart, told why
    assert entry.not_before > clock.wall()
    clock.advance(5)
    assert entry.not_before <= clock.wall()
    effects = await persist(
        entry, job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    )
    (launch,) = [effect.launch for effect in job_machine.launches(entry, CONFIG, allocations) if isinstance(effect, fx.Launch)]
    assert (launch.attempt, launch.env["GPUORCH_RESTART_REASON"]) == (2, "rank_exit:1:137")
    assert job.pending_restart_reason == "" and not job.HasField("restart_not_before")

    # and it succeeds
    for rank in (0, 1):
        job_machine.rank_reported(entry, "n1", status(2, rank, RUNNING), now(clock), allocations, CONFIG)
    clock.advance(10)
    effects = job_machine.rank_reported(entry, "n1", status(2, 0, EXITED), now(clock), allocations, CONFIG)
    assert job.state == job_pb2.JOB_STATE_RUNNING
    effects = await persist(entry, job_machine.rank_reported(entry, "n1", status(2, 1, EXITED), now(clock), allocations, CONFIG))
    assert fx.Finished("j-1", job_pb2.JOB_STATE_SUCCEEDED, "all 2 ranks exited with code 0") in effects
    assert entry.attempts == {} and dict(allocations) == {}
    stored = (await store.open()).jobs[0].job
    assert (stored.state, stored.attempt, [a.restart_reason for a in stored.attempts]) == (
        job_pb2.JOB_STATE_SUCCEEDED,
        2,
        ["", "rank_exit:1:137"],
    )
    assert [a.end_reason for a in stored.attempts] == [
        "rank 1 on node n1 was killed by signal 9",
        "all 2 ranks exited with code 0",
    ]
    assert time.perf_counter() - started < 1.0


async def test_a_rank_of_an_attempt_the_coordinator_does_not_run_is_fenced():
    allocations = Allocations()
    (effect,) = job_machine.rank_reported(None, "n1", status(3, 0, RUNNING), job_machine.Now(0.0, 0.0), allocations, CONFIG)
    assert effect == fx.Fence("n1", "j-1", 3, 0, None, "fenced: attempt not run by the coordinator")


async def test_cancel_during_the_backoff_is_final_and_stored():
    clock, allocations = FakeClock(), Allocations()
    entry = JobEntry(
        1, job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["x"], gpus=2, max_restarts=1), state=job_pb2.JOB_STATE_PENDING)
    )
    job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    job_machine.rank_reported(entry, "n1", status(1, 0, EXITED, code=1), now(clock), allocations, CONFIG)
    assert entry.job.state == job_pb2.JOB_STATE_PENDING and entry.job.HasField("restart_not_before")
    effects = job_machine.cancel(entry, now(clock), CONFIG)
    assert fx.Save("j-1") in effects and entry.job.state == job_pb2.JOB_STATE_CANCELLED
    assert entry.job.pending_restart_reason == "" and not entry.job.HasField("restart_not_before")


async def test_an_attempt_that_fails_while_its_placement_is_written_ends_without_ever_launching():
    """A placement is launched only once it is durable. A GPU turning unhealthy during that write makes the job
    restart before any Launch was sent: no agent will ever report those ranks, so they end when the launch is
    skipped. Seen in the chaos test: the restart waited forever "for 2 rank(s) of attempt 2 to end"."""
    clock, allocations = FakeClock(), Allocations()
    entry = JobEntry(
        1, job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["x"], gpus=2, max_restarts=2), state=job_pb2.JOB_STATE_PENDING)
    )
    job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    job_machine.device_unhealthy(entry, "n1", "GPU-0", "XID 79", now(clock), CONFIG)  # while the write is in flight
    assert entry.job.state == job_pb2.JOB_STATE_PENDING and entry.job.restarts == 1
    effects = job_machine.launches(entry, CONFIG, allocations)
    assert not [effect for effect in effects if isinstance(effect, fx.Launch)], "nothing is launched for a job that restarts"
    assert fx.AttemptOver("n1", "j-1", 1) in effects and fx.Release("n1", 29500) in effects
    assert job_reasons.waiting_for_previous(entry) is None and dict(allocations) == {}
    assert [effect for effect in effects if isinstance(effect, fx.Wake)], "the restart waiting for those GPUs is woken"


async def test_a_job_cancelled_while_its_placement_is_written_gives_its_gpus_back():
    clock, allocations = FakeClock(), Allocations()
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=job_pb2.JobSpec(argv=["x"], gpus=2), state=job_pb2.JOB_STATE_PENDING))
    job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    job_machine.cancel(entry, now(clock), CONFIG)
    assert entry.job.state == job_pb2.JOB_STATE_CANCELLED and dict(allocations) != {}
    effects = job_machine.launches(entry, CONFIG, allocations)
    assert not [effect for effect in effects if isinstance(effect, fx.Launch)]
    assert entry.attempts == {} and dict(allocations) == {}, "a cancelled job never launched holds no GPU"


async def test_an_attempt_whose_first_rank_ended_before_the_last_one_started_is_all_started():
    """A quick rank 0 (its part done, exit 0) ends before rank 1 reports its start: every rank did start."""
    clock, allocations = FakeClock(), Allocations()
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["train"], gpus=2))
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    clock.advance(0.25)
    assert job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG) == []
    job_machine.rank_reported(entry, "n1", status(1, 0, EXITED), now(clock), allocations, CONFIG)
    clock.advance(0.25)
    (all_started,) = job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG)
    assert all_started == fx.AllStarted("j-1", 0.5) and entry.current.state is AttemptState.RUNNING
    assert job_machine.rank_reported(entry, "n1", status(1, 1, RUNNING), now(clock), allocations, CONFIG) == []


async def test_a_stale_running_report_of_an_ended_rank_does_not_count_it_as_running_again():
    """A report can arrive late (a Register listing the rank as it was): the rank's end stands."""
    clock, allocations = FakeClock(), Allocations()
    spec = job_rules.normalized(job_pb2.JobSpec(argv=["train"], gpus=2))
    entry = JobEntry(1, job_pb2.Job(job_id="j-1", spec=spec, state=job_pb2.JOB_STATE_PENDING))
    job_machine.place(entry, placement_for(entry, allocations), now(clock), allocations, {}, CONFIG)
    job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG)
    job_machine.rank_reported(entry, "n1", status(1, 0, EXITED), now(clock), allocations, CONFIG)
    assert job_machine.rank_reported(entry, "n1", status(1, 0, RUNNING), now(clock), allocations, CONFIG) == []
    assert entry.current.running == set() and 0 in entry.current.ended
