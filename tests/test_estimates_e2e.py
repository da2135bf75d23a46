"""Start-time estimates and quotas on a real coordinator and agent on loopback, read with gpuctl and the SDK."""

from __future__ import annotations

import json
import sys

import pytest

from gpuorch.errors import ResourceExhausted
from gpuorch.v1 import job_pb2
from tests.harness import wait_for
from tests.test_cli import gpuctl

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
RUNNING, PENDING = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_PENDING


def start(cluster, config: str, gpus: int):
    path = cluster.root / "coordinator.toml"
    path.write_text(config)
    cluster.start_coordinator("--config", str(path), "--stop-grace-period", "1")
    cluster.add_agent("n1", gpus)
    cluster.wait_for_nodes(1)
    return cluster.client()


def row_of(table: str, job_id: str) -> dict[str, str]:
    """One row of a gpuctl table as header -> cell (cells are separated by two spaces or more)."""
    lines = table.splitlines()
    header = lines[0]
    starts = [i for i in range(len(header)) if header[i] != " " and (i == 0 or header[i - 1] == " ")]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    for line in lines[1:]:
        if line.startswith(job_id):
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
            return dict(zip(names, cells, strict=True))
    raise AssertionError(f"{job_id} is not in:\n{table}")


def test_gpuctl_jobs_shows_when_a_queued_job_should_start_and_a_pending_quota_refuses_naming_itself(cluster):
    client = start(cluster, 'start_estimate_interval_seconds = 0.2\n[quotas.users."*"]\nmax_pending_jobs = 1\n', gpus=1)
    address = ["--coordinator", cluster.address]
    running = gpuctl(*address, "submit", "--estimated-runtime", "600", "--", *SLEEP).stdout.strip()
    wait_for(lambda: client.get_job(running).state == RUNNING, timeout=20, what="the first job to run")
    queued = gpuctl(*address, "submit", "--estimated-runtime", "60", "--", *SLEEP).stdout.strip()
    started = client.get_job(running).start_time.ToNanoseconds() / 1e9
    job = wait_for(lambda: (j := client.get_job(queued)).HasField("estimated_start_time") and j, timeout=10, what="an estimate")
    assert job.state == PENDING
    assert job.estimated_start_time.ToNanoseconds() / 1e9 == pytest.approx(started + 600, abs=1.0)
    listed = gpuctl(*address, "--utc", "jobs")
    assert listed.returncode == 0, listed.stderr
    assert row_of(listed.stdout, queued)["START"] == job.estimated_start_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    assert row_of(listed.stdout, running)["START"].endswith("UTC")  # a running job shows when it started
    shown = json.loads(gpuctl(*address, "-o", "json", "job", queued).stdout)
    assert shown["estimated_start_time"] == job.estimated_start_time.ToJsonString()
    assert "Est. start:" in gpuctl(*address, "job", queued).stdout
    # The user's pending quota ("*": every user) is full: the next submission is refused, naming it.
    with pytest.raises(
        ResourceExhausted, match=r'already has 1 pending jobs; the limit is quotas\.users\."\*"\.max_pending_jobs=1'
    ):
        client.submit_job(argv=SLEEP, gpus=1)
    client.cancel_job(queued)
    client.cancel_job(running)


def test_a_user_s_second_job_waits_with_a_reason_naming_the_gpu_quota(cluster):
    client = start(cluster, "[quotas.users.alice]\nmax_gpus = 1\n", gpus=2)
    first = client.submit_job(argv=SLEEP, gpus=1, owner="alice")
    wait_for(lambda: client.get_job(first).state == RUNNING, timeout=20, what="alice's first job to run")
    second = client.submit_job(argv=SLEEP, gpus=1, owner="alice")
    other = client.submit_job(argv=SLEEP, gpus=1, owner="bob")
    wait_for(
        lambda: RUNNING in (client.get_job(second).state, client.get_job(other).state), timeout=20, what="a second job to run"
    )
    assert client.get_job(other).state == RUNNING, "bob's job takes the free GPU"
    held = client.get_job(second)
    assert held.state == PENDING and held.reason.startswith("quota: ") and "alice" in held.reason, held.reason
    for job_id in (first, second, other):
        client.cancel_job(job_id)
