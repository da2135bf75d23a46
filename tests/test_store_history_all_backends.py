"""The store's history reads (query, get, find_request, prune) and what open keeps, on every backend."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, StoredJob
from gpuorch.v1 import job_pb2
from tests.store_backends import BACKENDS, StoreMaker

PENDING, RUNNING = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED
DAY = 86_400.0
NOW = 1_800_000_000.0


def stamp(seconds: float) -> Timestamp:
    return Timestamp(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def job(sequence: int, owner: str = "alice", state=PENDING, submitted: float = NOW, ended: float = 0.0, request: str = ""):
    record = job_pb2.Job(
        job_id=f"j-{sequence:06d}",
        state=state,
        spec=job_pb2.JobSpec(argv=["x"], gpus=1, owner=owner),
        submit_time=stamp(submitted),
    )
    if ended:
        record.end_time.CopyFrom(stamp(ended))
    return StoredJob(sequence, record, request)


@pytest.fixture(params=BACKENDS)
def store_maker(request, tmp_path):
    return StoreMaker(request.param, tmp_path, request)


@pytest.fixture
async def store(store_maker):
    opened = store_maker()
    await opened.open()
    yield opened
    await opened.close()


def sequences(found: list[StoredJob]) -> list[int]:
    return [stored.sequence for stored in found]


async def test_query_is_newest_first_and_pages_on_sequence(store):
    await store.save([job(i) for i in range(1, 8)])
    first = await store.query(JobQuery(limit=3))
    assert sequences(first) == [7, 6, 5]
    second = await store.query(JobQuery(limit=3, below_sequence=first[-1].sequence))
    assert sequences(second) == [4, 3, 2]
    assert sequences(await store.query(JobQuery(limit=3, below_sequence=2))) == [1]
    assert first[0].job.job_id == "j-000007" and first[0].job.spec.owner == "alice"


async def test_query_filters_by_owner_and_state(store):
    await store.save(
        [
            job(1, "alice", SUCCEEDED, ended=NOW + 5),
            job(2, "bob", FAILED, ended=NOW + 5),
            job(3, "alice", FAILED, ended=NOW + 5),
            job(4, "alice", RUNNING),
            job(5, "bob", CANCELLED, ended=NOW + 5),
        ]
    )
    assert sequences(await store.query(JobQuery(owner="alice"))) == [4, 3, 1]
    assert sequences(await store.query(JobQuery(states=frozenset({FAILED})))) == [3, 2]
    assert sequences(await store.query(JobQuery(owner="bob", states=frozenset({FAILED, CANCELLED})))) == [5, 2]
    assert await store.query(JobQuery(owner="carol")) == []


async def test_query_window_selects_jobs_in_the_system_at_some_time_inside_it(store):
    await store.save(
        [
            job(1, state=SUCCEEDED, submitted=NOW - 10 * DAY, ended=NOW - 9 * DAY),  # over before the window
            job(2, state=FAILED, submitted=NOW - 10 * DAY, ended=NOW - 2 * DAY),  # ended inside it
            job(3, state=RUNNING, submitted=NOW - 10 * DAY),  # still running: in the system throughout
            job(4, state=PENDING, submitted=NOW - 1 * DAY),  # submitted inside it
            job(5, state=PENDING, submitted=NOW + 1 * DAY),  # submitted after it
        ]
    )
    window = JobQuery(active_since=NOW - 3 * DAY, active_until=NOW)
    assert sequences(await store.query(window)) == [4, 3, 2]
    assert sequences(await store.query(JobQuery(active_since=NOW - 3 * DAY))) == [5, 4, 3, 2]
    assert sequences(await store.query(JobQuery(active_until=NOW - 5 * DAY))) == [3, 2, 1]


async def test_get_and_find_request_answer_whatever_the_age(store):
    await store.save([job(1, "alice", SUCCEEDED, ended=NOW - 50 * DAY, request="req-1"), job(2, "bob", request="req-1")])
    assert (await store.get("j-000001")).job.state == SUCCEEDED
    assert await store.get("j-000099") is None
    assert (await store.find_request("alice", "req-1")).sequence == 1
    assert (await store.find_request("bob", "req-1")).sequence == 2
    assert await store.find_request("carol", "req-1") is None
    assert await store.find_request("alice", "") is None


async def test_prune_deletes_only_final_jobs_that_ended_before(store):
    await store.save(
        [
            job(1, state=SUCCEEDED, ended=NOW - 100 * DAY),
            job(2, state=FAILED, ended=NOW - 95 * DAY),
            job(3, state=CANCELLED, ended=NOW - 10 * DAY),
            job(4, state=RUNNING, submitted=NOW - 200 * DAY),
            job(5, state=PENDING, submitted=NOW - 200 * DAY),
        ]
    )
    assert await store.prune(NOW - 90 * DAY) == 2
    assert sequences(await store.query(JobQuery())) == [5, 4, 3]
    assert await store.get("j-000001") is None
    assert await store.prune(NOW - 90 * DAY) == 0


async def test_open_keeps_every_unfinished_job_and_only_the_newest_ended(store_maker):
    store = store_maker()
    await store.open()
    extra = 5
    ended = [job(i, state=SUCCEEDED, ended=NOW + i) for i in range(1, RECENT_ENDED_JOBS + extra + 1)]
    unfinished = [job(RECENT_ENDED_JOBS + extra + 1, state=RUNNING), job(RECENT_ENDED_JOBS + extra + 2)]
    await store.save([unfinished[0], *ended, unfinished[1]])
    await store.close()
    reopened = store_maker()
    state = await reopened.open()
    loaded = sequences(state.jobs)
    assert loaded == sorted(loaded), "open returns jobs oldest first"
    assert loaded == list(range(extra + 1, RECENT_ENDED_JOBS + extra + 3))
    assert (await reopened.get("j-000001")).job.state == SUCCEEDED, "an ended job beyond those loaded is still stored"
    await reopened.close()
