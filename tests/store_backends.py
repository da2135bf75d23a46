"""Stores of every backend for tests that hold them all to the same contract (tests/test_store*.py).

`StoreMaker(kind, ...)()` is the store as a (re)started coordinator finds it: a new SQLite store on the
same file, a new PostgreSQL store with a lease of its own on the same database, or the same memory
store. The PostgreSQL one takes the lease at open and gives it up at close, as a coordinator does.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.store.api import JobStore, StoredState
from coordinator.store.memory import MemoryJobStore
from coordinator.store.postgres import PostgresJobStore, PostgresLease
from coordinator.store.sqlite import SqliteJobStore

BACKENDS = ("sqlite", "memory", "postgres")
DURABLE_BACKENDS = ("sqlite", "postgres")
"""The ones with a writer thread and group commits."""


class LeadingPostgresStore(PostgresJobStore):
    """A PostgreSQL store that acquires its lease at open and releases it at close."""

    async def open(self) -> StoredState:
        await self.lease.acquire()
        return await super().open()

    async def close(self) -> None:
        await super().close()
        await self.lease.release()


def leading_postgres_store(url: str, lease_seconds: float = 3.0, address: str = "127.0.0.1:1") -> LeadingPostgresStore:
    return LeadingPostgresStore(url, PostgresLease(url, address, lease_seconds))


class StoreMaker:
    def __init__(self, kind: str, tmp_path: Path, request) -> None:
        self.kind = kind
        self.path = tmp_path / "jobs.db"
        self.memory = MemoryJobStore()
        self.url = request.getfixturevalue("postgres_url") if kind == "postgres" else ""

    def __call__(self) -> JobStore:
        if self.kind == "sqlite":
            return SqliteJobStore(self.path)
        if self.kind == "postgres":
            return leading_postgres_store(self.url)
        return self.memory
