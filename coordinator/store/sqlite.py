"""The durable store in SQLite (WAL), behind coordinator/store/api.py.

A job is durable before SubmitJob answers. The event loop never touches the
disk: one writer thread takes every write queued since its last commit and
commits them in one transaction (group commit), then wakes the waiters with one
call into the event loop. Under load, many submissions share one fsync, so
throughput holds; saves made while the writer is busy join one queued write
(one future for all of them). History reads (query, get, find_request) run on a
reader thread with its own connection: WAL lets it read while the writer writes.
The schema and its upgrade are in sqlite_schema.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.store import history, sqlite_schema
from coordinator.store.api import RECENT_ENDED_JOBS, JobQuery, JobStore, StoredJob, StoredState, StoreError
from gpuorch.logs import get_logger
from gpuorch.v1 import job_pb2

log = get_logger("coordinator.store")


PRIVATE_FILE_MODE = 0o600


def make_private(database: Path) -> None:
    """Creates the database file 0600 if it is new, and makes it and its journals 0600 if not.

    SQLite creates the -wal and -shm files with the database file's permissions, so a
    database made 0600 here keeps every job spec (env included) from other users, whatever
    the umask of whoever started the coordinator.
    """
    os.close(os.open(database, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(path).st_mode) != PRIVATE_FILE_MODE:
                os.chmod(path, PRIVATE_FILE_MODE)


_CLOSE = object()


PRUNE_BATCH_ROWS = 5000
"""Jobs one pruning transaction deletes: the writer commits submissions between batches."""


@dataclass(eq=False)
class _Prune:
    """One batch of pruning, done by the writer in its own transaction; `done` gets how many it deleted."""

    ended_before: float
    done: asyncio.Future[int]


@dataclass(eq=False)
class _Write:
    """Rows and settings to commit, and the future of everyone who asked for them."""

    rows: list[tuple]
    settings: dict[str, str | None]
    done: asyncio.Future[None]


DRAIN_KEY_PREFIX = "drain:"
"""Drains are rows of the settings table, keyed by this and the node id."""


def next_epoch(state_dir: Path) -> int:
    """Reads, increments and durably writes the coordinator epoch (the file `epoch`, 0600, beside the database)."""
    path = state_dir / "epoch"
    try:
        epoch = int(path.read_text().strip()) + 1
    except FileNotFoundError:
        epoch = 1
    temporary = path.with_suffix(".tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE), "w") as handle:
        handle.write(f"{epoch}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return epoch


class SqliteJobStore(JobStore):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        """Transactions committed: fewer than save() calls when writes are grouped."""
        self._lock = threading.Lock()
        self._open_write: _Write | None = None
        """The write queued last, while the writer has not taken it: saves until then join it."""
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_connection: sqlite3.Connection | None = None
        """Made and used only on the reader's one thread."""

    def _connect(self) -> sqlite3.Connection:
        make_private(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss too, not only a crash of the coordinator.
        connection.execute("PRAGMA synchronous=FULL")
        sqlite_schema.prepare(connection)
        return connection

    def _load(self, connection: sqlite3.Connection) -> StoredState:
        rows = {row[0]: row for row in connection.execute(sqlite_schema.NOT_FINAL)}
        rows.update((row[0], row) for row in connection.execute(sqlite_schema.RECENT_ENDED, (RECENT_ENDED_JOBS,)))
        jobs = [_stored(rows[sequence]) for sequence in sorted(rows)]
        drains = {
            key.removeprefix(DRAIN_KEY_PREFIX): value
            for key, value in connection.execute("SELECT key, value FROM settings")
            if key.startswith(DRAIN_KEY_PREFIX)
        }
        return StoredState(jobs, drains, next_epoch(self.path.parent))

    async def open(self) -> StoredState:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = await asyncio.to_thread(self._connect)
        state = await asyncio.to_thread(self._load, connection)
        self._thread = threading.Thread(target=self._writer, args=(connection, self._loop), name="job-store-writer", daemon=True)
        self._thread.start()
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store-reader")
        log.info("job store open", path=str(self.path), jobs=len(state.jobs))
        return state

    def save(self, jobs: Iterable[StoredJob] = (), drains: Mapping[str, str | None] | None = None) -> asyncio.Future[None]:
        if self._thread is None or self._loop is None:
            raise RuntimeError("job store is not open")
        rows = [
            (
                stored.sequence,
                stored.job.job_id,
                stored.job.state,
                stored.job.spec.owner,
                stored.client_request_id,
                stored.job.SerializeToString(),
                history.submitted_at(stored.job),
                history.ended_at(stored.job),
            )
            for stored in jobs
        ]
        settings = {DRAIN_KEY_PREFIX + node_id: reason for node_id, reason in (drains or {}).items()}
        with self._lock:
            write = self._open_write
            if write is None:
                write = self._open_write = _Write(rows, settings, self._loop.create_future())
                self._queue.put(write)
            else:  # joins the write the writer has not taken yet: one future, one queue item, one settle
                write.rows += rows
                write.settings.update(settings)
        return write.done

    def _writer(self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
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
            prunes = [item for item in batch if isinstance(item, _Prune)]
            closing = len(writes) + len(prunes) != len(batch)
            if writes:
                self._commit(connection, loop, writes)
            for prune in prunes:
                self._prune_batch(connection, loop, prune)
        connection.close()

    def _commit(self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop, writes: list[_Write]) -> None:
        error: BaseException | None = None
        try:
            connection.execute("BEGIN")
            for write in writes:
                rows, settings = write.rows, write.settings
                if rows:
                    connection.executemany(
                        "INSERT INTO jobs(sequence, job_id, state, owner, client_request_id, data, submit_time, end_time) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sequence) DO UPDATE SET "
                        "state=excluded.state, data=excluded.data, submit_time=excluded.submit_time, end_time=excluded.end_time",
                        rows,
                    )
                for key, value in settings.items():
                    if value is None:
                        connection.execute("DELETE FROM settings WHERE key = ?", (key,))
                    else:
                        connection.execute(
                            "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                            (key, value),
                        )
            connection.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as failure:
            error = failure
            log.error("job store write failed", error=str(failure))
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        # One wake-up of the event loop per commit, not one per write it grouped.
        loop.call_soon_threadsafe(_settle, [write.done for write in writes], error)

    def _prune_batch(self, connection: sqlite3.Connection, loop: asyncio.AbstractEventLoop, prune: _Prune) -> None:
        try:
            connection.execute("BEGIN")
            deleted = connection.execute(sqlite_schema.PRUNE_BATCH, (prune.ended_before, PRUNE_BATCH_ROWS)).rowcount
            connection.execute("COMMIT")
        except sqlite3.Error as failure:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            log.error("job store pruning failed", error=str(failure))
            loop.call_soon_threadsafe(_settle_prune, prune.done, StoreError(f"job store pruning failed: {failure}"))
        else:
            loop.call_soon_threadsafe(_settle_prune, prune.done, deleted)

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_CLOSE)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.get_running_loop().run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=False)

    # -- history reads: on the reader thread, never on the event loop's --

    async def _read(self, read, *arguments):
        if self._reader is None:
            raise RuntimeError("job store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, read, *arguments)

    def _reading(self) -> sqlite3.Connection:
        if self._reader_connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA query_only = ON")
            self._reader_connection = connection
        return self._reader_connection

    def _close_reader(self) -> None:
        if self._reader_connection is not None:
            self._reader_connection.close()
            self._reader_connection = None

    def _select(self, sql: str, parameters: tuple | list) -> list[StoredJob]:
        return [_stored(row) for row in self._reading().execute(sql, parameters)]

    def _query(self, query: JobQuery) -> list[StoredJob]:
        # One read per state, merged: each walks an index in sequence order, where one read of
        # several states would sort every match.
        found: list[StoredJob] = []
        states: list[int | None] = [*sorted(query.states)] or [None]
        for state in states:
            found += self._select(*sqlite_schema.query_sql(query, state))
        found.sort(key=lambda stored: stored.sequence, reverse=True)
        return found[: query.limit]

    async def query(self, query: JobQuery) -> list[StoredJob]:
        history.validate(query)
        return await self._read(self._query, query)

    async def get(self, job_id: str) -> StoredJob | None:
        found = await self._read(self._select, sqlite_schema.BY_ID, (job_id,))
        return found[0] if found else None

    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        found = await self._read(self._select, sqlite_schema.BY_REQUEST, (owner, client_request_id))
        return found[0] if found else None

    async def prune(self, ended_before: float) -> int:
        """Deletes in batches of PRUNE_BATCH_ROWS, each its own transaction on the writer, in order with the saves."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("job store is not open")
        deleted = 0
        while True:
            prune = _Prune(ended_before, self._loop.create_future())
            self._queue.put(prune)
            batch = await prune.done
            deleted += batch
            if batch < PRUNE_BATCH_ROWS:
                return deleted


def _stored(row: tuple) -> StoredJob:
    sequence, data, request_id = row
    return StoredJob(sequence, job_pb2.Job.FromString(data), request_id or "")


def _settle_prune(future: asyncio.Future[int], outcome: int | StoreError) -> None:
    if future.done():
        return
    if isinstance(outcome, StoreError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(StoreError(f"job store write failed: {error}"))
