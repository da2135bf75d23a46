"""The JobManager in-process, with a real cluster view and store and no network: what agents
would receive is read from their sessions' outboxes, and what they would answer is fed back."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager
from coordinator.rules.effects import Notify, Save, Wake
from coordinator.rules.liveness import LivenessPolicy
from coordinator.store.memory import MemoryJobStore
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import agent_pb2, job_pb2


def register(cluster: ClusterView, node_id: str, gpus: int = 1):
    message = agent_pb2.Register(node_id=node_id, addresses=["127.0.0.1"])
    for index in range(gpus):
        message.devices.add(uuid=f"GPU-{node_id}-{index}", index=index, name="H100 80GB", memory_total_bytes=80 * 2**30)
    _, session, _ = cluster.register(message)
    return session


def sent(session, kind: str) -> list:
    """What the coordinator queued for one agent, of one kind, taken out of its outbox."""
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message.WhichOneof("payload") == kind:
            found.append(getattr(message, kind))
    return found


async def test_only_the_node_asked_for_a_log_may_answer_it(tmp_path):
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    holder, other = register(cluster, "holder"), register(cluster, "other")
    manager = JobManager(cluster, SqliteJobStore(tmp_path / "jobs.db"))
    await manager.start()
    try:
        job_id = await manager.submit(
            job_pb2.JobSpec(argv=["train"], gpus=1, requirements=job_pb2.JobRequirements(gpu_model="H100"))
        )
        assert await manager.schedule_pass() == [job_id]
        node_id = manager.get(job_id).job.placement.nodes[0].node_id
        asked, bystander = (holder, other) if node_id == "holder" else (other, holder)
        sent(asked, "launch_task")
        reading = asyncio.create_task(manager.read_log(job_id, rank=0, attempt=0, offset=0))
        await asyncio.sleep(0)
        (request,) = sent(asked, "read_logs")
        assert sent(bystander, "read_logs") == []
        forged = agent_pb2.LogChunk(request_id=request.request_id, data=b"forged output\n", file_size=14)
        manager.on_log_chunk("other" if node_id == "holder" else "holder", forged)
        await asyncio.sleep(0)
        assert not reading.done(), "a chunk from a node that was not asked is ignored"
        manager.on_log_chunk(node_id, agent_pb2.LogChunk(request_id=request.request_id, data=b"real output\n", file_size=12))
        assert (await asyncio.wait_for(reading, 5)).data == b"real output\n"
    finally:
        await manager.store.close()


async def test_a_failed_write_that_nobody_awaits_is_seen():
    """A restart's write is queued from a rank's report (no one awaits it there): its failure is still
    logged and counted, not lost in a future nobody looks at."""
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    register(cluster, "n1")
    store = MemoryJobStore()
    manager = JobManager(cluster, store)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=1))
    assert await manager.schedule_pass() == [job_id]
    store.fail_next = 1
    failed = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED, exit_code=1)
    manager.on_task_status("n1", failed)
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_PENDING
    for _ in range(3):
        await asyncio.sleep(0)
    assert manager.writes.failures == 1


async def test_one_event_makes_one_store_write():
    """The effects of one event may save a job more than once, and several jobs: they go as one write, each job
    once, queued before the event's handler returns; that write is what the caller may await."""
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    register(cluster, "n1")
    store = MemoryJobStore()
    manager = JobManager(cluster, store)
    await manager.start()
    first = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    second = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    manager.scheduling.wake.clear()
    commits = store.commits
    write = manager.apply([Save(second), Wake(), Notify(first), Save(first), Wake(), Save(second)])
    assert store.commits == commits + 1, "queued at once, as one write"
    assert write is not None
    await write
    assert manager.scheduling.wake.is_set()
    assert manager.apply([Notify(first)]) is None
    assert store.commits == commits + 1


async def test_a_restarting_job_that_waits_again_says_why_it_restarts():
    """A pending job's reason is written only when the scheduler's reason for it changes; one that was placed
    and comes back to the queue shows its restart, even when it waits for the same thing as before."""
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    register(cluster, "n1")
    manager = JobManager(cluster, MemoryJobStore())
    await manager.start()
    holder = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    assert await manager.schedule_pass() == [holder]
    waiter = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, max_restarts=1))
    assert await manager.schedule_pass() == []
    first_wait = manager.get(waiter).job.reason
    assert first_wait and "restart" not in first_wait
    assert await manager.schedule_pass() == []
    assert manager.get(waiter).job.reason == first_wait
    ended = agent_pb2.TaskStatus(job_id=holder, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED, exit_code=0)
    manager.on_task_status("n1", ended)
    assert await manager.schedule_pass() == [waiter]
    holder_again = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, priority=5))
    failed = agent_pb2.TaskStatus(job_id=waiter, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED, exit_code=1)
    manager.on_task_status("n1", failed)
    assert await manager.schedule_pass() == [holder_again]
    reason = manager.get(waiter).job.reason
    assert reason.startswith("restart 1 of 1 after "), reason
    assert reason.endswith(first_wait.rsplit(";", 1)[-1].strip()), (reason, first_wait)


