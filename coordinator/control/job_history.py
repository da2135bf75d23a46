"""Job history: which ended jobs the manager keeps in memory, and reads of jobs it no longer keeps.

The manager holds every unfinished job and the most recently ended ones, at most
`recent_ended_jobs` of them; as more end, the oldest ended leave memory, but only once their final
state is durable, so a read of the store always finds what memory forgot. Reads of one job
(`find`, `find_request`) try memory, then the store; `page` answers ListJobs from memory when
memory holds every job that can match, and otherwise merges memory with the store's indexes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Reversible
from typing import TYPE_CHECKING

from coordinator.model.jobs import FINAL_STATES, LIST_ENTRY_OVERHEAD_BYTES, JobEntry
from coordinator.store import history
from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, StoredJob, StoreError
from gpuorch.clock import Clock
from gpuorch.logs import get_logger
from gpuorch.v1 import job_pb2

if TYPE_CHECKING:
    from coordinator.control.job_manager import JobManager

log = get_logger("coordinator.jobs")

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
NOT_FINAL = frozenset(history.NOT_FINAL_STATES)


def _entry(stored: StoredJob | None) -> JobEntry | None:
    return JobEntry(stored.sequence, stored.job, stored.client_request_id) if stored is not None else None


class JobHistory:
    def __init__(self, manager: JobManager, recent_ended_jobs: int = RECENT_ENDED_JOBS) -> None:
        self.manager = manager
        self.limit = recent_ended_jobs
        self.ended: OrderedDict[str, JobEntry] = OrderedDict()
        """Ended jobs in memory that may leave it, oldest ended first."""
        self.complete = True
        """Memory holds every job the store has: no read needs the store."""

    def restored(self, ended_loaded: int) -> None:
        """After the store's jobs are indexed: the ended ones in the order they ended, the oldest beyond the bound gone."""
        self.complete = ended_loaded < RECENT_ENDED_JOBS  # the store may have older ones
        leaving = self.manager.arrays.may_leave_memory  # an array's tasks only when every one is final
        order = sorted(
            (entry for entry in self.ended.values() if leaving(entry)),
            key=lambda entry: (entry.job.end_time.ToNanoseconds(), entry.sequence),
        )
        self.ended = OrderedDict((entry.job.job_id, entry) for entry in order)
        self.evict()

    def job_ended(self, entry: JobEntry) -> None:
        """A job ended: it may leave memory once it is among the oldest ended. An array's tasks leave together,
        once the last of them ends (until then the array's view and counts need them all)."""
        for ended in self.manager.arrays.ended_together(entry):
            self.ended.setdefault(ended.job.job_id, ended)

    def evict(self) -> None:
        """Drops the oldest ended jobs beyond the bound from memory, each once its final state is durable (a job
        whose final write failed stays: the store lacks its end). Called after an event's writes are queued."""
        unconfirmed = self.manager.writes.unconfirmed
        while len(self.ended) > self.limit:
            job_id, entry = self.ended.popitem(last=False)
            self.complete = False
            write = unconfirmed.get(job_id)
            if write is None:
                self._forget(entry)
            elif write.done():
                self._written(entry, write)
            else:
                write.add_done_callback(functools.partial(self._written, entry))

    def _written(self, entry: JobEntry, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is None:
            self._forget(entry)

    def forget_ended_before(self, cutoff: float) -> None:
        """Drops from memory the ended jobs that ended before `cutoff` (wall seconds): retention."""
        for entry in [entry for entry in self.ended.values() if 0 < history.ended_at(entry.job) < cutoff]:
            del self.ended[entry.job.job_id]
            self._forget(entry)

    def _forget(self, entry: JobEntry) -> None:
        manager, job_id = self.manager, entry.job.job_id
        if manager.jobs.get(job_id) is entry:
            del manager.jobs[job_id]
        key = (entry.job.spec.owner, entry.client_request_id)
        if entry.client_request_id and manager.by_request_id.get(key) is entry:
            del manager.by_request_id[key]
        manager.arrays.forget(entry)

    # -- reads --

    async def find(self, job_id: str) -> JobEntry | None:
        """The job, from memory or (an old one) from the store; None if neither has it."""
        entry = self.manager.jobs.get(job_id)
        if entry is not None or self.complete:
            return entry
        stored = await self.manager.store.get(job_id)
        return self.manager.jobs.get(job_id) or _entry(stored)

    async def find_request(self, owner: str, client_request_id: str) -> JobEntry | None:
        """The job `owner` submitted with this client request id, from memory or the store."""
        key = (owner, client_request_id)
        entry = self.manager.by_request_id.get(key)
        if entry is not None or self.complete:
            return entry
        stored = await self.manager.store.find_request(owner, client_request_id)
        return self.manager.by_request_id.get(key) or _entry(stored)

    async def page(
        self,
        query: JobQuery,
        page_size: int = 0,
        page_token: str = "",
        max_bytes: int = 0,
        listed: Reversible[JobEntry] | None = None,
    ) -> tuple[list[job_pb2.Job], str]:
        """One page of ListJobs, newest first: at most `page_size` jobs (default 100, at most 1000) and, with
        `max_bytes`, at most that many bytes encoded (but always one job). The token is the sequence to continue
        below. Raises ValueError naming a bad token or window.

        Memory is taken first, then the store read: a job memory holds is answered as memory has it (the store's
        row may lag behind a write in flight); a job memory does not hold left it after its final write was
        durable, so the store read, which began later, has it as it ended. When the store has more than a page,
        its page reaches down to its last row: memory's jobs below that wait for the next page. `listed` is what
        memory lists (default: every job it holds; the manager folds an array's tasks into the array's view)."""
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            below = int(page_token) if page_token else 0
        except ValueError:
            raise ValueError(f"page_token {page_token[:32]!r} is not one this coordinator gave out") from None
        query = dataclasses.replace(query, below_sequence=below, limit=limit)
        history.validate(query)
        jobs = self.manager.jobs
        memory = [
            entry for entry in reversed(listed if listed is not None else jobs.values()) if not below or entry.sequence < below
        ]
        matches = [(entry.sequence, entry.job) for entry in memory if _matches(query, entry.job)]
        candidates, full = matches, False
        if not (self.complete or (query.states and query.states <= NOT_FINAL)):
            in_memory = {entry.sequence for entry in jobs.values()}  # an array's folded tasks included
            while True:  # one row more than a page: whether the store has more below is then known
                rows = await self.manager.store.query(dataclasses.replace(query, limit=limit + 1))
                full, rows = len(rows) > limit, rows[:limit]
                floor = rows[-1].sequence if full else 0
                candidates = [match for match in matches if match[0] >= floor]
                candidates += [(row.sequence, row.job) for row in rows if row.sequence not in in_memory]
                if candidates or not full:
                    break
                query = dataclasses.replace(query, below_sequence=floor)
            candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        page: list[tuple[int, job_pb2.Job]] = []
        page_bytes = 0
        for candidate in candidates:
            job_bytes = candidate[1].ByteSize() + LIST_ENTRY_OVERHEAD_BYTES if max_bytes else 0
            if len(page) == limit or (page and page_bytes + job_bytes > max_bytes > 0):
                break
            page.append(candidate)
            page_bytes += job_bytes
        more = full or len(page) < len(candidates)
        return [job for _, job in page], (str(page[-1][0]) if more and page else "")

    async def watch(self, entry: JobEntry) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every change of state or attempt, until it is final (an ended one: once)."""
        watchers = self.manager.watchers.setdefault(entry.job.job_id, set())
        updates: asyncio.Queue[job_pb2.Job] = asyncio.Queue()
        watchers.add(updates)
        try:
            snapshot = job_pb2.Job()
            snapshot.CopyFrom(entry.job)
            yield snapshot
            while snapshot.state not in FINAL_STATES:
                snapshot = await updates.get()
                yield snapshot
        finally:
            watchers.discard(updates)
            if not watchers:
                self.manager.watchers.pop(entry.job.job_id, None)


def _matches(query: JobQuery, job: job_pb2.Job) -> bool:
    if (query.owner and job.spec.owner != query.owner) or (query.states and job.state not in query.states):
        return False
    if not (query.active_since or query.active_until):
        return True
    return history.matches(query, job.spec.owner, job.state, history.submitted_at(job), history.ended_at(job))


PRUNE_INTERVAL_SECONDS = 3600.0


async def prune_once(manager: JobManager, clock: Clock, retention_seconds: float) -> int:
    """Deletes the jobs that ended more than `retention_seconds` ago, from memory and the store; returns how many
    the store deleted."""
    cutoff = clock.wall() - retention_seconds
    manager.history.forget_ended_before(cutoff)
    deleted = await manager.store.prune(cutoff)
    log.info("job history pruned", deleted=deleted, retention_days=round(retention_seconds / 86400, 3))
    return deleted


async def prune_history(
    manager: JobManager,
    clock: Clock,
    retention_seconds: float,
    interval_seconds: float = PRUNE_INTERVAL_SECONDS,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """The retention task: prunes at once, then every interval; a failed pruning is logged and tried next time."""
    while True:
        try:
            await prune_once(manager, clock, retention_seconds)
        except StoreError as error:
            log.error("job history pruning failed", error=str(error))
        await sleep(interval_seconds)
