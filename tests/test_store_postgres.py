"""The PostgreSQL store's own concerns, against a real server: the leader lease and fencing, restarts of the
database, and the schema's migrations (the runner is generic: SQLite runs it here too)."""

from __future__ import annotations

import asyncio
import sqlite3

import psycopg
import pytest

from coordinator.store.api import Fenced, StoredJob, StoreError
from coordinator.store.lease import LeaseLost
from coordinator.store.migrations import POSTGRES, SQLITE, Migration, MigrationError, apply_migrations, due_migrations
from coordinator.store.postgres import PostgresJobStore, PostgresLease
from coordinator.store.postgres_schema import MIGRATIONS, describe
from gpuorch.v1 import job_pb2


def job(sequence: int, state=job_pb2.JOB_STATE_PENDING) -> StoredJob:
    return StoredJob(sequence, job_pb2.Job(job_id=f"j-{sequence:06d}", state=state, spec=job_pb2.JobSpec(argv=["x"], gpus=1)))


def stored_sequences(url: str) -> list[int]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute("SELECT sequence FROM jobs ORDER BY sequence")]


async def leading(url: str, address: str, lease_seconds: float) -> tuple[PostgresJobStore, PostgresLease]:
    lease = PostgresLease(url, address, lease_seconds)
    await lease.acquire()
    store = PostgresJobStore(url, lease)
    await store.open()
    return store, lease


async def test_a_deposed_leader_is_fenced_and_its_lease_is_lost(postgres_url):
    store_a, lease_a = await leading(postgres_url, "10.0.0.1:50051", lease_seconds=1.0)
    await store_a.save([job(1)])
    holding = asyncio.create_task(lease_a.hold())

    lease_b = PostgresLease(postgres_url, "10.0.0.2:50051", lease_seconds=1.0)
    with pytest.raises(TimeoutError):  # A renews: B waits, past several lease lengths
        await asyncio.wait_for(lease_b.acquire(), timeout=3.0)
    assert lease_b.epoch == 0
    assert await lease_b.leader() == await lease_a.leader()
    assert (await lease_b.leader()).address == "10.0.0.1:50051"

    holding.cancel()  # A freezes: it stops renewing, but keeps running and writing
    with pytest.raises(asyncio.CancelledError):
        await holding
    epoch_b = await asyncio.wait_for(lease_b.acquire(), timeout=10.0)
    assert epoch_b > lease_a.epoch
    store_b = PostgresJobStore(postgres_url, lease_b)
    state = await store_b.open()
    assert state.epoch == epoch_b and [stored.sequence for stored in state.jobs] == [1]
    assert (await lease_a.leader()).address == "10.0.0.2:50051"

    with pytest.raises(Fenced, match=f"epoch {epoch_b}"):
        await store_a.save([job(1, job_pb2.JOB_STATE_CANCELLED), job(2)], drains={"n1": "stale"})
    with pytest.raises(Fenced):
        await store_a.prune(2e9)
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(lease_a.hold(), timeout=5.0)
    await store_b.save([job(3)])
    assert stored_sequences(postgres_url) == [1, 3]
    assert (await store_b.get("j-000001")).job.state == job_pb2.JOB_STATE_PENDING
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM drains").fetchone() == (0,), "the fenced drain landed"
    await store_a.close()
    await store_b.close()


async def test_a_released_lease_is_taken_at_once_with_a_higher_epoch(postgres_url):
    store_a, lease_a = await leading(postgres_url, "a:1", lease_seconds=30.0)
    await store_a.close()
    await lease_a.release()
    assert (await lease_a.leader()).address == ""
    lease_b = PostgresLease(postgres_url, "b:1", lease_seconds=30.0)
    assert await asyncio.wait_for(lease_b.acquire(), timeout=5.0) == lease_a.epoch + 1
    assert await lease_b.leader() == type(await lease_b.leader())("b:1", lease_a.epoch + 1)
    await lease_b.release()


async def test_a_store_opens_only_once_its_coordinator_leads(postgres_url):
    with pytest.raises(StoreError, match="acquire the lease first"):
        await PostgresJobStore(postgres_url, PostgresLease(postgres_url, "a:1")).open()


