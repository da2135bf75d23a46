"""The durable store in SQLite (WAL), behind coordinator/store/api.py.

A job is durable before SubmitJob answers. The event loop never touches the
disk: one writer thread takes every write queued since its last commit and
commits them in one transaction (group commit), then wakes the waiters with one
call into the event loop. Under load, many submissions share one fsync, so
throughput holds; saves made while the writer is busy join one queued write
(one future for all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from coordinator.store.api import JobQuery, JobStore, StoredJob, StoredState, StoreError
from coordinator.store.memory import ended_at, matches, state_to_open
from gpuorch.v1 import job_pb2

log = structlog.get_logger("coordinator.store")


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


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sequence INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    owner TEXT NOT NULL,
    client_request_id TEXT,
    data BLOB NOT NULL
);
-- A request id is unique per owner: one user's retried submission never finds another user's job.
-- (Stores made before this was so have the index on the id alone; each open replaces it.)
DROP INDEX IF EXISTS jobs_by_request;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_owner_and_request ON jobs(owner, client_request_id) WHERE client_request_id != '';
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_CLOSE = object()


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

    def _connect(self) -> sqlite3.Connection:
        make_private(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss too, not only a crash of the coordinator.
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        return connection

    def _load(self, connection: sqlite3.Connection) -> StoredState:
        jobs = [
            StoredJob(sequence, job_pb2.Job.FromString(data), request_id or "")
            for sequence, data, request_id in connection.execute(
                "SELECT sequence, data, client_request_id FROM jobs ORDER BY sequence"
            )
        ]
        drains = {
            key.removeprefix(DRAIN_KEY_PREFIX): value
            for key, value in connection.execute("SELECT key, value FROM settings")
            if key.startswith(DRAIN_KEY_PREFIX)
        }
        return StoredState(state_to_open(jobs), drains, next_epoch(self.path.parent))

    async def open(self) -> StoredState:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = await asyncio.to_thread(self._connect)
        state = await asyncio.to_thread(self._load, connection)
        self._thread = threading.Thread(target=self._writer, args=(connection, self._loop), name="job-store-writer", daemon=True)
        self._thread.start()
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
            closing = len(writes) != len(batch)
            if not writes:
                continue
            error: BaseException | None = None
            try:
                connection.execute("BEGIN")
                for write in writes:
                    rows, settings = write.rows, write.settings
                    if rows:
                        connection.executemany(
                            "INSERT INTO jobs(sequence, job_id, state, owner, client_request_id, data) VALUES (?, ?, ?, ?, ?, ?) "
                            "ON CONFLICT(sequence) DO UPDATE SET state=excluded.state, data=excluded.data",
                            rows,
                        )
                    for key, value in settings.items():
                        if value is None:
                            connection.execute("DELETE FROM settings WHERE key = ?", (key,))
                        else:
                            connection.execute(
                                "INSERT INTO settings(key, value) VALUES (?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
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
        connection.close()

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_CLOSE)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # History reads until the SQLite schema has their columns: a scan of every job on a thread.

    def _read_all(self) -> list[StoredJob]:
        connection = sqlite3.connect(self.path)
        try:
            return [
                StoredJob(sequence, job_pb2.Job.FromString(data), request_id or "")
                for sequence, data, request_id in connection.execute(
                    "SELECT sequence, data, client_request_id FROM jobs ORDER BY sequence"
                )
            ]
        finally:
            connection.close()

    async def query(self, query: JobQuery) -> list[StoredJob]:
        jobs = await asyncio.to_thread(self._read_all)
        return [stored for stored in reversed(jobs) if matches(query, stored)][: max(query.limit, 0)]

    async def get(self, job_id: str) -> StoredJob | None:
        return next((s for s in await asyncio.to_thread(self._read_all) if s.job.job_id == job_id), None)

    async def find_request(self, owner: str, client_request_id: str) -> StoredJob | None:
        if not client_request_id:
            return None
        jobs = await asyncio.to_thread(self._read_all)
        return next((s for s in jobs if s.job.spec.owner == owner and s.client_request_id == client_request_id), None)

    async def prune(self, ended_before: float) -> int:
        jobs = await asyncio.to_thread(self._read_all)
        old = [s.sequence for s in jobs if (ended := ended_at(s.job)) is not None and ended < ended_before]

        def delete() -> None:
            connection = sqlite3.connect(self.path, isolation_level=None)
            try:
                connection.executemany("DELETE FROM jobs WHERE sequence = ?", [(sequence,) for sequence in old])
            finally:
                connection.close()

        await asyncio.to_thread(delete)
        return len(old)


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(StoreError(f"job store write failed: {error}"))
