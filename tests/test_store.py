"""Every store behind coordinator/store/api.py (SQLite, memory, PostgreSQL), held to the same semantics;
each engine's own concerns after. The PostgreSQL ones run against a real server (tests/postgres_server.py)."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.store.api import StoredJob, StoreError
from coordinator.store.memory import MemoryJobStore
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import job_pb2
from tests.store_backends import BACKENDS, DURABLE_BACKENDS, StoreMaker


def job(sequence: int, state=job_pb2.JOB_STATE_PENDING) -> StoredJob:
    return StoredJob(sequence, job_pb2.Job(job_id=f"j-{sequence:06d}", state=state, spec=job_pb2.JobSpec(argv=["x"], gpus=1)))


@pytest.fixture(params=BACKENDS)
def reopen(request, tmp_path):
    """() -> the store as a restarted coordinator finds it (tests/store_backends.py)."""
    return StoreMaker(request.param, tmp_path, request)


@pytest.fixture(params=DURABLE_BACKENDS)
def durable(request, tmp_path):
    """() -> a store with a writer thread (SQLite, PostgreSQL), as a restarted coordinator finds it."""
    return StoreMaker(request.param, tmp_path, request)


async def test_saved_jobs_and_drains_survive_reopening(reopen):
    store = reopen()
    assert (await store.open()).jobs == []
    await store.save([job(1), job(2)], drains={"n1": "fan"})
    await store.save([job(1, job_pb2.JOB_STATE_SUCCEEDED)], drains={"n2": "x"})
    await store.save(drains={"n2": None})
    await store.close()
    reopened = reopen()
    state = await reopened.open()
    assert [(s.sequence, s.job.state) for s in state.jobs] == [(1, job_pb2.JOB_STATE_SUCCEEDED), (2, job_pb2.JOB_STATE_PENDING)]
    assert state.drains == {"n1": "fan"}
    await reopened.close()


async def test_every_open_has_a_higher_epoch(reopen):
    epochs = []
    for _ in range(3):
        store = reopen()
        epochs.append((await store.open()).epoch)
        await store.close()
    assert epochs[0] >= 1 and epochs == sorted(set(epochs)) and epochs[2] - epochs[0] == 2


async def test_a_saved_job_is_a_copy_of_the_job_as_it_was(reopen):
    store = reopen()
    await store.open()
    stored = job(1)
    write = store.save([stored])
    stored.job.state = job_pb2.JOB_STATE_RUNNING  # changed after the save was queued
    await write
    await store.close()
    reopened = reopen()
    assert (await reopened.open()).jobs[0].job.state == job_pb2.JOB_STATE_PENDING
    await reopened.close()


async def test_a_failed_write_fails_its_future():
    store = MemoryJobStore()
    await store.open()
    store.fail_next = 1
    with pytest.raises(StoreError, match="write failed"):
        await store.save([job(1)])
    await store.save([job(2)])
    assert [stored.sequence for stored in (await store.open()).jobs] == [2]


async def test_a_write_the_database_refuses_fails_its_future_and_the_next_succeeds(durable):
    store = durable()
    await store.open()
    await store.save([StoredJob(1, owned(1, "alice"), "req-1")])
    with pytest.raises(StoreError, match="write failed"):  # the same owner's request id twice
        await store.save([StoredJob(2, owned(2, "alice"), "req-1")])
    await store.save([job(3)])
    await store.close()
    reopened = durable()
    assert [stored.sequence for stored in (await reopened.open()).jobs] == [1, 3]
    await reopened.close()


async def test_concurrent_saves_share_commits(durable):
    store = durable()
    await store.open()
    await asyncio.gather(*(store.save([job(i)]) for i in range(1, 501)))
    assert store.commits < 100, f"{store.commits} commits for 500 concurrent saves: writes are not grouped"
    await store.close()
    reopened = durable()
    assert len((await reopened.open()).jobs) == 500
    await reopened.close()


async def test_client_request_ids_are_kept(reopen):
    store = reopen()
    await store.open()
    await store.save([StoredJob(1, job(1).job, "req-1")])
    await store.close()
    reopened = reopen()
    assert (await reopened.open()).jobs[0].client_request_id == "req-1"
    await reopened.close()


def owned(sequence: int, owner: str) -> job_pb2.Job:
    return job_pb2.Job(job_id=f"j-{sequence:06d}", spec=job_pb2.JobSpec(argv=["x"], gpus=1, owner=owner))


async def test_a_request_id_is_unique_per_owner_also_in_a_store_made_when_it_was_unique_overall(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (sequence INTEGER PRIMARY KEY, job_id TEXT NOT NULL UNIQUE, state INTEGER NOT NULL,"
        " owner TEXT NOT NULL, client_request_id TEXT, data BLOB NOT NULL);"
        "CREATE UNIQUE INDEX jobs_by_request ON jobs(client_request_id) WHERE client_request_id != '';"
    )
    old.close()
    store = SqliteJobStore(path)
    await store.open()
    await store.save([StoredJob(1, owned(1, "alice"), "req-1"), StoredJob(2, owned(2, "bob"), "req-1")])
    await store.close()
    reopened = SqliteJobStore(path)
    assert [(stored.job.spec.owner, stored.client_request_id) for stored in (await reopened.open()).jobs] == [
        ("alice", "req-1"),
        ("bob", "req-1"),
    ]
    await reopened.close()


async def test_a_group_commit_wakes_the_event_loop_once(durable):
    """The writer thread settles every write of one commit with one call into the loop, not one per write:
    each such call is a wake-up of the loop (a write to its self-pipe) and a callback to run."""
    store = durable()
    await store.open()
    loop = asyncio.get_running_loop()
    calls_into_loop = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args, **kwargs):
        nonlocal calls_into_loop
        calls_into_loop += 1
        return call_soon_threadsafe(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        commits_before = store.commits
        await asyncio.gather(*(store.save([job(i)]) for i in range(1, 201)))
    finally:
        del loop.call_soon_threadsafe
    assert calls_into_loop == store.commits - commits_before < 200
    await store.close()


async def test_saves_made_while_the_writer_is_busy_share_one_write(durable):
    """Saves queued before the writer thread takes them join one write: one future (and one settle) for all."""
    store = durable()
    await store.open()
    writes = [store.save([job(i)]) for i in range(1, 201)]
    assert len({id(write) for write in writes}) < 100, "each save queued a write of its own"
    await asyncio.gather(*writes)
    await store.close()
    reopened = durable()
    assert [stored.sequence for stored in (await reopened.open()).jobs] == list(range(1, 201))
    await reopened.close()