async def test_writes_fail_while_the_database_is_down_and_succeed_once_it_is_back(postgres_server, postgres_url):
    store, lease = await leading(postgres_url, "a:1", lease_seconds=30.0)
    await store.save([job(1)])
    postgres_server.stop()
    try:
        with pytest.raises(StoreError, match="write failed"):
            await store.save([job(2)])
    finally:
        postgres_server.ensure_running()
    await store.save([job(3)])  # the first write after the restart reconnects
    assert (await store.get("j-000003")) is not None
    postgres_server.restart()
    await store.save([job(4)], drains={"n1": "fan"})  # a connection closed by a restart is replaced, nothing lost
    assert stored_sequences(postgres_url) == [1, 3, 4]
    await store.close()
    await lease.release()


async def test_the_lease_survives_a_quick_database_restart_and_is_lost_to_a_long_outage(postgres_server, postgres_url):
    lease = PostgresLease(postgres_url, "a:1", lease_seconds=3.0)
    epoch = await lease.acquire()
    holding = asyncio.create_task(lease.hold())
    await asyncio.sleep(1.5)
    await asyncio.to_thread(postgres_server.restart)
    await asyncio.sleep(3.5)
    assert not holding.done(), "a restart shorter than the lease must not lose it"
    assert (await lease.leader()).epoch == epoch
    await asyncio.to_thread(postgres_server.stop)
    try:
        with pytest.raises(LeaseLost, match="no renewal succeeded"):
            await asyncio.wait_for(holding, timeout=10.0)
    finally:
        postgres_server.ensure_running()


def test_due_migrations_are_those_not_applied_and_a_newer_schema_is_refused():
    migrations = (Migration(1, "a", ()), Migration(2, "b", ()), Migration(3, "c", ()))
    assert [m.version for m in due_migrations({1}, migrations)] == [2, 3]
    assert due_migrations({1, 2, 3}, migrations) == []
    with pytest.raises(MigrationError, match="version 4, newer than this gpuorch knows"):
        due_migrations({1, 2, 3, 4}, migrations)
    with pytest.raises(ValueError, match=r"1, 2, \.\.\. in order"):
        due_migrations(set(), (Migration(1, "a", ()), Migration(3, "c", ())))


def test_each_migration_is_applied_once_in_a_transaction(postgres_url):
    migrations = (
        Migration(1, "table", ("CREATE TABLE t (x INTEGER)",)),
        Migration(2, "row", ("INSERT INTO t VALUES (1)",)),
    )
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        assert apply_migrations(connection, migrations, POSTGRES) == [1, 2]
        assert apply_migrations(connection, migrations, POSTGRES) == []
        broken = (*migrations, Migration(3, "half", ("INSERT INTO t VALUES (2)", "INSERT INTO missing VALUES (1)")))
        with pytest.raises(psycopg.errors.UndefinedTable):
            apply_migrations(connection, broken, POSTGRES)
        assert connection.execute("SELECT x FROM t").fetchall() == [(1,)], "a failed migration leaves nothing"
        versions = connection.execute("SELECT version, description FROM schema_migrations ORDER BY version").fetchall()
        assert versions == [(1, "table"), (2, "row")]


def test_the_runner_is_the_same_for_sqlite(tmp_path):
    migrations = (Migration(1, "table", ("CREATE TABLE t (x INTEGER)",)), Migration(2, "row", ("INSERT INTO t VALUES (1)",)))
    connection = sqlite3.connect(tmp_path / "db", isolation_level=None)
    assert apply_migrations(connection, migrations[:1], SQLITE) == [1]
    assert apply_migrations(connection, migrations, SQLITE) == [2]
    assert connection.execute("SELECT x FROM t").fetchall() == [(1,)]
    connection.close()


async def test_coordinators_opening_one_new_database_at_once_migrate_it_once(postgres_url):
    leases = [PostgresLease(postgres_url, f"c{i}:1", lease_seconds=30.0) for i in range(4)]
    winners = await asyncio.wait(
        [asyncio.create_task(lease.acquire()) for lease in leases], timeout=5.0, return_when=asyncio.FIRST_COMPLETED
    )
    done, pending = winners
    assert [task.result() for task in done] == [1]
    for task in pending:
        task.cancel()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(MIGRATIONS),)


def test_urls_in_messages_have_no_password():
    assert describe("postgresql://gpuorch:s3cret@db.example:5433/gpuorch?sslmode=verify-full") == (
        "postgresql://gpuorch@db.example:5433/gpuorch"
    )
