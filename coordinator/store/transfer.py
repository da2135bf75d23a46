"""Copying a SQLite store into PostgreSQL (`gpuorch-coordinator migrate`), losing nothing.

Every job (every state, with its sequence and request id), every drain, and the epoch: the
PostgreSQL epoch becomes at least the SQLite one, so the first coordinator on PostgreSQL tells
agents a higher epoch than any they saw. The SQLite file is only read. The target must hold no
jobs or drains (with `force`, the copied jobs replace those of the same sequence and the others
stay), and no coordinator may lead it while the copy runs. The copy is one transaction: it lands
whole or not at all.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.store.api import StoredJob
from coordinator.store.open_url import read_epoch
from coordinator.store.postgres import UPSERT_JOB, job_row
from coordinator.store.postgres_schema import connect, describe
from gpuorch.v1 import job_pb2

BATCH = 5000


class TransferError(RuntimeError):
    """The copy cannot be made (nothing was written); the message says why."""


@dataclass(frozen=True, slots=True)
class SqliteContents:
    jobs: list[StoredJob]
    drains: dict[str, str]
    epoch: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    jobs_by_state: dict[str, int]
    """State name (pending, running, ...) -> jobs copied in it."""
    drains: int
    epoch: int
    """The target's epoch after the copy."""

    @property
    def jobs(self) -> int:
        return sum(self.jobs_by_state.values())


def read_sqlite(path: Path) -> SqliteContents:
    """Everything a SQLite store holds, read without changing it (its epoch included)."""
    if not path.is_file():
        raise TransferError(f"no SQLite store at {path}")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            jobs = [
                StoredJob(sequence, job_pb2.Job.FromString(data), request_id or "")
                for sequence, data, request_id in connection.execute(
                    "SELECT sequence, data, client_request_id FROM jobs ORDER BY sequence"
                )
            ]
            drains = {
                key.removeprefix("drain:"): value
                for key, value in connection.execute("SELECT key, value FROM settings")
                if key.startswith("drain:")
            }
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise TransferError(f"cannot read the SQLite store {path}: {error}") from None
    return SqliteContents(jobs, drains, read_epoch(path.parent))


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def copy_to_postgres(contents: SqliteContents, url: str, force: bool = False) -> CopyReport:
    """Writes `contents` into the PostgreSQL store at `url` (creating its schema) in one transaction."""
    import psycopg

    try:
        connection = connect(url)
    except psycopg.Error as error:
        raise TransferError(f"cannot connect to {describe(url)}: {error}") from None
    try:
        with connection.transaction(), connection.cursor() as cursor:
            epoch, live = _one(cursor, "SELECT epoch, lease_until > now() FROM leader WHERE id = 1 FOR UPDATE")
            if live:
                raise TransferError(f"a coordinator leads {describe(url)} (epoch {epoch}): stop every coordinator first")
            (jobs_there,) = _one(cursor, "SELECT count(*) FROM jobs")
            (drains_there,) = _one(cursor, "SELECT count(*) FROM drains")
            if (jobs_there or drains_there) and not force:
                raise TransferError(
                    f"{describe(url)} already holds {jobs_there} jobs and {drains_there} drains: nothing copied "
                    "(--force copies over them: jobs of the same sequence are replaced, the others kept)"
                )
            rows = [job_row(stored) for stored in contents.jobs]
            for start in range(0, len(rows), BATCH):
                cursor.executemany(UPSERT_JOB, rows[start : start + BATCH])
            if contents.drains:
                cursor.executemany(
                    "INSERT INTO drains(node_id, reason) VALUES (%s, %s) "
                    "ON CONFLICT (node_id) DO UPDATE SET reason = excluded.reason",
                    list(contents.drains.items()),
                )
            (epoch,) = _one(cursor, "UPDATE leader SET epoch = GREATEST(epoch, %s) WHERE id = 1 RETURNING epoch", contents.epoch)
    except psycopg.Error as error:
        raise TransferError(f"the copy into {describe(url)} failed, nothing was written: {error}") from None
    finally:
        connection.close()
    by_state = Counter(state_name(stored.job.state) for stored in contents.jobs)
    return CopyReport(dict(sorted(by_state.items())), len(contents.drains), epoch)


def _one(cursor: Any, sql: str, *parameters: object) -> tuple:
    row = cursor.execute(sql, parameters or None).fetchone()
    if row is None:
        raise TransferError(f"the PostgreSQL store's schema is incomplete: no row for {sql!r}")
    return tuple(row)
