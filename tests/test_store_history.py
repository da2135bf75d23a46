"""Job history in every store: query, get, find_request, prune and what open returns, held to one contract.

A backend is one entry of tests/store_backends.BACKENDS (SQLite, memory, PostgreSQL): every test here runs against each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest

from coordinator.store import api
from coordinator.store.api import JobQuery, JobStore, StoredJob
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import job_pb2
from tests.store_backends import BACKENDS, StoreMaker

DAY = 86400.0
T0 = 1_800_000_000.0
PENDING, RUNNING = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path) -> Callable[[], JobStore]:
    """() -> a store of the backend; the same backing data every call (a restarted coordinator's view)."""
    return StoreMaker(request.param, tmp_path, request)


def stored(sequence: int, state=SUCCEEDED, owner="alice", submitted=T0, ended=0.0, request_id="", name="train") -> StoredJob:
    job = job_pb2.Job(
        job_id=f"j-{sequence:06d}-abcdef", state=state, spec=job_pb2.JobSpec(argv=["x"], gpus=1, owner=owner, name=name)
    )
    job.submit_time.FromNanoseconds(int(submitted * 1e9))
    if ended:
        job.end_time.FromNanoseconds(int(ended * 1e9))
    return StoredJob(sequence, job, request_id)


def sequences(found: list[StoredJob]) -> list[int]:
    return [job.sequence for job in found]


@pytest.fixture
async def history_store(store_factory):
    """Ten jobs over ten days: alice the even ones, bob the odd; 9 and 10 still pending/running; 3 and 6 failed."""
    store = store_factory()
    await store.open()
    jobs = []
    for n in range(1, 11):
        state = PENDING if n == 10 else RUNNING if n == 9 else FAILED if n in (3, 6) else SUCCEEDED
        ended = 0.0 if n >= 9 else T0 + n * DAY + 3600
        jobs.append(stored(n, state, "alice" if n % 2 == 0 else "bob", T0 + n * DAY, ended, request_id=f"r{n}"))
    await store.save(jobs)
    yield store
    await store.close()


async def test_query_filters_by_owner_and_state_newest_first(history_store):
    assert sequences(await history_store.query(JobQuery())) == list(range(10, 0, -1))
    assert sequences(await history_store.query(JobQuery(owner="alice"))) == [10, 8, 6, 4, 2]
    assert sequences(await history_store.query(JobQuery(states=frozenset({FAILED})))) == [6, 3]
    assert sequences(await history_store.query(JobQuery(owner="bob", states=frozenset({FAILED, RUNNING})))) == [9, 3]
    assert await history_store.query(JobQuery(owner="carol")) == []


async def test_query_window_selects_jobs_in_the_system_at_some_time_inside_it(history_store):
    # Job n ran from day n to day n + 1 hour; 9 and 10 have not ended.
    window = JobQuery(active_since=T0 + 4 * DAY + 1800, active_until=T0 + 6 * DAY)
    assert sequences(await history_store.query(window)) == [6, 5, 4]
    assert sequences(await history_store.query(JobQuery(active_since=T0 + 8 * DAY + 3601))) == [10, 9]
    assert sequences(await history_store.query(JobQuery(active_until=T0 + 2 * DAY))) == [2, 1]
    assert sequences(
        await history_store.query(JobQuery(owner="alice", active_since=T0 + 5 * DAY, active_until=T0 + 8 * DAY))
    ) == [8, 6]


async def test_query_pages_below_a_sequence(history_store):
    first = await history_store.query(JobQuery(limit=4))
    assert sequences(first) == [10, 9, 8, 7]
    second = await history_store.query(JobQuery(limit=4, below_sequence=first[-1].sequence))
    assert sequences(second) == [6, 5, 4, 3]
    assert sequences(await history_store.query(JobQuery(limit=4, below_sequence=3))) == [2, 1]
    assert sequences(
        await history_store.query(JobQuery(owner="bob", states=frozenset({SUCCEEDED, FAILED}), limit=2, below_sequence=7))
    ) == [5, 3]


async def test_query_returns_whole_jobs(history_store):
    (found,) = await history_store.query(JobQuery(owner="alice", limit=1, below_sequence=9))
    assert found.job.job_id == "j-000008-abcdef" and found.job.spec.owner == "alice" and found.client_request_id == "r8"


async def test_bad_queries_are_refused_naming_the_field(history_store):
    with pytest.raises(ValueError, match="limit"):
        await history_store.query(JobQuery(limit=0))
    with pytest.raises(ValueError, match="active_until is before active_since"):
        await history_store.query(JobQuery(active_since=T0 + DAY, active_until=T0))


async def test_get_and_find_request(history_store):
    assert (await history_store.get("j-000003-abcdef")).job.state == FAILED
    assert await history_store.get("j-000003-zzzzzz") is None
    assert await history_store.get("nonsense") is None
    assert (await history_store.find_request("bob", "r3")).sequence == 3
    assert await history_store.find_request("alice", "r3") is None  # one user's request id never finds another's job
    assert await history_store.find_request("bob", "r-none") is None


async def test_a_saved_change_is_seen_by_reads(history_store):
    await history_store.save([stored(10, CANCELLED, "alice", T0 + 10 * DAY, T0 + 11 * DAY)])
    assert (await history_store.get("j-000010-abcdef")).job.state == CANCELLED
    assert sequences(await history_store.query(JobQuery(states=frozenset({CANCELLED})))) == [10]
    assert sequences(await history_store.query(JobQuery(states=frozenset({PENDING})))) == []


async def test_prune_deletes_only_ended_jobs_that_ended_before(history_store):
    assert await history_store.prune(T0 + 4 * DAY + 3601) == 4  # 1..4 ended by then
    assert sequences(await history_store.query(JobQuery())) == [10, 9, 8, 7, 6, 5]
    assert await history_store.get("j-000002-abcdef") is None
    assert await history_store.find_request("alice", "r2") is None
    assert await history_store.prune(T0 + 100 * DAY) == 4  # 5..8; the running and pending jobs stay
    assert sequences(await history_store.query(JobQuery())) == [10, 9]
    assert await history_store.prune(T0 + 100 * DAY) == 0


async def test_open_returns_every_unfinished_job_and_the_most_recently_ended(store_factory):
    store = store_factory()
    await store.open()
    extra = 5
    ended = [stored(n, SUCCEEDED, ended=T0 + n) for n in range(1, api.RECENT_ENDED_JOBS + extra + 1)]
    ended[0] = stored(1, FAILED, ended=T0 + 10 * api.RECENT_ENDED_JOBS)  # the first submitted ended last
    running = stored(api.RECENT_ENDED_JOBS + extra + 1, RUNNING)
    old_pending = stored(api.RECENT_ENDED_JOBS + extra + 2, PENDING)
    await store.save([*ended, running, old_pending])
    await store.close()
    reopened = store_factory()
    state = await reopened.open()
    loaded = sequences(state.jobs)
    assert loaded == sorted(loaded)
    assert len(loaded) == api.RECENT_ENDED_JOBS + 2
    # The ones that ended first (2..6) are history; 1, which ended last, is kept.
    assert 1 in loaded and not set(range(2, extra + 2)) & set(loaded)
    assert loaded[-2:] == [running.sequence, old_pending.sequence]
    assert (await reopened.get(ended[2].job.job_id)).job.state == SUCCEEDED  # still in the store
    await reopened.close()


CURRENT_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sequence INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    owner TEXT NOT NULL,
    client_request_id TEXT,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_owner_and_request ON jobs(owner, client_request_id) WHERE client_request_id != '';
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
"""The schema of the release before job history, as its coordinator left a state dir."""


async def test_a_database_of_the_previous_release_is_upgraded_keeping_every_job(tmp_path):
    path = tmp_path / "jobs.db"
    old = sqlite3.connect(path)
    old.executescript(CURRENT_RELEASE_SCHEMA)
    jobs = [
        stored(n, FAILED if n % 3 == 0 else SUCCEEDED, "alice" if n % 2 else "bob", T0 + n, T0 + n + 10, f"r{n}")
        for n in range(1, 301)
    ]
    jobs.append(stored(301, RUNNING, "alice", T0 + 301))
    old.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
        [(s.sequence, s.job.job_id, s.job.state, s.job.spec.owner, s.client_request_id, s.job.SerializeToString()) for s in jobs],
    )
    old.execute("INSERT INTO settings VALUES ('drain:n1', 'fan')")
    old.commit()
    old.close()
    store = SqliteJobStore(path)
    state = await store.open()
    assert sequences(state.jobs) == list(range(1, 302)) and state.drains == {"n1": "fan"}
    assert [s.job for s in state.jobs] == [s.job for s in jobs]
    failed_of_bob = await store.query(JobQuery(owner="bob", states=frozenset({FAILED}), active_since=T0 + 200))
    assert sequences(failed_of_bob) == [n for n in range(300, 189, -1) if n % 3 == 0 and n % 2 == 0 and n + 10 >= 200]
    assert (await store.find_request("alice", "r7")).sequence == 7
    assert await store.prune(T0 + 111) == 100  # the upgrade filled in the end times
    await store.close()
    again = SqliteJobStore(path)  # an upgraded database opens as it is
    assert len((await again.open()).jobs) == 201
    await again.close()
    versions = [row[0] for row in sqlite3.connect(path).execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [1, 2]
