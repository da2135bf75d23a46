"""Versioned schema migrations: a table of applied versions, each migration applied once, in a transaction.

A backend lists its migrations (version 1, 2, ... in order, never edited once released: a change
is a new version) and calls `apply_migrations` at open, on a DB-API connection in autocommit mode
(sqlite3 with isolation_level=None, psycopg with autocommit=True). What differs between engines is
a `Dialect`: the parameter placeholder, how a transaction begins, and the statement that keeps two
processes from migrating one database at once.

Which migrations are due is a pure function (`due_migrations`) of the versions applied; a
database migrated by a newer gpuorch (a version this one does not know) is refused, not changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

VERSIONS_TABLE = "schema_migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    """Run in order, in one transaction with the record of the version."""
    then: Callable[[Any], None] | None = None
    """Run after the statements, in the same transaction, with the connection: for a step SQL alone
    cannot make (filling new columns from the jobs' stored records)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: str
    """How a statement's parameter is written: "?" (sqlite3) or "%s" (psycopg)."""
    begin: str = "BEGIN"
    """Starts a migration's transaction ("BEGIN IMMEDIATE" in SQLite takes the write lock at once)."""
    serialize: str = ""
    """Run first in each transaction so that concurrent openers migrate one at a time (an advisory lock); empty
    where `begin` already serializes writers."""


SQLITE = Dialect(placeholder="?", begin="BEGIN IMMEDIATE")
POSTGRES = Dialect(placeholder="%s", serialize="SELECT pg_advisory_xact_lock(7432014)")
"""The lock's key is a constant of gpuorch's: only gpuorch's migrations take it."""


class MigrationError(RuntimeError):
    """The schema cannot be brought to this gpuorch's version; the message says why."""


def check_migrations(migrations: Sequence[Migration]) -> None:
    """Raises ValueError unless the versions are 1, 2, ... in order (a programming error, caught by the tests)."""
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, ... in order, got {versions}")


def due_migrations(applied: set[int], migrations: Sequence[Migration]) -> list[Migration]:
    """The migrations not applied yet, in order. Raises MigrationError if the database has a version this
    code does not know (a newer gpuorch migrated it)."""
    check_migrations(migrations)
    known = len(migrations)
    unknown = sorted(version for version in applied if not 1 <= version <= known)
    if unknown:
        raise MigrationError(
            f"the database's schema has version {unknown[-1]}, newer than this gpuorch knows ({known}): "
            "run the gpuorch that migrated it, or a newer one"
        )
    return [migration for migration in migrations if migration.version not in applied]


def apply_migrations(connection: Any, migrations: Sequence[Migration], dialect: Dialect) -> list[int]:
    """Applies every due migration, each in its own transaction with its version's row; returns the versions
    applied now (none when the schema is current). Safe when several processes open the database at once."""
    check_migrations(migrations)
    connection.execute(
        f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
        "applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    applied_now: list[int] = []
    while True:
        connection.execute(dialect.begin)
        try:
            if dialect.serialize:
                connection.execute(dialect.serialize)
            applied = {row[0] for row in connection.execute(f"SELECT version FROM {VERSIONS_TABLE}").fetchall()}
            due = due_migrations(applied, migrations)
            if not due:
                connection.execute("COMMIT")
                return applied_now
            migration = due[0]
            for statement in migration.statements:
                connection.execute(statement)
            if migration.then is not None:
                migration.then(connection)
            connection.execute(
                f"INSERT INTO {VERSIONS_TABLE}(version, description) VALUES ({dialect.placeholder}, {dialect.placeholder})",
                (migration.version, migration.description),
            )
            connection.execute("COMMIT")
            applied_now.append(migration.version)
        except BaseException:
            try:
                connection.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the connection may be gone; the first error is the one to raise
                pass
            raise
