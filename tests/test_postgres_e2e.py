"""A coordinator on PostgreSQL (store_url), with real agents; the settings that choose the store; and
`gpuorch-coordinator migrate` from a real SQLite store into a real PostgreSQL one."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psycopg
import pytest

from coordinator.settings import CoordinatorSettings
from coordinator.store.api import JobQuery, StoredJob
from coordinator.store.lease import LocalLease
from coordinator.store.open_url import open_store, parse_store_url
from coordinator.store.postgres import PostgresJobStore
from coordinator.store.sqlite import SqliteJobStore
from gpuorch.v1 import job_pb2
from tests.harness import REPO
from tests.store_backends import leading_postgres_store
from tests.test_jobs_e2e import wait_state

SUCCEEDED, RUNNING = job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING


def test_a_coordinator_on_postgresql_keeps_its_jobs_across_a_restart(cluster, postgres_url):
    flags = ("--store-url", postgres_url, "--stop-grace-period", "1", "--node-grace-period", "1.5")
    cluster.start_coordinator(*flags)
    cluster.add_agent("n1", 2, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    done = client.submit_job(job_pb2.JobSpec(argv=[sys.executable, "-c", "print('hi')"], gpus=1), client_request_id="r-1")
    wait_state(client, done, SUCCEEDED)
    running = client.submit_job(job_pb2.JobSpec(argv=[sys.executable, "-c", "import time; time.sleep(60)"], gpus=1))
    wait_state(client, running, RUNNING)
    with psycopg.connect(postgres_url) as connection:
        states = dict(connection.execute("SELECT job_id, state FROM jobs").fetchall())
    assert states == {done: SUCCEEDED, running: RUNNING}, "what the coordinator answered is in PostgreSQL"

    cluster.coordinator.stop()
    cluster.start_coordinator(*flags)
    client = cluster.client()
    assert client.get_job(done).state == SUCCEEDED
    again = client.submit_job(job_pb2.JobSpec(argv=[sys.executable, "-c", "print('hi')"], gpus=1), client_request_id="r-1")
    assert again == done, "an idempotent resubmission finds the job stored before the restart"
    adopted = wait_state(client, running, RUNNING)
    assert adopted.attempt == 1, "the running job is adopted, not relaunched"
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT epoch FROM leader").fetchone() == (2,)
    client.cancel_job(running)


def test_store_url_chooses_the_store_and_bad_ones_are_named():
    assert parse_store_url("", "/var/lib/gpuorch").target == "/var/lib/gpuorch/jobs.db"
    assert parse_store_url("sqlite:/data/jobs.db", "/x").target == "/data/jobs.db"
    assert parse_store_url("sqlite:///data/jobs.db", "/x").target == "/data/jobs.db"
    assert parse_store_url("postgresql://gpuorch@db/gpuorch?sslmode=verify-full", "/x").engine == "postgresql"
    for url, why in (
        ("mysql://db/gpuorch", "'mysql' is not a store gpuorch knows"),
        ("sqlite:", "names no SQLite file"),
        ("postgresql://db/gpuorch?nonsense=1", "not a valid PostgreSQL URL"),
    ):
        with pytest.raises(ValueError, match="store_url") as raised:
            CoordinatorSettings(store_url=url).validate()
        assert why in str(raised.value)
    with pytest.raises(ValueError, match="leader_lease_seconds must be > 0"):
        CoordinatorSettings(leader_lease_seconds=0).validate()


async def test_open_store_builds_sqlite_with_a_local_lease_and_postgresql_with_its_own(tmp_path, postgres_url):
    store, lease = open_store("", tmp_path)
    assert isinstance(store, SqliteJobStore) and isinstance(lease, LocalLease)
    await lease.acquire()
    state = await store.open()
    assert lease.epoch == state.epoch == 1
    await store.close()
    store, lease = open_store(postgres_url, tmp_path, lease_seconds=2.0, advertised_address="10.1.1.1:50051")
    assert isinstance(store, PostgresJobStore)
    epoch = await lease.acquire()
    assert (await store.open()).epoch == epoch and (await lease.leader()).address == "10.1.1.1:50051"
    await store.close()
    await lease.release()


def every_kind_of_job() -> list[StoredJob]:
    jobs = []
    for sequence, state in enumerate(job_pb2.JobState.values()[1:] * 3, start=1):
        record = job_pb2.Job(job_id=f"j-{sequence:06d}", state=state, spec=job_pb2.JobSpec(argv=["x"], gpus=1, owner="ann"))
        record.submit_time.FromSeconds(1_800_000_000 + sequence)
        if state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED):
            record.end_time.FromSeconds(1_800_000_100 + sequence)
        if state == job_pb2.JOB_STATE_RUNNING:
            record.attempt = 2
            record.placement.nodes.add(node_id="n1", device_uuids=["GPU-1"])
        jobs.append(StoredJob(sequence, record, f"req-{sequence}" if sequence % 2 else ""))
    return jobs


def run_migrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.main", "migrate", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


async def test_migrate_copies_every_job_drain_and_the_epoch_into_postgresql(tmp_path, postgres_url):
    source = tmp_path / "jobs.db"
    for _ in range(4):  # four opens: epoch 4
        store = SqliteJobStore(source)
        await store.open()
        await store.close()
    store = SqliteJobStore(source)
    await store.open()
    jobs = every_kind_of_job()
    await store.save(jobs, drains={"n1": "fan", "n2": "bad GPU"})
    await store.close()

    copied = run_migrate("--from", f"sqlite:{source}", "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert "copied 15 jobs (cancelled 3, failed 3, pending 3, running 3, succeeded 3), 2 drains and epoch 5" in copied.stdout
    assert "postgresql://postgres@127.0.0.1" in copied.stdout

    target = leading_postgres_store(postgres_url)
    state = await target.open()
    assert state.epoch == 6, "the first leader on PostgreSQL has a higher epoch than any the SQLite store gave"
    assert state.drains == {"n1": "fan", "n2": "bad GPU"}
    assert [(s.sequence, s.job, s.client_request_id) for s in state.jobs] == [
        (s.sequence, s.job, s.client_request_id) for s in jobs
    ]
    assert len(await target.query(JobQuery(states=frozenset({job_pb2.JOB_STATE_FAILED})))) == 3
    assert (await target.find_request("ann", "req-3")).sequence == 3
    await target.close()

    again = run_migrate("--from", f"sqlite:{source}", "--to", postgres_url)
    assert again.returncode == 2 and "already holds 15 jobs and 2 drains: nothing copied" in again.stderr
    forced = run_migrate("--from", f"sqlite:{source}", "--to", postgres_url, "--force")
    assert forced.returncode == 0, forced.stderr
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (15,)


async def test_migrate_refuses_a_store_a_coordinator_leads_and_bad_arguments(tmp_path, postgres_url):
    source = tmp_path / "jobs.db"
    store = SqliteJobStore(source)
    await store.open()
    await store.close()
    leader = leading_postgres_store(postgres_url, lease_seconds=60.0)
    await leader.open()
    refused = await asyncio.to_thread(run_migrate, "--from", f"sqlite:{source}", "--to", postgres_url)
    assert refused.returncode == 2 and "a coordinator leads" in refused.stderr
    await leader.close()
    missing = run_migrate("--from", f"sqlite:{tmp_path / 'none.db'}", "--to", postgres_url)
    assert missing.returncode == 2 and "no SQLite store at" in missing.stderr
    backwards = run_migrate("--from", postgres_url, "--to", f"sqlite:{source}")
    assert backwards.returncode == 2 and "migrate copies --from sqlite:PATH --to postgresql://" in backwards.stderr
