"""gpuorch-sim: trace parsing and its errors, load scaling, the metrics of a hand-computed replay,
refusals, policies, determinism. The replays run the real JobManager on a fake clock (coordinator/sim/)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from coordinator.settings import CoordinatorSettings
from coordinator.sim import cli, traces
from coordinator.sim.policies import UnsupportedPolicy, resolve
from coordinator.sim.report import percentile

PHILLY_HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"
TIMING_FIELDS = ("scheduler_cpu_seconds",)
"""Measured on the machine, not simulated: the only fields two replays of one trace may differ in."""


def write_jsonl(tmp_path, jobs: list[dict], name: str = "trace.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def run(tmp_path, jobs: list[dict], pools: str, **options) -> dict:
    return cli.simulate(cli.Options(trace=str(write_jsonl(tmp_path, jobs)), pools=pools, **options))


# -- parsing -----------------------------------------------------------------------------------


def test_philly_rows_become_jobs_with_submit_times_from_the_first(tmp_path):
    path = tmp_path / "philly.csv"
    path.write_text(
        PHILLY_HEADER
        + "2017-09-01 00:00:10,100.0,8,800.0,vc1\n"
        + "2017-09-01 00:00:00,0.0,1,0.0,vc2\n"
        + "2017-09-01 01:00:00,3600.0,2,7200.0,vc1\n"
    )
    jobs = traces.read_trace(path, "philly")
    assert [(job.submit_time, job.duration, job.gpus, job.pool, job.line) for job in jobs] == [
        (0.0, 1.0, 1, "vc2", 3),  # sorted by submit time; a 0 s job counts as one second
        (10.0, 100.0, 8, "vc1", 2),
        (3600.0, 3600.0, 2, "vc1", 4),
    ]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("timestamp,duration,cluster\n", ":1: the header lacks column(s) num_gpus"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,10,1,10,vc\n2017-09-01,10,1,10,vc\n", ":3: field 'timestamp' must be"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,ten,1,10,vc\n", ":2: field 'duration' must be a number, got 'ten'"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,10,1.5,10,vc\n", ":2: field 'num_gpus' must be a whole number"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,10,0,10,vc\n", ":2: field 'num_gpus' must be >= 1"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,10,1,10\n", ":2: 4 fields, the header has 5"),
        (PHILLY_HEADER + "2017-09-01 00:00:00,10,1,10,\n", ":2: field 'cluster' is empty"),
        (PHILLY_HEADER, "has no jobs"),
    ],
)
def test_a_bad_philly_trace_is_refused_naming_the_line_and_field(tmp_path, body, expected):
    path = tmp_path / "philly.csv"
    path.write_text(body)
    with pytest.raises(traces.TraceError) as error:
        traces.read_trace(path, "philly")
    assert expected in str(error.value)


def test_jsonl_jobs_take_defaults_and_skip_comments(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '# a comment\n\n{"submit_time": 5, "duration": 2.5, "gpus": 4, "gpus_per_node": 2, "owner": "ann", "priority": 3}\n'
    )
    (job,) = traces.read_trace(path, "jsonl")
    assert (job.submit_time, job.duration, job.gpus, job.gpus_per_node, job.owner, job.pool, job.priority, job.line) == (
        5.0, 2.5, 4, 2, "ann", "default", 3, 3,
    )  # fmt: skip
    assert job.name == "job-3"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", ":1: not JSON"),
        ("[1, 2]", ":1: a job is a JSON object, got list"),
        ('{"duration": 1, "gpus": 1}', ":1: field 'submit_time' is missing"),
        ('{"submit_time": 0, "duration": 1, "gpus": 1, "gpu": 2}', ":1: unknown field(s) gpu"),
        ('{"submit_time": 0, "duration": 0, "gpus": 1}', ":1: field 'duration' must be >= 0.001"),
        ('{"submit_time": 0, "duration": 1, "gpus": "two"}', ":1: field 'gpus' must be a number, got 'two'"),
        ('{"submit_time": 0, "duration": 1, "gpus": true}', ":1: field 'gpus' must be a number, got True"),
        ('{"submit_time": 0, "duration": 1, "gpus": 3, "gpus_per_node": 2}', "'gpus_per_node' (2) does not divide 'gpus' (3)"),
        ('{"submit_time": 0, "duration": 1, "gpus": 1, "pool": 7}', ":1: field 'pool' must be a string, got 7"),
        ('{"submit_time": -1, "duration": 1, "gpus": 1}', ":1: field 'submit_time' must be >= 0"),
        ('{"submit_time": 0, "duration": 1, "gpus": 2, "rank_ends": [1]}', "'rank_ends' must be a list of one number per GPU (2"),
        ('{"submit_time": 0, "duration": 1, "gpus": 1, "rank_ends": 1}', "'rank_ends' must be a list of one number per GPU"),
        ('{"submit_time": 0, "duration": 1, "gpus": 1, "rank_ends": ["x"]}', ":1: field 'rank_ends' must be a number, got 'x'"),
    ],
)
def test_a_bad_jsonl_trace_is_refused_naming_the_line_and_field(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(traces.TraceError) as error:
        traces.read_trace(path, "jsonl")
    assert expected in str(error.value) and str(error.value).startswith(str(path))


def test_pools_parse_and_bad_ones_say_what_is_wrong():
    assert traces.parse_pools("a=2x8, b=1X4") == {"a": (2, 8), "b": (1, 4)}
    for bad, expected in (("a=2", "is not NAME=NODESxGPUS"), ("a=0x8", "at least one node"), ("a=1x1,a=2x2", "given twice")):
        with pytest.raises(traces.TraceError, match=expected):
            traces.parse_pools(bad)


def test_the_published_philly_pools_add_up_to_2816_gpus():
    assert sum(nodes * gpus for nodes, gpus in traces.PHILLY_POOLS.values()) == 2816


# -- gaps and load -----------------------------------------------------------------------------


def test_a_hole_in_the_submits_is_closed_to_one_mean_inter_arrival():
    jobs = [traces.TraceJob(t, 1.0, 1) for t in (0.0, 10.0, 30.0)] + [traces.TraceJob(t, 1.0, 1) for t in (1e7, 1e7 + 5)]
    closed, gaps = traces.close_gaps(jobs)
    mean = (10 + 20 + 5) / 3  # of the pauses kept
    assert [job.submit_time for job in closed] == pytest.approx([0.0, 10.0, 30.0, 30.0 + mean, 35.0 + mean])
    assert len(gaps) == 1 and gaps[0].after_submit == 30.0


def test_load_scaling_gives_each_pool_the_offered_load_asked_for():
    jobs = [
        traces.TraceJob(100.0, 100.0, 1, pool="a"),
        traces.TraceJob(200.0, 100.0, 1, pool="a"),
        traces.TraceJob(300.0, 300.0, 2, pool="a"),
        traces.TraceJob(0.0, 50.0, 4, pool="b"),
        traces.TraceJob(1000.0, 50.0, 4, pool="b"),
    ]
    sizes = {"a": 8, "b": 4}
    assert traces.offered_load(jobs[:3], 8) == pytest.approx(800 / (8 * 200))
    for load in (0.3, 0.9, 1.5):
        scaled = traces.scale_load(jobs, sizes, load)
        for pool, gpus in sizes.items():
            members = [job for job in scaled if job.pool == pool]
            assert traces.offered_load(members, gpus) == pytest.approx(load)
            assert min(job.submit_time for job in members) == min(job.submit_time for job in jobs if job.pool == pool)
    with pytest.raises(traces.TraceError, match="--load must be a number > 0"):
        traces.scale_load(jobs, sizes, 0)


# -- replays -----------------------------------------------------------------------------------

HAND_TRACE = [
    {"submit_time": 0, "duration": 10, "gpus": 2, "name": "a"},
    {"submit_time": 1, "duration": 5, "gpus": 1, "name": "b"},
    {"submit_time": 2, "duration": 3, "gpus": 1, "name": "c"},
]


def test_metrics_of_a_hand_computed_replay(tmp_path):
    """One node of 2 GPUs: a holds both for 0-10 s; b and c wait, then start together at 10."""
    result = run(tmp_path, HAND_TRACE, "default=1x2")
    # JCTs: a 10, b 15 - 1 = 14, c 13 - 2 = 11; waits: 0, 9, 8.
    assert result["jobs"] == 3 and result["completed"] == 3 and result["refused"] == 0
    assert result["avg_jct"] == pytest.approx(35 / 3)
    assert result["p50_jct"] == 11 and result["p99_jct"] == 14
    assert result["avg_queueing_delay"] == pytest.approx(17 / 3)
    assert result["p99_queueing_delay"] == 9
    assert result["makespan"] == 15
    # First to last submit (0-2 s): a holds both GPUs. Makespan: 2x10 + 5 + 3 GPU-seconds of 2x15.
    assert result["utilization_window"] == pytest.approx(1.0)
    assert result["utilization_makespan"] == pytest.approx(28 / 30)
    # Jobs wait from 1 s to 10 s, while a holds both GPUs.
    assert result["utilization_queued"] == pytest.approx(1.0)
    assert result["preemptions"] == 0
    assert result["per_pool"]["default"]["avg_jct"] == pytest.approx(35 / 3)


def test_recorded_rank_ends_free_each_gpu_when_its_rank_ended(tmp_path):
    """One node of 2 GPUs: a's ranks end at 2 s and 6 s; b (1 GPU) starts on the first GPU to come free."""
    jobs = [
        {"name": "a", "submit_time": 0, "duration": 6, "gpus": 2, "rank_ends": [2, 6]},
        {"name": "b", "submit_time": 0.5, "duration": 1, "gpus": 1},
    ]
    starts = {job["name"]: job["start"] for job in run(tmp_path, jobs, "default=1x2", per_job=True)["per_job"]}
    assert starts == {"a": 0, "b": 2}
    del jobs[0]["rank_ends"]  # both ranks end at its duration
    starts = {job["name"]: job["start"] for job in run(tmp_path, jobs, "default=1x2", per_job=True)["per_job"]}
    assert starts == {"a": 0, "b": 6}


