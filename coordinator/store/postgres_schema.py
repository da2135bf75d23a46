"""The PostgreSQL store's schema (its migrations), its connections, and the fence every write passes.

Tables: `jobs` (the whole job as protobuf bytes, plus the columns the history reads filter on),
`drains`, and `leader`: one row (id 1) with the epoch of the coordinator that leads, its address
and when its lease ends, on the database's clock.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import conninfo

from coordinator.store.api import Fenced
from coordinator.store.migrations import POSTGRES, Migration, apply_migrations

MIGRATIONS = (
    Migration(
        1,
        "jobs, drains and the leader row",
        (
            """CREATE TABLE jobs (
                sequence BIGINT PRIMARY KEY,
                job_id TEXT NOT NULL UNIQUE,
                state SMALLINT NOT NULL,
                owner TEXT NOT NULL,
                client_request_id TEXT NOT NULL DEFAULT '',
                submit_time DOUBLE PRECISION NOT NULL,
                end_time DOUBLE PRECISION,
                data BYTEA NOT NULL
            )""",
            "COMMENT ON COLUMN jobs.end_time IS 'wall seconds the job reached a final state; NULL while it is not final'",
            # A request id is unique per owner: one user's retried submission never finds another user's job.
            "CREATE UNIQUE INDEX jobs_by_owner_and_request ON jobs(owner, client_request_id) WHERE client_request_id <> ''",
            # History reads are newest first (sequence descending), filtered by owner, state, or a time window.
            "CREATE INDEX jobs_by_owner ON jobs(owner, sequence)",
            "CREATE INDEX jobs_by_state ON jobs(state, sequence)",
            "CREATE INDEX jobs_by_submit_time ON jobs(submit_time)",
            # open() loads every job not ended and the newest ended; prune() deletes by end time.
            "CREATE INDEX jobs_not_ended ON jobs(sequence) WHERE end_time IS NULL",
            "CREATE INDEX jobs_by_end_time ON jobs(end_time) WHERE end_time IS NOT NULL",
            "CREATE TABLE drains (node_id TEXT PRIMARY KEY, reason TEXT NOT NULL)",
            """CREATE TABLE leader (
                id SMALLINT PRIMARY KEY CHECK (id = 1),
                epoch BIGINT NOT NULL,
                address TEXT NOT NULL,
                lease_until TIMESTAMPTZ NOT NULL
            )""",
            "INSERT INTO leader(id, epoch, address, lease_until) VALUES (1, 0, '', '-infinity')",
        ),
    ),
)

CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    # A database that vanishes without closing the connection (a host down, a partition) fails the
    # statement in seconds instead of hanging the writer for the kernel's default of minutes.
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "gpuorch-coordinator",
    # A leader frozen inside a write transaction (SIGSTOP, a paused VM) holds the leader row FOR SHARE
    # (check_fence), and every standby's take-over waits on that lock until it wakes. The server ends
    # a session idle inside a transaction this long, which frees the row; the coordinator's own
    # transactions send their statements back to back.
    "options": "-c idle_in_transaction_session_timeout=1000",
}
"""Connection parameters used where the URL does not give its own."""


def connection_string(url: str) -> str:
    """The URL's parameters with CONNECT_DEFAULTS for those it leaves out (sslmode, sslrootcert ... pass through)."""
    parameters = conninfo.conninfo_to_dict(url)
    for key, value in CONNECT_DEFAULTS.items():
        parameters.setdefault(key, value)
    return conninfo.make_conninfo("", **parameters)


def describe(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        parameters = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable URL)"
    user = str(parameters.get("user", ""))
    host = str(parameters.get("host", "")) or "localhost"
    port = str(parameters.get("port", ""))
    return f"postgresql://{user + '@' if user else ''}{host}{':' + str(port) if port else ''}/{parameters.get('dbname', '')}"


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (transactions are explicit) with the schema migrated."""
    connection = psycopg.connect(connection_string(url), autocommit=True)
    try:
        apply_migrations(connection, MIGRATIONS, POSTGRES)
    except BaseException:
        connection.close()
        raise
    return connection


def check_fence(cursor: psycopg.Cursor[Any], epoch: int) -> None:
    """Inside a write transaction: raises Fenced unless `epoch` still leads.

    FOR SHARE holds the leader row until the transaction ends; a take-over's UPDATE of that row
    waits for it, so once a take-over has committed no write of an older epoch can commit.
    """
    row = cursor.execute("SELECT epoch FROM leader WHERE id = 1 FOR SHARE").fetchone()
    leading = row[0] if row else 0
    if leading != epoch:
        raise Fenced(f"another coordinator leads now (epoch {leading}; this one's is {epoch}): write refused")
