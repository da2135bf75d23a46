"""Job arrays and dependencies end to end: a real coordinator, agents with simulated GPUs, real task processes
(tests/workloads/sweep_task.py records when each ran and reports a result), gpuctl as users run it."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from gpuorch.v1 import job_pb2
from tests.harness import REPO, wait_for
from tests.test_cli import gpuctl

SWEEP = str(REPO / "tests" / "workloads" / "sweep_task.py")
PENDING, SUCCEEDED, CANCELLED = job_pb2.JOB_STATE_PENDING, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_CANCELLED


def wait_state(client, job_id, state, timeout=90.0):
    name = job_pb2.JobState.Name(state)
    return wait_for(lambda: (job := client.get_job(job_id)).state == state and job, timeout=timeout, what=f"{job_id} {name}")


def records(events: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(events.glob("*-attempt-*.json"))]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    moments = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda m: (m[0], m[1]))
    running = most = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    return most


def test_a_capped_array_runs_two_at_once_and_a_merge_job_reads_every_result(cluster, tmp_path):
    cluster.start_coordinator("--stop-grace-period", "1")
    cluster.add_agent("n1", 4)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    events = tmp_path / "events"
    events.mkdir()
    array_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "{index}", "--sleep", "0.5"], array="0-5%2")
    merge_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "merge"], after=[f"{array_id}:ok"])
    wait_for(lambda: client.get_job(merge_id).reason.startswith(f"waiting for {array_id}"), timeout=30, what="merge waits")
    merge = wait_state(client, merge_id, SUCCEEDED)
    ran = records(events)
    assert sorted(int(record["argv_index"]) for record in ran) == list(range(6)), "every task once"
    assert most_at_once([(record["start"], record["end"]) for record in ran]) <= 2
    for record in ran:
        assert record["env"] == {
            "GPUORCH_ARRAY_ID": array_id,
            "GPUORCH_ARRAY_INDEX": record["argv_index"],
            "GPUORCH_ARRAY_SIZE": "6",
        }
        assert record["job_id"] == f"{array_id}[{record['argv_index']}]"
    merged = json.loads((events / "merge.json").read_text())
    assert merged["start"] > max(record["end"] for record in ran), "the merge ran after every task"
    assert [row["index"] for row in merged["results"]] == list(range(6))
    assert [row["result"]["loss"] for row in merged["results"]] == [round(1.0 / (1 + i), 4) for i in range(6)]
    assert json.loads(merge.result_json) == {"tasks": 6}
    view = client.get_job(array_id)
    assert (view.state, view.array.succeeded, view.array.max_running) == (SUCCEEDED, 6, 2)

    listed = gpuctl("--coordinator", cluster.address, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert array_id in listed.stdout and f"{array_id}[" not in listed.stdout, "an array is one line"
    assert "6 tasks: 6 succeeded (at most 2 at once)" in listed.stdout
    tasks = gpuctl("--coordinator", cluster.address, "jobs", "--tasks")
    assert tasks.stdout.count(f"{array_id}[") == 6
    shown = gpuctl("--coordinator", cluster.address, "results", array_id, "--sort", "loss", "-o", "csv")
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert [row["index"] for row in rows] == ["5", "4", "3", "2", "1", "0"], "sorted by the reported loss"
    assert {row["state"] for row in rows} == {"SUCCEEDED"} and all(float(row["runtime_seconds"]) > 0 for row in rows)
    unknown = gpuctl("--coordinator", cluster.address, "results", array_id, "--sort", "accuracy")
    assert unknown.returncode == 2 and "no task reported a result field 'accuracy'" in unknown.stderr


def test_a_failed_task_restarts_alone_and_an_ok_dependent_of_a_failure_is_cancelled(cluster, tmp_path):
    cluster.start_coordinator("--stop-grace-period", "1", "--restart-backoff-base", "0.2")
    cluster.add_agent("n1", 3)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    events = tmp_path / "events"
    events.mkdir()
    flaky = [sys.executable, SWEEP, str(events), "{index}", "--fail-first-attempt"]
    array_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "{index}"], array="0-1", max_restarts=1)
    flaky_id = client.submit_job(argv=flaky, array="7", max_restarts=1)
    failing_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "9", "--fail"])
    dependent_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "8"], after=[f"{failing_id}:ok"])
    cancelled = wait_state(client, dependent_id, CANCELLED)
    assert cancelled.reason == f"cancelled: dependency {failing_id}:ok can never be met: it FAILED"
    assert not (events / "8-attempt-1.json").exists(), "the dependent never ran"
    assert wait_state(client, f"{flaky_id}[7]", SUCCEEDED).attempt == 2
    for index in (0, 1):
        assert wait_state(client, f"{array_id}[{index}]", SUCCEEDED).attempt == 1, "the other tasks ran once"
    refused = gpuctl("--coordinator", cluster.address, "submit", "--after", f"{failing_id}:ok", "--", "true")
    assert refused.returncode == 1 and "can never be met: it FAILED" in refused.stderr


def test_an_array_and_its_dependent_survive_a_coordinator_sigkill(cluster, tmp_path):
    options = ("--stop-grace-period", "1", "--node-grace-period", "5")
    cluster.start_coordinator(*options)
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    events = tmp_path / "events"
    events.mkdir()
    # A restart each: a task placed (durably) just before the kill, whose launch never reached the agent, is
    # judged lost when the agent re-registers without it, and restarts; it ran no process, so none runs twice.
    sweep = [sys.executable, SWEEP, str(events), "{index}", "--sleep", "1"]
    array_id = client.submit_job(argv=sweep, array="0-3%1", max_restarts=1)
    merge_id = client.submit_job(argv=[sys.executable, SWEEP, str(events), "merge"], after=[array_id])
    wait_for(lambda: client.get_job(array_id).array.succeeded >= 1, timeout=60, what="a task to succeed")
    cluster.coordinator.kill()
    cluster.start_coordinator(*options)
    assert client.get_job(merge_id).state == PENDING
    wait_state(client, merge_id, SUCCEEDED)
    ran = records(events)
    assert sorted(int(record["argv_index"]) for record in ran) == [0, 1, 2, 3], "no task lost, none run twice"
    assert most_at_once([(record["start"], record["end"]) for record in ran]) == 1
    merged = json.loads((events / "merge.json").read_text())
    assert [row["state"] for row in merged["results"]] == ["SUCCEEDED"] * 4