def test_utilisation_while_jobs_wait_counts_the_gpus_left_idle_behind_a_blocked_job(tmp_path):
    """a holds one GPU of two for 0-10 s; b needs both and waits from 1 s to 10 s with one GPU idle."""
    trace = [{"submit_time": 0, "duration": 10, "gpus": 1}, {"submit_time": 1, "duration": 5, "gpus": 2}]
    result = run(tmp_path, trace, "default=1x2")
    assert result["utilization_queued"] == pytest.approx(0.5)
    assert result["utilization_window"] == pytest.approx(0.5)  # 0-1 s: one GPU of two
    assert result["utilization_makespan"] == pytest.approx((10 + 10) / (2 * 15))


def test_total_utilisation_adds_up_each_pools_own_window(tmp_path):
    trace = [
        {"submit_time": 0, "duration": 10, "gpus": 1, "pool": "x"},
        {"submit_time": 10, "duration": 10, "gpus": 1, "pool": "x"},
        {"submit_time": 0, "duration": 1, "gpus": 1, "pool": "y"},
        {"submit_time": 100, "duration": 1, "gpus": 1, "pool": "y"},
    ]
    result = run(tmp_path, trace, "x=1x1,y=1x1")
    assert result["per_pool"]["x"]["utilization_window"] == pytest.approx(1.0)
    assert result["per_pool"]["y"]["utilization_window"] == pytest.approx(0.01)
    assert result["utilization_window"] == pytest.approx((10 + 1) / (10 + 100))
    assert result["utilization_queued"] is None, "nothing ever waited"


