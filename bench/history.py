"""Job history at scale: a store seeded with a million ended jobs, history reads and coordinator start-up timed.

    python bench/history.py --store sqlite --jobs 1000000
    python bench/history.py --store postgresql --jobs 1000000   # starts its own PostgreSQL (fsync on)

Seeding: SQL rows go straight into the store's own schema (made by the store's open, so the columns
and indexes are the ones it writes): SQLite in batched executemany transactions, PostgreSQL with
COPY; the memory store is seeded through its own save. Then it times `query` for typical history
reads (median of --repeat runs) and `open` as a restarted coordinator makes it (on PostgreSQL with
its lease taken first, as a coordinator does). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from coordinator.store import history
from coordinator.store.api import JobQuery, JobStore, StoredJob
from coordinator.store.memory import MemoryJobStore
from coordinator.store.postgres import job_row
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import job_pb2

DAY = 86400.0
OWNERS = 200
UNFINISHED = 1000
"""Pending and running jobs on top of the ended ones (what a busy cluster has)."""
BATCH = 20_000


def make_jobs(count: int, now: float, rng: random.Random):
    """(sequence, StoredJob) of `count` ended jobs over 90 days, then UNFINISHED pending/running ones."""
    template = job_pb2.Job(spec=job_pb2.JobSpec(argv=["python", "train.py", "--epochs", "10"], gpus=4, name="train"))
    attempt = template.attempts.add(attempt=1)
    attempt.placement.nodes.add(node_id="node-0001", device_uuids=[f"GPU-{n}" for n in range(4)])
    template.placement.CopyFrom(attempt.placement)
    start = now - 90 * DAY
    for sequence in range(1, count + UNFINISHED + 1):
        job = job_pb2.Job()
        job.CopyFrom(template)
        job.job_id = f"j-{sequence:06d}-bench0"
        job.spec.owner = f"user-{rng.randrange(OWNERS):03d}"
        submitted = start + (sequence / (count + UNFINISHED)) * 90 * DAY
        job.submit_time.FromNanoseconds(int(submitted * 1e9))
        job.start_time.FromNanoseconds(int((submitted + 30) * 1e9))
        if sequence <= count:
            roll = rng.random()
            job.state = job_pb2.JOB_STATE_SUCCEEDED
            if roll < 0.15:
                job.state = job_pb2.JOB_STATE_FAILED if roll < 0.1 else job_pb2.JOB_STATE_CANCELLED
            ended = min(submitted + 30 + rng.uniform(60, 10 * 3600), now)
            job.end_time.FromNanoseconds(int(ended * 1e9))
            job.reason = "rank 0 on node-0001 exited with code 1" if job.state == job_pb2.JOB_STATE_FAILED else "done"
        else:
            job.state = job_pb2.JOB_STATE_RUNNING if sequence % 2 else job_pb2.JOB_STATE_PENDING
        yield StoredJob(sequence, job, f"req-{sequence}")


def seed_sqlite(path: Path, jobs) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    batch = []

    def flush() -> None:
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO jobs(sequence, job_id, state, owner, client_request_id, data, submit_time, end_time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            batch,
        )
        connection.execute("COMMIT")
        batch.clear()

    for stored in jobs:
        job = stored.job
        batch.append((stored.sequence, job.job_id, job.state, job.spec.owner, stored.client_request_id,
                      job.SerializeToString(), history.submitted_at(job), history.ended_at(job)))  # fmt: skip
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    connection.execute("ANALYZE")
    connection.close()


def seed_postgres(url: str, jobs) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        with cursor.copy(
            "COPY jobs (sequence, job_id, state, owner, client_request_id, submit_time, end_time, data) FROM STDIN"
        ) as copy:
            for stored in jobs:
                copy.write_row(job_row(stored))  # the columns exactly as the store writes them
        cursor.execute("ANALYZE jobs")


async def seed_memory(store: MemoryJobStore, jobs) -> None:
    batch = []
    for stored in jobs:
        batch.append(stored)
        if len(batch) == BATCH:
            await store.save(batch)
            batch = []
    await store.save(batch)


async def timed(read, repeat: int) -> dict:
    seconds, found = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        found = len(await read())
        seconds.append(time.perf_counter() - started)
    return {"median_ms": round(statistics.median(seconds) * 1000, 2), "max_ms": round(max(seconds) * 1000, 2), "jobs": found}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql", "memory"), default="sqlite")
    parser.add_argument("--jobs", type=int, default=1_000_000, help="ended jobs to seed")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dir", default="", help="where the SQLite database goes (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(14)
    now = time.time()
    server, url = None, ""
    if args.store == "postgresql":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.postgres_server import PostgresServer

        server = PostgresServer.start(fsync=True)
        url = server.create_database("history")
    try:
        await run(args, rng, now, url)
    finally:
        if server is not None:
            server.destroy()


async def run(args: argparse.Namespace, rng: random.Random, now: float, url: str) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir or None) as directory:
        path = Path(directory) / "jobs.db"
        seeding = time.perf_counter()
        memory = MemoryJobStore()

        def make_store() -> JobStore:
            if args.store == "postgresql":
                from tests.store_backends import leading_postgres_store

                return leading_postgres_store(url)
            return SqliteJobStore(path) if args.store == "sqlite" else memory

        if args.store == "sqlite":
            empty = SqliteJobStore(path)
            await empty.open()  # the store makes its schema
            await empty.close()
            seed_sqlite(path, make_jobs(args.jobs, now, rng))
        elif args.store == "postgresql":
            empty = make_store()
            await empty.open()
            await empty.close()
            seed_postgres(url, make_jobs(args.jobs, now, rng))
        else:
            await memory.open()
            await seed_memory(memory, make_jobs(args.jobs, now, rng))
        seed_seconds = time.perf_counter() - seeding

        store = make_store()
        started = time.perf_counter()
        state = await store.open()
        open_seconds = time.perf_counter() - started
        failed = frozenset({job_pb2.JOB_STATE_FAILED})
        reads = {
            "one_user_last_week": JobQuery(owner="user-007", active_since=now - 7 * DAY),
            "failed_in_a_day": JobQuery(states=failed, active_since=now - DAY, active_until=now),
            "failed_in_a_day_60_days_ago": JobQuery(states=failed, active_since=now - 61 * DAY, active_until=now - 60 * DAY),
            "deep_page": JobQuery(below_sequence=args.jobs // 2),
            "one_user_deep_page": JobQuery(owner="user-007", below_sequence=args.jobs // 4),
            "everyone_one_day_60_days_ago": JobQuery(active_since=now - 61 * DAY, active_until=now - 60 * DAY),
        }
        results = {name: await timed(lambda query=query: store.query(query), args.repeat) for name, query in reads.items()}
        results["get_old_job"] = await timed(lambda: _listed(store.get("j-000010-bench0")), args.repeat)
        old = await store.get("j-000010-bench0")
        owner = old.job.spec.owner if old is not None else ""
        results["find_request_old_job"] = await timed(lambda: _listed(store.find_request(owner, "req-10")), args.repeat)
        await store.close()
        size = path.stat().st_size if path.exists() else _postgres_bytes(url)
    print(json.dumps({
        "store": args.store,
        "ended_jobs": args.jobs,
        "unfinished_jobs": UNFINISHED,
        "seed_seconds": round(seed_seconds, 1),
        "database_bytes": size,
        "open_seconds": round(open_seconds, 3),
        "open_jobs_loaded": len(state.jobs),
        "query_limit": JobQuery().limit,
        "reads": results,
    }))  # fmt: skip


def _postgres_bytes(url: str) -> int:
    if not url:
        return 0
    import psycopg

    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


async def _listed(read) -> list:
    found = await read
    return [found] if found is not None else []


if __name__ == "__main__":
    asyncio.run(main())
