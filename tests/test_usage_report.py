"""Usage accounting as pure functions (coordinator/rules/usage_report.py) and gpuctl usage's rendering."""

from __future__ import annotations

import csv
import io
import json

import pytest

from coordinator.rules import job_machine, usage_report
from gpuorch.cli.usage_report import format_report
from gpuorch.v1 import job_pb2


def job(job_id: str, owner: str, pool: str, *attempts: tuple[float, float | None, int, float, int]) -> job_pb2.Job:
    """A job with attempts of (start, end or None while running, GPUs, mean utilisation, peak memory)."""
    made = job_pb2.Job(job_id=job_id, spec=job_pb2.JobSpec(owner=owner, pool=pool))
    for number, (start, end, gpus, utilization, peak) in enumerate(attempts, start=1):
        record = made.attempts.add(attempt=number, start_time=job_machine.stamp(start))
        record.placement.world_size = gpus
        if end is not None:
            record.end_time.CopyFrom(job_machine.stamp(end))
        usage_report.sample(record, [utilization, utilization], [peak // 2, peak], 10.0)
    return made


JOBS = [
    job("a1", "alice", "", (0.0, 100.0, 2, 50.0, 4 << 30), (200.0, 300.0, 4, 100.0, 8 << 30)),
    job("b1", "bob", "big", (50.0, None, 8, 10.0, 1 << 30)),
    job("p1", "alice", "", (400.0, 400.0, 2, 0.0, 0)),
]


def test_gpu_seconds_are_clipped_to_the_range_and_a_running_attempt_counts_up_to_until():
    response = usage_report.report(JOBS, job_pb2.USAGE_GROUP_BY_OWNER, 50.0, 250.0)
    rows = {row.key: row for row in response.rows}
    assert rows["alice"].gpu_seconds == pytest.approx(2 * 50 + 4 * 50) and rows["alice"].attempts == 2
    assert rows["bob"].gpu_seconds == pytest.approx(8 * 200), "running: up to until"
    assert [row.key for row in response.rows] == ["bob", "alice"], "most GPU-seconds first"
    assert response.total.gpu_seconds == pytest.approx(300 + 1600) and response.total.jobs == 2
    assert rows["alice"].mean_gpu_utilization_percent == pytest.approx((100 * 50 + 200 * 100) / 300), "weighed by GPU-seconds"
    assert rows["alice"].peak_memory_bytes == 8 << 30 and response.total.peak_memory_bytes == 8 << 30
    assert response.since.seconds == 50 and response.until.seconds == 250


def test_grouping_by_pool_and_by_job_and_one_owner_only():
    by_pool = {row.key: row.gpu_seconds for row in usage_report.report(JOBS, job_pb2.USAGE_GROUP_BY_POOL, 0, 1000).rows}
    assert by_pool == {"big": pytest.approx(8 * 950), "default": pytest.approx(2 * 100 + 4 * 100)}
    by_job = usage_report.report(JOBS, job_pb2.USAGE_GROUP_BY_JOB, 0, 1000, owner="alice").rows
    assert [(row.key, row.owner, row.pool) for row in by_job] == [("a1", "alice", "default")], "p1 ran no time"
    assert not usage_report.report(JOBS, job_pb2.USAGE_GROUP_BY_OWNER, 2000, 3000).rows[1:], "only bob's runs on"


def test_gpuctl_usage_renders_a_table_json_and_csv():
    response = usage_report.report(JOBS, job_pb2.USAGE_GROUP_BY_JOB, 0, 1000)
    text = format_report(response, "job", "table")
    assert text.splitlines()[0].split() == [
        "JOB",
        "OWNER",
        "POOL",
        "JOBS",
        "ATTEMPTS",
        "GPU-HOURS",
        "MEAN",
        "UTIL",
        "PEAK",
        "MEM",
    ]
    assert text.splitlines()[-1].startswith("total")
    document = json.loads(format_report(response, "job", "json"))
    assert document["total"]["gpu_seconds"] == pytest.approx(response.total.gpu_seconds, abs=0.001)
    assert [row["key"] for row in document["rows"]] == ["b1", "a1"]
    rows = list(csv.DictReader(io.StringIO(format_report(response, "job", "csv"))))
    assert (
        rows[0]["job"] == "b1"
        and rows[-1]["job"] == "total"
        and float(rows[1]["gpu_hours"]) == pytest.approx(600 / 3600, abs=1e-4)
    )