def test_jobs_larger_than_their_pool_or_of_an_unknown_pool_are_refused_and_counted(tmp_path):
    trace = [
        *HAND_TRACE,
        {"submit_time": 3, "duration": 1, "gpus": 3, "name": "too-big"},
        {"submit_time": 4, "duration": 1, "gpus": 1, "pool": "elsewhere"},
    ]
    result = run(tmp_path, trace, "default=1x2")
    assert result["jobs"] == 3 and result["completed"] == 3
    assert result["refused"] == 2
    assert result["refused_by_reason"] == {"larger_than_pool": 1, "unknown_pool": 1}
    assert result["per_pool"]["default"]["refused"] == 1
    assert result["avg_jct"] == pytest.approx(35 / 3), "refused jobs change nothing for the others"


def test_pools_are_separate_clusters(tmp_path):
    """Two one-GPU pools: a job in each runs at once, although either pool alone could hold only one."""
    trace = [
        {"submit_time": 0, "duration": 10, "gpus": 1, "pool": "x"},
        {"submit_time": 0, "duration": 10, "gpus": 1, "pool": "y"},
        {"submit_time": 1, "duration": 10, "gpus": 1, "pool": "x"},
    ]
    result = run(tmp_path, trace, "x=1x1,y=1x1")
    assert result["per_pool"]["y"]["avg_jct"] == 10
    assert result["per_pool"]["x"]["avg_jct"] == pytest.approx((10 + 19) / 2)


def random_trace(seed: int, jobs: int = 150) -> list[dict]:
    rng = random.Random(seed)
    trace, now = [], 0.0
    for n in range(jobs):
        now += rng.expovariate(1 / 20)
        trace.append(
            {
                "submit_time": round(now, 3),
                "duration": round(rng.lognormvariate(4, 1.5), 3),
                "gpus": rng.choice((1, 1, 1, 2, 4, 8, 16)),
                "owner": rng.choice(("ann", "bob", "cy")),
                "priority": rng.choice((0, 0, 5)),
                "name": f"j{n}",
            }
        )
    return trace


def without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in TIMING_FIELDS}


