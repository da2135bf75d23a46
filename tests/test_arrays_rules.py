"""Pure rules of arrays, dependencies and shards: no I/O, no processes."""

from __future__ import annotations

import json
import re

import pytest

from coordinator.rules.dependencies import Progress, Verdict, decide, dependency_cycle, outcome
from gpuorch import worker
from gpuorch.arrays import (
    MAX_ARRAY_TASKS,
    array_indexes,
    format_array,
    parse_array,
    parse_dependency,
    split_task_id,
    substitute_index,
    task_id,
)
from gpuorch.sharding import capacity_of, shard_bounds, split_counts
from gpuorch.v1 import job_pb2

OK, FAIL, ANY = job_pb2.DEPENDENCY_CONDITION_OK, job_pb2.DEPENDENCY_CONDITION_FAIL, job_pb2.DEPENDENCY_CONDITION_ANY

# -- array indexes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "indexes", "cap"),
    [("0-99", range(100), 0), ("0-99:4%8", range(0, 100, 4), 8), ("7", range(7, 8), 0), ("3%1", range(3, 4), 1)],
)
def test_array_text_gives_its_indexes_and_cap(text, indexes, cap):
    array = parse_array(text)
    assert array_indexes(array) == indexes
    assert array.max_running == cap
    assert parse_array(format_array(array)) == array


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("9-3", "last index (3) is below the first (9)"),
        ("0-99999999", "above the largest"),
        (f"0-{MAX_ARRAY_TASKS}", f"it has {MAX_ARRAY_TASKS + 1} tasks; the limit is {MAX_ARRAY_TASKS}"),
        ("a-b", "wants FIRST-LAST"),
        ("1,2,3", "wants FIRST-LAST"),
        ("0-9%", "wants FIRST-LAST"),
    ],
)
def test_bad_array_text_is_refused_naming_why(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_array(text)


def test_task_ids_and_index_substitution():
    assert task_id("j-000123-k7f3q2", 7) == "j-000123-k7f3q2[7]"
    assert split_task_id("j-000123-k7f3q2[7]") == ("j-000123-k7f3q2", 7)
    assert split_task_id("j-000123-k7f3q2") is None
    assert substitute_index(["run", "--seed={index}", "{'a': 1}"], 4) == ["run", "--seed=4", "{'a': 1}"]


def test_dependency_text():
    assert parse_dependency("j-1").condition == OK
    assert parse_dependency("j-1:FAIL").condition == FAIL
    assert parse_dependency("j-1[3]:any") == job_pb2.JobDependency(job_id="j-1[3]", condition=ANY)
    with pytest.raises(ValueError, match="the condition 'done' is unknown"):
        parse_dependency("j-1:done")


# -- dependencies ----------------------------------------------------------------------------------------

RUNNING = Progress.of_job(job_pb2.JOB_STATE_RUNNING)
SUCCEEDED = Progress.of_job(job_pb2.JOB_STATE_SUCCEEDED)
FAILED = Progress.of_job(job_pb2.JOB_STATE_FAILED)
CANCELLED = Progress.of_job(job_pb2.JOB_STATE_CANCELLED)


@pytest.mark.parametrize(
    ("condition", "progress", "verdict"),
    [
        (OK, RUNNING, Verdict.WAITING),
        (OK, SUCCEEDED, Verdict.MET),
        (OK, FAILED, Verdict.NEVER),
        (OK, CANCELLED, Verdict.NEVER),
        (FAIL, RUNNING, Verdict.WAITING),
        (FAIL, FAILED, Verdict.MET),
        (FAIL, CANCELLED, Verdict.MET),
        (FAIL, SUCCEEDED, Verdict.NEVER),
        (ANY, RUNNING, Verdict.WAITING),
        (ANY, FAILED, Verdict.MET),
        (ANY, SUCCEEDED, Verdict.MET),
    ],
)
def test_one_job_dependency(condition, progress, verdict):
    assert outcome(condition, progress).verdict is verdict


def test_an_array_is_done_when_every_task_is():
    half = Progress(total=4, running=1, pending=1, succeeded=2, array=True)
    assert outcome(OK, half) == outcome(ANY, half)
    assert outcome(OK, half).detail == "2 of 4 tasks ended (1 running, 1 pending)"
    one_failed = Progress(total=4, running=3, failed=1, array=True)
    assert outcome(OK, one_failed).verdict is Verdict.NEVER, "ok can never be met once one task failed"
    assert outcome(FAIL, one_failed).verdict is Verdict.WAITING, "fail waits for every task to end"
    assert outcome(FAIL, Progress(total=4, succeeded=3, failed=1, array=True)).verdict is Verdict.MET
    assert outcome(FAIL, Progress(total=4, succeeded=4, array=True)).detail == "every task SUCCEEDED"


def test_a_job_is_released_when_all_are_met_and_cancelled_when_one_never_is():
    after = [job_pb2.JobDependency(job_id="a", condition=OK), job_pb2.JobDependency(job_id="b", condition=ANY)]
    states = {"a": SUCCEEDED, "b": RUNNING}
    waiting = decide(after, [], states.get)
    assert (waiting.verdict, waiting.reason, waiting.met) == (Verdict.WAITING, "waiting for b: running", ("a",))
    states["b"] = FAILED
    assert decide(after, ["a"], states.get).verdict is Verdict.MET
    states["a"] = FAILED  # met once is met for good: kept with the job
    assert decide(after, ["a"], states.get).verdict is Verdict.MET
    never = decide(after, [], {"a": FAILED, "b": RUNNING}.get)
    assert (never.verdict, never.reason) == (Verdict.NEVER, "dependency a:ok can never be met: it FAILED")
    gone = decide(after, [], {"b": RUNNING}.get)
    assert gone.reason == "dependency a:ok can never be met: a is not known"


def test_a_cycle_is_found_and_a_chain_is_not():
    chain = {"b": ["a"], "c": ["b"]}
    assert dependency_cycle("d", ["c"], chain) is None
    # Were "a" to be submitted again after "c" (an id reused, or a dependency changed), it would close a cycle.
    assert dependency_cycle("a", ["c"], chain) == ["a", "c", "b", "a"]
    assert dependency_cycle("x", ["x"], {}) == ["x", "x"]


# -- shards ----------------------------------------------------------------------------------------------


def test_uniform_split_differs_by_at_most_one_and_covers_every_item():
    counts = split_counts(10, [1.0] * 4)
    assert counts == [3, 3, 2, 2]
    bounds = [shard_bounds(10, rank, [1.0] * 4) for rank in range(4)]
    assert bounds == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_capacity_split_follows_the_weights():
    assert split_counts(30, [1.0, 1.0, 0.5, 0.5]) == [10, 10, 5, 5]
    assert split_counts(7, [1.0, 0.5]) == [5, 2]  # 4.67 and 2.33: the larger remainder gets the item
    assert sum(split_counts(1001, [1.0, 0.5, 0.25, 2.0])) == 1001


def test_max_per_rank_caps_shares_and_gives_the_rest_to_the_others():
    assert split_counts(30, [4.0, 1.0, 1.0], max_per_rank=12) == [12, 9, 9]
    assert split_counts(6, [1.0, 1.0, 1.0], max_per_rank=2) == [2, 2, 2]
    with pytest.raises(ValueError, match="hold 6 items, fewer than the 7"):
        split_counts(7, [1.0, 1.0, 1.0], max_per_rank=2)


def test_the_split_is_the_same_on_every_rank(monkeypatch):
    items = [f"checkpoint-{n}" for n in range(23)]
    shares = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("GPUORCH_DEVICE_CAPACITIES", "1,1,0.5,0.5")
        shares.append(worker.shard(items, by="capacity"))
    assert [len(share) for share in shares] == [8, 7, 4, 4]
    assert [item for share in shares for item in share] == items, "every item once, in order"
    monkeypatch.setenv("RANK", "2")
    assert len(worker.shard(items)) == 6, "uniform ignores the capacities"
    with pytest.raises(ValueError, match="use 'uniform' or 'capacity'"):
        worker.shard(items, by="speed")


def test_capacity_table_prefers_the_longest_match():
    assert capacity_of("NVIDIA A100-SXM4-80GB") == 0.5
    assert capacity_of("NVIDIA A10") == 0.2
    assert capacity_of("NVIDIA H100 80GB HBM3") == 1.0
    assert capacity_of("Some Future GPU") == 1.0
    assert capacity_of("NVIDIA A100", {"A100": 0.7}) == 0.7


def test_report_result_writes_json_and_refuses_what_is_too_big(tmp_path, monkeypatch):
    path = tmp_path / "rank-0.result"
    monkeypatch.setenv("GPUORCH_RESULT_FILE", str(path))
    worker.report_result({"loss": 0.25, "lr": 3e-4})
    assert json.loads(path.read_text()) == {"loss": 0.25, "lr": 3e-4}
    with pytest.raises(ValueError, match=r"is 70\d\d\d bytes as JSON; the limit is 65536"):
        worker.report_result({"blob": "x" * 70_000})
    with pytest.raises(TypeError, match="wants a mapping"):
        worker.report_result([1, 2])  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"loss": 0.25, "lr": 3e-4}, "a refused result leaves the last one"
