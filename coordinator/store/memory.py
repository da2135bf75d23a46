"""An in-memory store with the semantics of the SQLite one: for tests, benchmarks and the simulator.

Writes are applied in call order and complete at the next turn of the event loop (as a group
commit would), so callers that forget to await see the same interleavings they would in production.
`fail_next` makes the next writes fail, to test that failures are seen. History reads walk the jobs
newest first over their columns (no parsing until a job matches).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from coordinator.store import history
from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, JobStore, StoredJob, StoredState, StoreError
from gpuorch.v1 import job_pb2


class _Row(NamedTuple):
    data: bytes
    """The job, serialized as SQLite keeps it."""
    client_request_id: str
    owner: str
    state: int
    submitted: float
    ended: float


class MemoryJobStore(JobStore):
    def __init__(self) -> None:
        self.jobs: dict[int, _Row] = {}
        """Sequence -> the job's row."""
        self._order: list[int] = []
        """Every sequence in `jobs`, ascending."""
        self._requests: dict[tuple[str, str], int] = {}
        """(owner, client request id) -> sequence."""
        self._ids: dict[str, int] = {}
        """Job id -> sequence."""
        self.drains: dict[str, str] = {}
        self.epoch = 0
        self.commits = 0
        self.fail_next = 0
        """How many of the next writes fail (each with StoreError), for tests of failure handling."""
        self._open = False

    async def open(self) -> StoredState:
        self._open = True
        self.epoch += 1
        ended = heapq.nlargest(
            RECENT_ENDED_JOBS, (sequence for sequence, row in self.jobs.items() if row.ended), key=self._end_order
        )
        kept = set(ended) | {sequence for sequence, row in self.jobs.items() if not row.ended}
        return StoredState([self._stored(sequence) for sequence in sorted(kept)], dict(self.drains), self.epoch)

    def _end_order(self, sequence: int) -> tuple[float, int]:
        return self.jobs[sequence].ended, sequence

    def _stored(self, sequence: int) -> StoredJob:
        row = self.jobs[sequence]
        return StoredJob(sequence, job_pb2.Job.FromString(row.data), row.client_request_id)

    def save(self, jobs: Iterable[StoredJob] = (), drains: Mapping[str, str | None] | None = None) -> asyncio.Future[None]:
        if not self._open:
            raise RuntimeError("job store is not open")
        rows = [
            (
                stored.sequence,
                stored.job.job_id,
                _Row(
                    stored.job.SerializeToString(),  # a copy taken now, as the SQLite store serializes at once
                    stored.client_request_id,
                    stored.job.spec.owner,
                    stored.job.state,
                    history.submitted_at(stored.job),
                    history.ended_at(stored.job),
                ),
            )
            for stored in jobs
        ]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next:
            self.fail_next -= 1
            done.set_exception(StoreError("job store write failed: injected failure"))
            return done
        for sequence, job_id, row in rows:
            if sequence not in self.jobs:
                bisect.insort(self._order, sequence)
            self.jobs[sequence] = row
            self._ids[job_id] = sequence
            if row.client_request_id:
                self._requests[(row.owner, row.client_request_id)] = sequence
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
        history.validate(query)
        order, found = self._order, []
        end = bisect.bisect_left(order, query.below_sequence) if query.below_sequence else len(order)
        for index in range(end - 1, -1, -1):
            sequence = order[index]
            row = self.jobs[sequence]
            if history.matches(query, row.owner, row.state, row.submitted, row.ended):
                found.append(self._stored(sequence))
                if len(found) == query.limit:
                    break
        return found

    async def get(self, job_id: str) -> StoredJob | None:
        sequence = self._ids.get(job_id)
        return self._stored(sequence) if sequence is not None and sequence in self.jobs else None

    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        sequence = self._requests.get((owner, client_request_id))
        return self._stored(sequence) if sequence is not None and sequence in self.jobs else None

    async def prune(self, ended_before: float) -> int:
        gone = {sequence for sequence, row in self.jobs.items() if 0 < row.ended < ended_before}
        for sequence in gone:
            row = self.jobs.pop(sequence)
            self._requests.pop((row.owner, row.client_request_id), None)
            self._ids.pop(job_pb2.Job.FromString(row.data).job_id, None)
        if gone:
            self._order = [sequence for sequence in self._order if sequence not in gone]
        return len(gone)
