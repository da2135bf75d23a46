"""The SQLite store's schema, its versioned migrations, and the SQL of history reads.

Migrations run through coordinator/store/migrations.py (the table of applied versions), as
PostgreSQL's do. Version 1 is the schema of the releases before history (created IF NOT EXISTS,
so a database of those releases, which has no versions table, takes it as it is); version 2 adds
`submit_time` and `end_time` (wall seconds; 0 = not ended), fills them from each job's stored
record, and builds the history indexes, in one transaction: an interrupted upgrade leaves the old
database as it was.
"""

from __future__ import annotations

import sqlite3

from coordinator.store import history
from coordinator.store.api import JobQuery
from coordinator.store.migrations import SQLITE, Migration, apply_migrations
from gpuorch.v1 import job_pb2

BASE_SCHEMA = """
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

HISTORY_INDEXES = """
-- History reads walk one owner's or one state's jobs newest first; the times are in the index, so
-- a window is checked without reading the jobs' records.
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs(owner, sequence, state, submit_time, end_time);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, sequence, owner, submit_time, end_time);
-- The most recently ended jobs (open) and the oldest ended (pruning).
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs(end_time, sequence) WHERE end_time > 0;
"""


def _fill_times(connection: sqlite3.Connection) -> None:
    """Version 2's step: every stored job's submit and end times, read from its record."""
    times = []
    for sequence, data in connection.execute("SELECT sequence, data FROM jobs"):
        job = job_pb2.Job.FromString(data)
        times.append((history.submitted_at(job), history.ended_at(job), sequence))
    connection.executemany("UPDATE jobs SET submit_time = ?, end_time = ? WHERE sequence = ?", times)


def prepare(connection: sqlite3.Connection) -> None:
    """Creates the schema, or migrates an older one to the newest version, keeping every job."""
    apply_migrations(connection, MIGRATIONS, SQLITE)


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


MIGRATIONS = (
    Migration(1, "jobs and settings", tuple(_statements(BASE_SCHEMA))),
    Migration(
        2,
        "history: submit and end times, indexes",
        (
            "ALTER TABLE jobs ADD COLUMN submit_time REAL NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN end_time REAL NOT NULL DEFAULT 0",
            *_statements(HISTORY_INDEXES),
        ),
        then=_fill_times,
    ),
)

SELECTED = "SELECT sequence, data, client_request_id FROM jobs"

NOT_FINAL = f"{SELECTED} WHERE state IN ({', '.join(str(state) for state in history.NOT_FINAL_STATES)})"
RECENT_ENDED = f"{SELECTED} WHERE end_time > 0 ORDER BY end_time DESC, sequence DESC LIMIT ?"
BY_ID = f"{SELECTED} WHERE job_id = ?"
BY_REQUEST = f"{SELECTED} WHERE owner = ? AND client_request_id = ? AND client_request_id != ''"  # the unique partial index
PRUNE_BATCH = (
    "DELETE FROM jobs WHERE sequence IN (SELECT sequence FROM jobs WHERE end_time > 0 AND end_time < ? ORDER BY end_time LIMIT ?)"
)


def query_sql(query: JobQuery, state: int | None) -> tuple[str, list[object]]:
    """One read of `query` for one of its states (None: any state), newest first."""
    conditions: list[str] = []
    parameters: list[object] = []
    if query.owner:
        conditions.append("owner = ?")
        parameters.append(query.owner)
    if state is not None:
        conditions.append("state = ?")
        parameters.append(state)
    if query.below_sequence:
        conditions.append("sequence < ?")
        parameters.append(query.below_sequence)
    if query.active_until:
        conditions.append("submit_time <= ?")
        parameters.append(query.active_until)
    if query.active_since:
        conditions.append("(end_time = 0 OR end_time >= ?)")
        parameters.append(query.active_since)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"{SELECTED}{where} ORDER BY sequence DESC LIMIT ?", [*parameters, query.limit]