async def test_hang_checks_look_at_running_jobs_only_and_still_find_a_hang():
    """The manager keeps an index of RUNNING jobs (hang checks ran over every job ever submitted, each pass)."""
    from gpuorch.clock import FakeClock

    clock = FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    register(cluster, "n1", gpus=2)
    manager = JobManager(cluster, MemoryJobStore(), clock=clock)
    await manager.start()
    quick = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    watched = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, progress_timeout_seconds=5))
    assert sorted(await manager.schedule_pass()) == sorted([quick, watched])
    assert set(manager.running) == {quick, watched}
    done = agent_pb2.TaskStatus(job_id=quick, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED, exit_code=0)
    manager.on_task_status("n1", done)
    assert manager.get(quick).job.state == job_pb2.JOB_STATE_SUCCEEDED
    assert set(manager.running) == {watched}
    clock.advance(6)
    manager.detect_hangs()
    assert manager.get(watched).job.state == job_pb2.JOB_STATE_FAILED
    assert "hang" in manager.get(watched).job.reason
    assert manager.running == {}


async def test_fair_share_usage_settled_as_jobs_end_equals_usage_read_from_every_job():
    """owner_usage adds final jobs once, as they end, instead of rereading every job ever held each pass; the
    sums agree with the decayed usage of every attempt of every job."""
    import random

    from coordinator import scheduler
    from coordinator.control.scheduling_loop import FAIR_SHARE_HALF_LIFE_SECONDS
    from gpuorch.clock import FakeClock

    def everything(now: float) -> dict[str, float]:
        intervals = [
            (
                entry.job.spec.owner,
                attempt.placement.world_size,
                attempt.start_time.ToNanoseconds() / 1e9,
                attempt.end_time.ToNanoseconds() / 1e9 if attempt.HasField("end_time") else now,
            )
            for entry in manager.jobs.values()
            for attempt in entry.job.attempts
        ]
        return scheduler.decayed_usage(intervals, now, FAIR_SHARE_HALF_LIFE_SECONDS)

    rng = random.Random(5)
    clock = FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    register(cluster, "n1", gpus=4)
    manager = JobManager(cluster, MemoryJobStore(), config=scheduler.SchedulerConfig(policy="fair_share"), clock=clock)
    await manager.start()
    mixed = 0
    for step in range(60):
        if rng.random() < 0.6:
            await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=rng.choice((1, 2)), owner=rng.choice(("ann", "bob", "cy"))))
        await manager.schedule_pass()
        for job_id in list(manager.running):
            if rng.random() < 0.3:
                entry = manager.get(job_id)
                for rank in range(entry.job.placement.world_size):
                    node = entry.job.placement.nodes[0].node_id
                    status = agent_pb2.TaskStatus(
                        job_id=job_id, attempt=entry.job.attempt, rank=rank, state=agent_pb2.TASK_STATE_EXITED, exit_code=0
                    )
                    manager.on_task_status(node, status)
        clock.advance(rng.choice((1.0, 60.0, 1800.0)))
        mixed += bool(manager.running) and any(entry.final for entry in manager.jobs.values())
        expected, got = everything(clock.wall()), manager.scheduling.owner_usage(clock.wall())
        assert got.keys() == expected.keys(), step
        for owner, used in expected.items():
            assert got[owner] == pytest.approx(used, rel=1e-9, abs=1e-9), (step, owner)
    assert mixed > 10, "running and final jobs were summed together"


