"""An in-memory store with the semantics of the SQLite one: for tests, benchmarks and the simulator.

Writes are applied in call order and complete at the next turn of the event loop (as a group
commit would), so callers that forget to await see the same interleavings they would in production.
`fail_next` makes the next writes fail, to test that failures are seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, JobStore, StoredJob, StoredState, StoreError
from gpuorch.v1 import job_pb2

FINAL_STATES = frozenset({job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED})


def ended_at(job: job_pb2.Job) -> float | None:
    """Wall seconds the job reached a final state (its submit time if it has no end time); None while not final."""
    if job.state not in FINAL_STATES:
        return None
    return (job.end_time if job.HasField("end_time") else job.submit_time).ToNanoseconds() / 1e9


def matches(query: JobQuery, stored: StoredJob) -> bool:
    """Whether a stored job is one the query asks for (its sequence bound included)."""
    job = stored.job
    if query.below_sequence and stored.sequence >= query.below_sequence:
        return False
    if query.owner and job.spec.owner != query.owner:
        return False
    if query.states and job.state not in query.states:
        return False
    if query.active_until and job.submit_time.ToNanoseconds() / 1e9 > query.active_until:
        return False
    ended = ended_at(job)
    return not (query.active_since and ended is not None and ended < query.active_since)


def state_to_open(jobs: list[StoredJob]) -> list[StoredJob]:
    """What open returns of every stored job: those not ended and the RECENT_ENDED_JOBS that ended last."""
    ended = sorted((s for s in jobs if ended_at(s.job) is not None), key=lambda s: (ended_at(s.job), s.sequence))
    kept = {s.sequence for s in ended[-RECENT_ENDED_JOBS:]} if ended else set()
    return [s for s in jobs if ended_at(s.job) is None or s.sequence in kept]


class MemoryJobStore(JobStore):
    def __init__(self) -> None:
        self.jobs: dict[int, tuple[bytes, str]] = {}
        """Sequence -> (the job, serialized as SQLite keeps it; its client request id)."""
        self.drains: dict[str, str] = {}
        self.epoch = 0
        self.commits = 0
        self.fail_next = 0
        """How many of the next writes fail (each with StoreError), for tests of failure handling."""
        self._open = False

    async def open(self) -> StoredState:
        self._open = True
        self.epoch += 1
        return StoredState(state_to_open(self._all()), dict(self.drains), self.epoch)

    def _all(self) -> list[StoredJob]:
        return [
            StoredJob(sequence, job_pb2.Job.FromString(data), request_id)
            for sequence, (data, request_id) in sorted(self.jobs.items())
        ]

    def save(self, jobs: Iterable[StoredJob] = (), drains: Mapping[str, str | None] | None = None) -> asyncio.Future[None]:
        if not self._open:
            raise RuntimeError("job store is not open")
        rows = [(stored.sequence, stored.job.SerializeToString(), stored.client_request_id) for stored in jobs]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next:
            self.fail_next -= 1
            done.set_exception(StoreError("job store write failed: injected failure"))
            return done
        for sequence, data, request_id in rows:  # a copy taken now, as the SQLite store serializes at once
            self.jobs[sequence] = (data, request_id)
        for node_id, reason in (drains or {}).items():
            if reason is None:
                self.drains.pop(node_id, None)
            else:
                self.drains[node_id] = reason
        self.commits += 1
        done.set_result(None)
        return done

    async def close(self) -> None:
        self._open = False

    async def query(self, query: JobQuery) -> list[StoredJob]:
        found = [stored for stored in reversed(self._all()) if matches(query, stored)]
        return found[: max(query.limit, 0)]

    async def get(self, job_id: str) -> StoredJob | None:
        return next((stored for stored in self._all() if stored.job.job_id == job_id), None)

    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        if not client_request_id:
            return None
        return next(
            (s for s in self._all() if s.job.spec.owner == owner and s.client_request_id == client_request_id),
            None,
        )

    async def prune(self, ended_before: float) -> int:
        old = [s.sequence for s in self._all() if (ended := ended_at(s.job)) is not None and ended < ended_before]
        for sequence in old:
            del self.jobs[sequence]
        return len(old)
