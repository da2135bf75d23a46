"""The coordinator's job history: ended jobs beyond the bound leave memory (only once their end is durable),
and every read that took an ended job from memory still finds it in the store; ListJobs merges the two."""

from __future__ import annotations

import asyncio
import random

import pytest

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_history import prune_history, prune_once
from coordinator.control.job_manager import JobFinished, JobManager, JobNotFound
from coordinator.rules.liveness import LivenessPolicy
from coordinator.store.api import JobQuery, StoredJob, StoreError
from coordinator.store.memory import MemoryJobStore
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import job_pb2

CANCELLED, PENDING = job_pb2.JOB_STATE_CANCELLED, job_pb2.JOB_STATE_PENDING
DAY = 86400.0


class HeldStore(MemoryJobStore):
    """A memory store whose writes, while `holding`, stay in flight (not in the store) until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.held: list[tuple[list[StoredJob], asyncio.Future[None]]] = []

    def save(self, jobs=(), drains=None):
        if not self.holding:
            return super().save(jobs, drains)
        copies = [
            StoredJob(stored.sequence, job_pb2.Job.FromString(stored.job.SerializeToString()), stored.client_request_id)
            for stored in jobs
        ]
        write = asyncio.get_running_loop().create_future()
        self.held.append((copies, write))
        return write

    def release(self, count: int | None = None) -> None:
        taken, self.held = self.held[:count], self.held[len(self.held[:count]) :]
        for copies, write in taken:
            super().save(copies)
            write.set_result(None)


def spec(owner: str = "alice", name: str = "train") -> job_pb2.JobSpec:
    return job_pb2.JobSpec(argv=["train"], gpus=1, owner=owner, name=name)


async def started(store, recent_ended_jobs: int, clock=None) -> JobManager:
    clock = clock or FakeClock()
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    manager = JobManager(cluster, store, clock=clock, recent_ended_jobs=recent_ended_jobs)
    await manager.start()
    return manager


async def every_page(manager: JobManager, query: JobQuery | None = None, page_size: int = 0) -> list[job_pb2.Job]:
    found, token = await manager.list(query, page_size)
    while token:
        page, token = await manager.list(query, page_size, token)
        assert page, "a page with a next token is never empty"
        found += page
    return found


async def test_ended_jobs_beyond_the_bound_are_read_from_the_store():
    store = MemoryJobStore()
    manager = await started(store, recent_ended_jobs=2)
    ids = [await manager.submit(spec(), client_request_id=f"r{n}") for n in range(5)]
    for job_id in ids:
        await manager.cancel(job_id)
    await asyncio.sleep(0)
    assert [job_id for job_id in ids if job_id in manager.jobs] == ids[3:]
    old = await manager.find(ids[0])
    assert old.job.state == CANCELLED and old.job.job_id == ids[0]
    with pytest.raises(JobNotFound):
        await manager.find("j-999999-zzzzzz")
    with pytest.raises(JobFinished, match="already CANCELLED"):
        await manager.cancel(ids[0])
    with pytest.raises(JobFinished):
        await manager.set_priority(ids[1], 5)
    assert await manager.submit(spec(), client_request_id="r0") == ids[0]  # idempotent, though no longer in memory
    assert [job.state for job in [job async for job in manager.history.watch(old)]] == [CANCELLED]
    assert [job.job_id for job in await every_page(manager, page_size=2)] == ids[::-1]
    listed = await every_page(manager, JobQuery(states=frozenset({CANCELLED})), page_size=1)
    assert [job.job_id for job in listed] == ids[::-1]


async def test_a_job_whose_end_is_being_written_stays_in_memory_and_is_listed_once():
    store = HeldStore()
    manager = await started(store, recent_ended_jobs=0)
    earlier = await manager.submit(spec())
    await manager.cancel(earlier)
    assert earlier not in manager.jobs  # its end was durable: it left memory at once
    job_id = await manager.submit(spec())
    store.holding = True
    cancelling = asyncio.create_task(manager.cancel(job_id))
    await asyncio.sleep(0.01)
    assert not cancelling.done() and job_id in manager.jobs, "it leaves memory only once the store has its end"
    assert (await store.get(job_id)).job.state == PENDING  # what the store still says
    listed = await every_page(manager, JobQuery(owner="alice"), page_size=1)
    assert [(job.job_id, job.state) for job in listed] == [(job_id, CANCELLED), (earlier, CANCELLED)]
    assert await every_page(manager, JobQuery(states=frozenset({PENDING}))) == []
    store.release()
    await cancelling
    assert job_id not in manager.jobs
    listed = await every_page(manager, JobQuery(owner="alice"))
    assert [(job.job_id, job.state) for job in listed] == [(job_id, CANCELLED), (earlier, CANCELLED)]


async def test_a_failed_final_write_keeps_the_job_in_memory():
    store = MemoryJobStore()
    manager = await started(store, recent_ended_jobs=0)
    job_id = await manager.submit(spec())
    store.fail_next = 1
    with pytest.raises(StoreError):
        await manager.cancel(job_id)  # the write fails; the job is cancelled in memory only
    await asyncio.sleep(0)
    assert manager.jobs[job_id].job.state == CANCELLED
    assert [job.state for job in (await manager.list())[0]] == [CANCELLED]


async def test_pages_list_every_job_once_while_jobs_end_and_writes_are_in_flight():
    rng = random.Random(7)
    store = HeldStore()
    manager = await started(store, recent_ended_jobs=3)
    ids = [await manager.submit(spec(owner=rng.choice(["alice", "bob"]))) for _ in range(40)]
    store.holding = True
    cancels = []
    for _ in range(30):  # ends land while pages are being read; some writes stay in flight across pages
        for query in (JobQuery(), JobQuery(owner="bob"), JobQuery(states=frozenset({CANCELLED}))):
            seen, token = [], ""
            while True:
                page, token = await manager.list(query, rng.randint(1, 7), token)
                seen += page
                if rng.random() < 0.5:
                    victim = rng.choice(ids)
                    if not manager.jobs.get(victim) or not manager.jobs[victim].final:
                        cancels.append(asyncio.create_task(manager.cancel(victim)))
                        await asyncio.sleep(0)
                if rng.random() < 0.5:
                    store.release(rng.randint(0, 3))
                    await asyncio.sleep(0)
                if not token:
                    break
            listed = [job.job_id for job in seen]
            assert len(listed) == len(set(listed)), f"a job appeared twice: {query}"
            if query.owner == "":
                assert sorted(listed) == sorted(ids) if not query.states else set(listed) <= set(ids)
            assert listed == sorted(listed, reverse=True)
    store.holding = False
    store.release()
    await asyncio.gather(*cancels, return_exceptions=True)
    truth = {job_id: (await manager.find(job_id)).job.state for job_id in ids}
    cancelled = [job.job_id for job in await every_page(manager, JobQuery(states=frozenset({CANCELLED})), page_size=4)]
    assert cancelled == sorted((job_id for job_id, state in truth.items() if state == CANCELLED), reverse=True)
    assert len(manager.history.ended) <= 3


async def test_a_restarted_manager_keeps_few_ended_jobs_and_still_finds_the_rest(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.db")
    manager = await started(store, recent_ended_jobs=100)
    ids = [await manager.submit(spec(name=f"n{n}"), client_request_id=f"r{n}") for n in range(6)]
    for job_id in ids[:5]:
        await manager.cancel(job_id)
    await store.close()
    restarted = await started(SqliteJobStore(tmp_path / "jobs.db"), recent_ended_jobs=2)
    assert sorted(restarted.jobs) == sorted([ids[3], ids[4], ids[5]])
    assert not restarted.history.complete
    assert (await restarted.find(ids[0])).job.spec.name == "n0"
    assert await restarted.submit(spec(), client_request_id="r1") == ids[1]
    assert [job.job_id for job in await every_page(restarted, page_size=2)] == ids[::-1]
    await restarted.store.close()


async def test_retention_prunes_at_once_and_every_interval_on_the_injected_clock():
    clock = FakeClock()
    store = MemoryJobStore()
    manager = await started(store, recent_ended_jobs=10, clock=clock)
    old = await manager.submit(spec())
    await manager.cancel(old)
    clock.advance(2 * DAY)
    recent = await manager.submit(spec())
    await manager.cancel(recent)
    assert await prune_once(manager, clock, retention_seconds=DAY) == 1
    assert old not in manager.jobs and recent in manager.jobs
    with pytest.raises(JobNotFound):
        await manager.find(old)
    sleeps: list[float] = []
    kept: list[int] = []

    async def sleep(seconds: float) -> None:  # the hour passes on the fake clock
        sleeps.append(seconds)
        kept.append(len(store.jobs))
        clock.advance(seconds)
        if len(sleeps) == 26:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await prune_history(manager, clock, retention_seconds=DAY, sleep=sleep)
    assert sleeps == [3600.0] * 26
    # Kept while it ended less than a day ago (the 25th pruning is a day after it ended: not before), gone at the 26th.
    assert kept == [1] * 25 + [0]
    assert await store.get(recent) is None and recent not in manager.jobs
