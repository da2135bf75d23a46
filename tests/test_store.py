from __future__ import annotations

import asyncio

from coordinator.store.sqlite import SqliteJobStore, StoredJob
from gpuorch.v1 import job_pb2


def job(sequence: int, state=job_pb2.JOB_STATE_PENDING) -> StoredJob:
    return StoredJob(sequence, job_pb2.Job(job_id=f"j-{sequence:06d}", state=state, spec=job_pb2.JobSpec(argv=["x"], gpus=1)))


async def test_saved_jobs_and_settings_survive_reopening(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.db")
    assert (await store.open()).jobs == []
    await store.save([job(1), job(2)], settings={"drain:n1": "fan"})
    await store.save([job(1, job_pb2.JOB_STATE_SUCCEEDED)], settings={"drain:n2": "x"})
    await store.save(settings={"drain:n2": None})
    await store.close()
    reopened = SqliteJobStore(tmp_path / "jobs.db")
    state = await reopened.open()
    assert [(s.sequence, s.job.state) for s in state.jobs] == [(1, job_pb2.JOB_STATE_SUCCEEDED), (2, job_pb2.JOB_STATE_PENDING)]
    assert state.settings == {"drain:n1": "fan"}
    await reopened.close()


async def test_concurrent_saves_share_commits(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.db")
    await store.open()
    await asyncio.gather(*(store.save([job(i)]) for i in range(1, 501)))
    assert store.commits < 100, f"{store.commits} commits for 500 concurrent saves: writes are not grouped"
    await store.close()
    reopened = SqliteJobStore(tmp_path / "jobs.db")
    assert len((await reopened.open()).jobs) == 500
    await reopened.close()


async def test_client_request_ids_are_kept(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.db")
    await store.open()
    await store.save([StoredJob(1, job(1).job, "req-1")])
    await store.close()
    reopened = SqliteJobStore(tmp_path / "jobs.db")
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
    assert [(stored.job.spec.owner, stored.client_request_id) for stored in (await reopened.open()).jobs] == [("alice", "req-1"), ("bob", "req-1")]
    await reopened.close()
