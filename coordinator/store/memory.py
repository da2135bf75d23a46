"""An in-memory store with the semantics of the SQLite one: for tests, benchmarks and the simulator.

Writes are applied in call order and complete at the next turn of the event loop (as a group
commit would), so callers that forget to await see the same interleavings they would in production.
`fail_next` makes the next writes fail, to test that failures are seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from coordinator.store.api import JobStore, StoredJob, StoredState, StoreError
from gpuorch.v1 import job_pb2


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
        jobs = [
            StoredJob(sequence, job_pb2.Job.FromString(data), request_id)
            for sequence, (data, request_id) in sorted(self.jobs.items())
        ]
        return StoredState(jobs, dict(self.drains), self.epoch)

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
