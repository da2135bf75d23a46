"""The durable store in PostgreSQL, behind coordinator/store/api.py: for coordinators that share one database.

The same guarantees as the SQLite store: a job is committed before its save's future completes,
and the event loop never waits on the database. One writer thread takes every write queued since
its last commit and commits them in one transaction (group commit), then wakes the waiters with one
call into the event loop. Every write transaction first checks that this coordinator's epoch still
leads (postgres_schema.check_fence): a deposed leader's writes fail with Fenced and change nothing.

A lost connection (the database restarted, or failed over) fails the writes in flight with
StoreError; the next write reconnects. A write that fails before anything of it reached the
database is retried once on a new connection, so the first write after a restart succeeds.
History reads (query, get, find_request) and prune run on threads of their own, one connection each.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from coordinator.store import history
from coordinator.store.api import RECENT_ENDED_JOBS, Fenced, JobQuery, JobStore, StoredJob, StoredState, StoreError
from coordinator.store.lease import Lease
from coordinator.store.postgres_lease import PostgresLease
from coordinator.store.postgres_schema import check_fence, connect, describe
from gpuorch.logs import get_logger
from gpuorch.v1 import job_pb2

__all__ = ["PostgresJobStore", "PostgresLease", "job_row"]

log = get_logger("coordinator.store")

T = TypeVar("T")

UPSERT_JOB = (
    "INSERT INTO jobs(sequence, job_id, state, owner, client_request_id, submit_time, end_time, data) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (sequence) DO UPDATE "
    "SET state = excluded.state, end_time = excluded.end_time, data = excluded.data"
)
UPSERT_JOBS = (
    "INSERT INTO jobs(sequence, job_id, state, owner, client_request_id, submit_time, end_time, data) "
    "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::smallint[], %s::text[], %s::text[], %s::float8[], "
    "%s::float8[], %s::bytea[]) ON CONFLICT (sequence) DO UPDATE "
    "SET state = excluded.state, end_time = excluded.end_time, data = excluded.data"
)
"""One statement for a whole batch (one version per sequence: an upsert may not touch a row twice)."""
JOB_COLUMNS = "sequence, data, client_request_id"


_CLOSE = object()


@dataclass(eq=False)
class _Write:
    """Job rows and drains to commit, and the future of everyone who asked for them."""

    rows: list[tuple]
    drains: dict[str, str | None]
    done: asyncio.Future[None]


def job_row(stored: StoredJob) -> tuple:
    """The columns of one job: what the history reads filter on, and the whole job serialized."""
    job = stored.job
    submitted = history.submitted_at(job)
    ended = history.ended_at(job) or None  # NULL while not final
    return (
        stored.sequence,
        job.job_id,
        job.state,
        job.spec.owner,
        stored.client_request_id,
        submitted,
        ended,
        job.SerializeToString(),
    )


def _stored(row: tuple) -> StoredJob:
    sequence, data, request_id = row
    return StoredJob(sequence, job_pb2.Job.FromString(data), request_id or "")


class PostgresJobStore(JobStore):
    def __init__(self, url: str, lease: Lease) -> None:
        self.url = url
        self.lease = lease
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        """Transactions committed: fewer than save() calls when writes are grouped."""
        self._lock = threading.Lock()
        self._open_write: _Write | None = None
        """The write queued last, while the writer has not taken it: saves until then join it."""
        self._reader: psycopg.Connection[Any] | None = None
        self._reader_lock = threading.Lock()

    async def open(self) -> StoredState:
        epoch = self.lease.epoch
        if not epoch:
            raise StoreError("the PostgreSQL store opens only once this coordinator leads: acquire the lease first")
        self._loop = asyncio.get_running_loop()
        try:
            connection = await asyncio.to_thread(connect, self.url)
            jobs, drains = await asyncio.to_thread(self._load, connection)
        except psycopg.Error as error:
            raise StoreError(f"cannot open the job store at {describe(self.url)}: {error}") from None
        self._thread = threading.Thread(target=self._writer, args=(connection, self._loop), name="job-store-writer", daemon=True)
        self._thread.start()
        log.info("job store open", store=describe(self.url), jobs=len(jobs), epoch=epoch)
        return StoredState(jobs, drains, epoch)

    def _load(self, connection: psycopg.Connection[Any]) -> tuple[list[StoredJob], dict[str, str]]:
        rows = connection.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE end_time IS NULL UNION ALL "
            f"(SELECT {JOB_COLUMNS} FROM jobs WHERE end_time IS NOT NULL ORDER BY end_time DESC, sequence DESC LIMIT %s)",
            (RECENT_ENDED_JOBS,),
        ).fetchall()
        jobs = sorted((_stored(row) for row in rows), key=lambda stored: stored.sequence)
        drains = dict(connection.execute("SELECT node_id, reason FROM drains").fetchall())
        return jobs, drains

    def save(self, jobs: Iterable[StoredJob] = (), drains: Mapping[str, str | None] | None = None) -> asyncio.Future[None]:
        if self._thread is None or self._loop is None:
            raise RuntimeError("job store is not open")
        rows = [job_row(stored) for stored in jobs]
        changed_drains = dict(drains or {})
        with self._lock:
            write = self._open_write
            if write is None:
                write = self._open_write = _Write(rows, changed_drains, self._loop.create_future())
                self._queue.put(write)
            else:  # joins the write the writer has not taken yet: one future, one queue item, one settle
                write.rows += rows
                write.drains.update(changed_drains)
        return write.done

    def _writer(self, connection: psycopg.Connection[Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._lock:  # what is taken takes no more rows; a save from now on queues a new write
                self._open_write = None
            writes = [item for item in batch if isinstance(item, _Write)]
            closing = len(writes) != len(batch)
            if not writes:
                continue
            error: BaseException | None = None
            try:
                connection = self._commit(connection, writes)
                self.commits += 1
            except Fenced as fenced:
                error = fenced
                log.error("job store write refused: this coordinator no longer leads", error=str(fenced))
            except Exception as failure:  # noqa: BLE001 - the writer thread must outlive any failure, and report it
                error = failure
                log.error("job store write failed", store=describe(self.url), error=str(failure))
                if connection is not None and (connection.broken or connection.closed):
                    connection.close()
                    connection = None
            # One wake-up of the event loop per commit, not one per write it grouped.
            loop.call_soon_threadsafe(_settle, [write.done for write in writes], error)
        if connection is not None:
            connection.close()

    def _commit(self, connection: psycopg.Connection[Any] | None, writes: list[_Write]) -> psycopg.Connection[Any]:
        """Commits the writes in one fenced transaction; returns the connection to use next. Retries once on a new
        connection when the one it had was found dead before the transaction's COMMIT was sent."""
        if connection is not None:
            try:
                self._transaction(connection, writes)
                return connection
            except _DeadBeforeCommit:
                log.warning("job store connection lost; reconnecting", store=describe(self.url))
                connection.close()
        connection = connect(self.url)
        try:
            self._transaction(connection, writes)
        except _DeadBeforeCommit as dead:
            connection.close()
            raise dead.error from None
        return connection

    def _transaction(self, connection: psycopg.Connection[Any], writes: list[_Write]) -> None:
        rows = [row for write in writes for row in write.rows]
        drains: dict[str, str | None] = {}
        for write in writes:
            drains.update(write.drains)
        resumed = [node_id for node_id, reason in drains.items() if reason is None]
        drained = [(node_id, reason) for node_id, reason in drains.items() if reason is not None]
        committing = False
        try:
            with connection.transaction(), connection.cursor() as cursor:
                check_fence(cursor, self.lease.epoch)
                if rows:
                    latest = {row[0]: row for row in rows}  # a later save of a job replaces an earlier one
                    cursor.execute(UPSERT_JOBS, [list(column) for column in zip(*latest.values(), strict=True)])
                if resumed:
                    cursor.execute("DELETE FROM drains WHERE node_id = ANY(%s)", (resumed,))
                if drained:
                    cursor.executemany(
                        "INSERT INTO drains(node_id, reason) VALUES (%s, %s) "
                        "ON CONFLICT (node_id) DO UPDATE SET reason = excluded.reason",
                        drained,
                    )
                committing = True
        except psycopg.OperationalError as error:
            if not committing and connection.broken:
                raise _DeadBeforeCommit(error) from error
            raise

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_CLOSE)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- history --

    async def query(self, query: JobQuery) -> list[StoredJob]:
        history.validate(query)
        where: list[str] = ["TRUE"]
        parameters: list[object] = []
        if query.owner:
            where.append("owner = %s")
            parameters.append(query.owner)
        if query.states:
            where.append("state = ANY(%s)")
            parameters.append(sorted(query.states))
        if query.active_until:
            where.append("submit_time <= %s")
            parameters.append(query.active_until)
        if query.active_since:
            where.append("(end_time IS NULL OR end_time >= %s)")
            parameters.append(query.active_since)
        if query.below_sequence:
            where.append("sequence < %s")
            parameters.append(query.below_sequence)
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY sequence DESC LIMIT %s"
        rows = await self._read(lambda connection: connection.execute(sql, (*parameters, query.limit)).fetchall())
        return [_stored(row) for row in rows]

    async def get(self, job_id: str) -> StoredJob | None:
        row = await self._read(
            lambda connection: connection.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        )
        return _stored(row) if row else None

    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        if not client_request_id:
            return None
        row = await self._read(
            lambda connection: connection.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = %s AND client_request_id = %s AND client_request_id <> ''",
                (owner, client_request_id),
            ).fetchone()
        )
        return _stored(row) if row else None

    async def prune(self, ended_before: float) -> int:
        def delete(connection: psycopg.Connection[Any]) -> int:
            with connection.transaction(), connection.cursor() as cursor:
                check_fence(cursor, self.lease.epoch)
                cursor.execute(
                    "DELETE FROM jobs WHERE end_time IS NOT NULL AND end_time < %s AND state = ANY(%s)",
                    (ended_before, sorted(history.FINAL_STATES)),
                )
                return cursor.rowcount

        return await self._read(delete)

    async def _read(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Runs `work` on the reader connection, on a thread; a lost connection is replaced for the next read."""

        def run() -> T:
            with self._reader_lock:
                if self._reader is None or self._reader.closed:
                    self._reader = connect(self.url)
                try:
                    return work(self._reader)
                except psycopg.Error:
                    if self._reader.broken:
                        self._reader.close()
                        self._reader = None
                    raise

        try:
            return await asyncio.to_thread(run)
        except Fenced:
            raise
        except psycopg.Error as error:
            raise StoreError(f"job store read failed ({describe(self.url)}): {error}") from None


class _DeadBeforeCommit(Exception):
    """The connection was found dead before COMMIT was sent: nothing of the transaction can have committed."""

    def __init__(self, error: psycopg.OperationalError) -> None:
        super().__init__(str(error))
        self.error = error


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        elif isinstance(error, StoreError):  # Fenced, as it is
            future.set_exception(error)
        else:
            future.set_exception(StoreError(f"job store write failed: {error}"))
