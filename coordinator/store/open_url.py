"""The store and lease that a `store_url` names: SQLite in a file (one coordinator), or PostgreSQL (shared).

    ""                      SQLite at <state_dir>/jobs.db (the default)
    sqlite:PATH             SQLite at PATH (sqlite:///abs/path also)
    postgresql://...        PostgreSQL (libpq's URL: user, host, port, database, sslmode, sslcert ...);
                            postgres://... also

`parse_store_url` checks the setting (a ValueError names it); `open_store` builds the pair. The
caller acquires the lease before opening the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.store.api import JobStore
from coordinator.store.lease import Lease, LocalLease
from gpuorch.clock import SYSTEM_CLOCK, Clock

SQLITE_PREFIX = "sqlite:"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class StoreLocation:
    engine: str
    """"sqlite" or "postgresql"."""
    target: str
    """The SQLite file's path, or the PostgreSQL URL."""


def parse_store_url(url: str, state_dir: str | Path) -> StoreLocation:
    """Where `url` (the store_url setting) says the store is; raises ValueError naming the setting if it is no store."""
    url = url.strip()
    if not url:
        return StoreLocation("sqlite", str(Path(state_dir) / "jobs.db"))
    if url.startswith(SQLITE_PREFIX):
        path = url.removeprefix(SQLITE_PREFIX)
        if path.startswith("//"):
            path = path[2:]
        if not path or path.endswith("/"):
            raise ValueError(f"store_url {url!r} names no SQLite file: write sqlite:/path/to/jobs.db")
        return StoreLocation("sqlite", path)
    if url.startswith(POSTGRES_SCHEMES):
        from psycopg import ProgrammingError, conninfo

        try:
            conninfo.conninfo_to_dict(url)
        except ProgrammingError as error:
            raise ValueError(f"store_url is not a valid PostgreSQL URL: {error}") from None
        return StoreLocation("postgresql", url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(
        f"store_url must be empty (SQLite in state_dir), sqlite:PATH or postgresql://USER@HOST/DATABASE; "
        f"{scheme!r} is not a store gpuorch knows"
    )


def read_epoch(directory: Path) -> int:
    """The epoch the SQLite store wrote last (the file `epoch` beside the database); 0 before the first open."""
    try:
        return int((directory / "epoch").read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def open_store(
    url: str,
    state_dir: str | Path,
    *,
    lease_seconds: float = 3.0,
    advertised_address: str = "",
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[JobStore, Lease]:
    """The store `url` names and its lease (not acquired yet, the store not open)."""
    location = parse_store_url(url, state_dir)
    if location.engine == "postgresql":
        from coordinator.store.postgres import PostgresJobStore, PostgresLease

        lease: Lease = PostgresLease(location.target, advertised_address, lease_seconds, clock)
        return PostgresJobStore(location.target, lease), lease
    from coordinator.store.sqlite import SqliteJobStore

    path = Path(location.target)
    return SqliteJobStore(path), LocalLease(lambda: read_epoch(path.parent), advertised_address)
