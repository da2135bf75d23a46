"""The job manager's writes to the store: in the order of the events, one per event, every failure seen.

The effects of one event may ask for the same job to be saved twice, and for several jobs: they go
as one write, queued before the event's handler returns (so a write is never left behind a store
that closes, nor behind a later event's). A job is serialized when its write is queued, so it is
written as it is then. Every write's failure is logged and counted here, awaited or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from coordinator.model.jobs import JobEntry
from coordinator.store.api import JobStore, StoredJob
from gpuorch.logs import get_logger

log = get_logger("coordinator.jobs")


class JobWrites:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.failures = 0
        """Writes that failed (each logged); a failed job's change is in memory only until its next write."""
        self._unsaved: dict[str, JobEntry] = {}
        """Job id -> job asked for since the last write, in the order first asked."""
        self._watched: asyncio.Future[None] | None = None
        self.unconfirmed: dict[str, asyncio.Future[None]] = {}
        """Job id -> the write of its final state, until that write is durable (or for good, if it failed):
        an ended job leaves memory only once the store has its end (control/job_history.py)."""
        self._held: list[Callable[[], object]] = []
        """Actions that wait for the event's write, and every one before it, to be durable (after_durable)."""

    def ask(self, entry: JobEntry) -> None:
        """The job goes in the next write (`save`, or `save_unsaved` once the event's effects are applied)."""
        self._unsaved.setdefault(entry.job.job_id, entry)

    def after_durable(self, action: Callable[[], object]) -> None:
        """Runs `action` once this event's write (queued when its effects are applied) and every write before it are
        durable; at once when nothing is being written. Not at all when that write fails: what it guards (an agent
        told to forget an ended attempt) then waits for a later event. Writes land in order, so the last one queued
        stands for all before it."""
        self._held.append(action)

    def _release_held(self, write: asyncio.Future[None] | None) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        if write is None or (write.done() and not write.cancelled() and write.exception() is None):
            for action in held:
                action()
            return
        write.add_done_callback(lambda done: done.cancelled() or done.exception() is not None or [action() for action in held])

    def save(self, entries: Iterable[JobEntry] = ()) -> asyncio.Future[None]:
        """Queues one write: the jobs asked for since the last write, then `entries` (each job once)."""
        batch, self._unsaved = self._unsaved, {}
        for entry in entries:
            batch.setdefault(entry.job.job_id, entry)
        write = self.store.save([StoredJob(entry.sequence, entry.job, entry.client_request_id) for entry in batch.values()])
        for job_id, entry in batch.items():
            if entry.final:
                self.unconfirmed[job_id] = write
        if write is not self._watched:  # a store may answer several saves with one future (they joined one write)
            self._watched = write
            write.add_done_callback(self._done)
        self._release_held(write)
        return write

    def save_unsaved(self) -> asyncio.Future[None] | None:
        """Writes the jobs asked for since the last write, if any."""
        if self._unsaved:
            return self.save()
        self._release_held(self._watched if self._watched is not None and not self._watched.done() else None)
        return None

    def _done(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is None:
            for job_id in [job_id for job_id, pending in self.unconfirmed.items() if pending is write]:
                del self.unconfirmed[job_id]
        elif not write.cancelled():
            self.failures += 1
            log.error(
                "job store write failed; the change is in memory only until the job's next write", error=str(write.exception())
            )