class SlowStore(MemoryJobStore):
    """Writes that become durable only when the test says so: what a coordinator killed mid-write would lose."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: list[asyncio.Future[None]] = []
        self.slow = False

    def save(self, jobs=(), drains=None):
        done = super().save(jobs, drains)
        if not self.slow:
            return done
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight.append(held)
        return held


async def test_an_agent_forgets_an_ended_attempt_only_once_the_jobs_end_is_durable():
    """Told to forget an attempt, the agent stops listing its ranks' exits. Were that sent before the job's end is
    in the store, a coordinator killed in between would restart with the job RUNNING, hear the agent re-register
    without the rank, judge it lost and run a job that succeeded a second time (seen in the array e2e test)."""
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    session = register(cluster, "n1")
    store = SlowStore()
    manager = JobManager(cluster, store)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    assert await manager.schedule_pass() == [job_id]
    sent(session, "forget_attempt")
    store.slow = True
    for state in (agent_pb2.TASK_STATE_RUNNING, agent_pb2.TASK_STATE_EXITED):
        manager.on_task_status("n1", agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=0, state=state))
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_SUCCEEDED
    await asyncio.sleep(0)
    assert sent(session, "forget_attempt") == [], "not while the job's end is not durable"
    assert store.in_flight, "its end is being written"
    for write in store.in_flight:
        write.set_result(None)
    await asyncio.sleep(0)
    (forget,) = sent(session, "forget_attempt")
    assert (forget.job_id, forget.attempt) == (job_id, 1)


async def test_a_launch_lost_with_its_stream_is_sent_again_when_the_agent_re_registers_without_it():
    """The placement was durable and the launch sent, but the stream broke before the agent read it: the agent
    re-registers knowing nothing of the attempt. It never ran, so it has not failed: the launch goes again on the
    new stream (the agent starts a rank at most once per attempt), no restart used."""
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    first = register(cluster, "n1")
    manager = JobManager(cluster, MemoryJobStore())
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    assert await manager.schedule_pass() == [job_id]
    assert len(sent(first, "launch_task")) == 1
    second = register(cluster, "n1")
    manager.on_register("n1", agent_pb2.Register(node_id="n1"))
    (again,) = sent(second, "launch_task")
    assert (again.job_id, again.attempt, [rank.rank for rank in again.ranks]) == (job_id, 1, [0])
    job = manager.get(job_id).job
    assert (job.state, job.attempt, job.restarts) == (job_pb2.JOB_STATE_RUNNING, 1, 0)


async def test_a_coordinator_killed_before_its_launch_was_sent_launches_it_after_its_restart():
    """Killed between the placement's write and the launch: restarted, it finds the attempt RUNNING in the store,
    and the agent re-registers without it. Before, the rank was judged killed (signal 9) and a job with no
    restarts left FAILED without ever having run (seen in the e2e tests under load)."""
    store = MemoryJobStore()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    register(cluster, "n1")
    manager = JobManager(cluster, store)
    await manager.start()
    job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1))
    assert await manager.schedule_pass() == [job_id]  # its launch is lost with the process
    restarted_cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    restarted = JobManager(restarted_cluster, store)
    await restarted.start()
    session = register(restarted_cluster, "n1")
    restarted.on_register("n1", agent_pb2.Register(node_id="n1"))
    (again,) = sent(session, "launch_task")
    assert (again.job_id, again.attempt) == (job_id, 1)
    job = restarted.get(job_id).job
    assert (job.state, job.attempt, job.restarts) == (job_pb2.JOB_STATE_RUNNING, 1, 0)
    running = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=0, state=agent_pb2.TASK_STATE_RUNNING)
    restarted.on_task_status("n1", running)
    restarted.on_task_status("n1", agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED))
    assert restarted.get(job_id).job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_after_a_pass_the_scheduling_loop_rests_as_long_as_the_pass_took():
    """A burst of wakes (2,000 nodes registering into 2,000 queued jobs: each node wakes a pass) ran passes back to
    back; each holds the event loop, so heartbeats went unread until healthy nodes were declared down
    (bench/heartbeats.py --progress). Passes must leave the loop at least half its time."""
    from gpuorch.clock import FakeClock

    clock = FakeClock()  # the loop times its passes on the manager's clock: the stand-in pass moves it
    manager = JobManager(
        ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock), MemoryJobStore(), clock=clock
    )
    loop = manager.scheduling
    starts: list[float] = []

    async def pass_that_takes_a_fifth_of_a_second() -> list[str]:
        starts.append(asyncio.get_running_loop().time())
        clock.advance(0.2)
        loop.wake.set()  # something always wants another pass
        return []

    loop.step = pass_that_takes_a_fifth_of_a_second  # type: ignore[method-assign]
    loop.wake.set()
    running = asyncio.create_task(loop.run())
    await asyncio.sleep(1.0)
    running.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert 3 <= len(starts) <= 7, starts
    assert min(gaps) >= 0.19, gaps


async def test_the_scheduling_loop_keeps_nothing_of_a_job_that_left_memory():
    """Under fair_share the loop used to remember every job whose usage it had settled, for the coordinator's life."""
    from coordinator import scheduler
    from coordinator.control.scheduling_loop import FAIR_SHARE_HALF_LIFE_SECONDS
    from gpuorch.clock import FakeClock

    clock = FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    register(cluster, "n1", gpus=2)
    config = scheduler.SchedulerConfig(policy="fair_share")
    manager = JobManager(cluster, MemoryJobStore(), config=config, clock=clock, recent_ended_jobs=2)
    await manager.start()
    started = clock.wall()
    ended = []
    for _ in range(8):
        job_id = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="ann"))
        assert await manager.schedule_pass() == [job_id]
        clock.advance(60.0)
        status = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED)
        manager.on_task_status("n1", status)
        ended.append(job_id)
        await asyncio.sleep(0)  # the end's write lands: the job may leave memory
    gone = [job_id for job_id in ended if job_id not in manager.jobs]
    assert len(gone) == 6
    for name, value in vars(manager.scheduling).items():
        if isinstance(value, (set, dict, frozenset)):
            assert not set(gone) & set(value), f"SchedulingLoop.{name} still holds jobs that left memory"
    # Their usage stays counted, once each.
    assert manager.scheduling.owner_usage(clock.wall())["ann"] == pytest.approx(
        scheduler.decayed_usage(
            [("ann", 1, started + 60.0 * n, started + 60.0 * (n + 1)) for n in range(8)],
            clock.wall(),
            FAIR_SHARE_HALF_LIFE_SECONDS,
        )["ann"]
    )