@pytest.mark.parametrize("policy", [None, "fcfs", "sjf", "fair_share"])
def test_the_same_trace_and_seed_give_the_same_report(tmp_path, policy):
    trace = random_trace(7)
    first = run(tmp_path, trace, "default=4x8", policy=policy, load=0.9)
    second = run(tmp_path, trace, "default=4x8", policy=policy, load=0.9)
    assert without_timing(first) == without_timing(second)
    assert first["jobs"] == 150 and first["completed"] == 150
    assert first["utilization_window"] > 0.5, "at load 0.9 the GPUs are mostly busy"


def test_the_scheduler_sees_true_durations_only_with_oracle(tmp_path):
    """sjf without estimates is FIFO; with the true durations the short job goes before the long one."""
    trace = [
        {"submit_time": 0, "duration": 100, "gpus": 1, "name": "first"},
        {"submit_time": 1, "duration": 100, "gpus": 1, "name": "long"},
        {"submit_time": 2, "duration": 1, "gpus": 1, "name": "short"},
    ]
    blind = run(tmp_path, trace, "default=1x1", policy="sjf")
    oracle = run(tmp_path, trace, "default=1x1", policy="sjf", oracle=True)
    assert blind["avg_jct"] == pytest.approx((100 + 199 + 199) / 3)
    assert oracle["avg_jct"] == pytest.approx((100 + 200 + 99) / 3)
    assert oracle["oracle"] is True and blind["oracle"] is False


# -- policies ----------------------------------------------------------------------------------


def test_without_a_policy_the_simulator_runs_the_coordinators_default_settings():
    config, oracle = resolve(None)
    assert config == CoordinatorSettings().scheduler_config()
    assert config.policy == CoordinatorSettings.scheduler_policy and not oracle
    assert resolve("fcfs")[0] == dataclasses.replace(config, policy="fcfs")


def test_reference_policies_are_the_production_scheduler_with_fixed_settings():
    assert resolve("ref-fifo") == (dataclasses.replace(resolve(None)[0], policy="fcfs", backfill=False, preemption=()), False)
    sjf, oracle = resolve("ref-sjf")
    assert sjf.policy == "sjf" and sjf.preemption == () and oracle
    srtf, oracle = resolve("ref-srtf")
    assert srtf.policy == "srtf" and oracle
    with pytest.raises(UnsupportedPolicy, match="unknown policy 'lottery'"):
        resolve("lottery")


# -- the command -------------------------------------------------------------------------------


def test_the_command_prints_one_json_object(tmp_path, capsys):
    path = write_jsonl(tmp_path, HAND_TRACE)
    assert cli.main(["--trace", str(path), "--pools", "default=1x2", "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["jobs"] == 3 and result["policy"].startswith("default")


def test_the_command_refuses_bad_input_with_a_message_and_status_2(tmp_path, capsys):
    path = write_jsonl(tmp_path, HAND_TRACE)
    assert cli.main(["--trace", str(path)]) == 2
    assert "--pools is required for a jsonl trace" in capsys.readouterr().err
    assert cli.main(["--trace", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read trace" in capsys.readouterr().err


def test_percentiles_are_nearest_rank():
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(list(range(1, 101)), 0.99) == 99


async def test_a_stopped_attempt_keeps_its_progress_and_the_next_pays_the_preemption_cost():
    """The simulated agents end a stopped attempt's ranks by SIGTERM; the job keeps the 30 s it ran, and its next
    attempt (here a restart the job rules make of it) runs the 70 s left plus the 10 s preemption cost."""
    from coordinator.rules import job_machine
    from coordinator.sim.engine import Replay
    from coordinator.sim.records import SimSettings
    from coordinator.sim.report import report

    def stop(cell):
        (entry,) = cell.manager.jobs.values()
        entry.job.spec.max_restarts = 1
        cell.manager.apply(job_machine.stop_attempt(entry, entry.job.attempt, "preempted", cell.manager.machine))

    replay = Replay(
        [traces.TraceJob(0.0, 100.0, 2, name="long"), traces.TraceJob(50.0, 5.0, 1, name="later")],
        SimSettings(pools={"default": (1, 2)}, preemption_cost=10.0),
    )
    replay.at(30.0, "default", stop)
    result = report(await replay.run(), jobs=True)
    long, later = result["per_job"]
    assert (long["start"], long["end"], long["attempts"]) == (0.0, 110.0, 2)
    assert (later["start"], later["end"]) == (110.0, 115.0), "the GPUs were the long job's again until 110 s"
    assert result["preemptions"] == 1
    assert result["utilization_makespan"] == pytest.approx((2 * 110 + 5) / (2 * 115))
