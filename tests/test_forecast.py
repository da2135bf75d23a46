"""Start-time estimates (coordinator/scheduler/forecast.py): the real scheduler run forward on estimated ends."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import JobRequest, NodeShare, RunningJob, SchedulerConfig
from coordinator.scheduler.forecast import forecast_starts, forecast_steps
from tests.test_scheduler import node

CONFIG = SchedulerConfig()
NOW = 1000.0


def running_on(job_id, node_id, indexes, *, end, start=NOW - 10):
    share = NodeShare(node_id, tuple(f"{node_id}-g{i}" for i in indexes))
    return RunningJob(job_id, (share,), start_time=start, estimated_end_time=end)


def test_a_job_behind_a_running_job_with_a_known_end_starts_at_that_end():
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=NOW + 300)]
    pending = [JobRequest("p1", 8, submit_time=1.0, estimated_runtime_seconds=100)]
    forecast = forecast_starts(nodes, pending, running, CONFIG, now=NOW)
    assert forecast.starts == {"p1": NOW + 300}


def test_a_queue_starts_one_after_another_on_the_estimates():
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=NOW + 300)]
    pending = [JobRequest(f"p{i}", 8, submit_time=float(i), estimated_runtime_seconds=100) for i in range(3)]
    forecast = forecast_starts(nodes, pending, running, CONFIG, now=NOW)
    assert forecast.starts == {"p0": NOW + 300, "p1": NOW + 400, "p2": NOW + 500}


def test_what_fits_now_starts_now():
    nodes = [node("n1", 8, free=4)]
    pending = [JobRequest("small", 4, estimated_runtime_seconds=10)]
    assert forecast_starts(nodes, pending, [], CONFIG, now=NOW).starts == {"small": NOW}


def test_a_job_needing_gpus_of_a_job_with_no_estimate_is_unknown():
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=0.0)]  # no estimate
    pending = [JobRequest("p1", 1, estimated_runtime_seconds=10)]
    assert forecast_starts(nodes, pending, running, CONFIG, now=NOW).starts == {}


def test_a_running_job_past_its_estimated_end_no_longer_has_a_known_end():
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=NOW - 1)]
    assert forecast_starts(nodes, [JobRequest("p1", 1)], running, CONFIG, now=NOW).starts == {}


def test_a_stopping_attempt_frees_its_gpus_at_the_first_step():
    nodes = [node("n1", 8, free=0)]
    running = [replace(running_on("victim", "n1", range(8), end=0.0), stopping=True)]
    pending = [JobRequest("p1", 8, estimated_runtime_seconds=10)]
    assert forecast_starts(nodes, pending, running, CONFIG, now=NOW).starts == {"p1": NOW}


def test_a_pending_job_with_no_estimate_holds_its_gpus_forever_in_the_forecast():
    nodes = [node("n1", 8, free=8)]
    pending = [JobRequest("unknown", 8, submit_time=1.0), JobRequest("behind", 8, submit_time=2.0, estimated_runtime_seconds=5)]
    assert forecast_starts(nodes, pending, [], CONFIG, now=NOW).starts == {"unknown": NOW}


def test_the_priority_order_decides_who_goes_first_when_gpus_free():
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=NOW + 60)]
    pending = [
        JobRequest("low", 8, submit_time=1.0, priority=0, estimated_runtime_seconds=100),
        JobRequest("high", 8, submit_time=2.0, priority=5, estimated_runtime_seconds=100),
    ]
    assert forecast_starts(nodes, pending, running, CONFIG, now=NOW).starts == {"high": NOW + 60, "low": NOW + 160}


def test_ends_within_the_resolution_are_taken_together_at_the_latest_of_them():
    nodes = [node("n1", 8, free=0), node("n2", 8, free=0)]
    running = [running_on("r1", "n1", range(8), end=NOW + 100), running_on("r2", "n2", range(8), end=NOW + 130)]
    pending = [JobRequest(f"p{i}", 8, submit_time=float(i), estimated_runtime_seconds=1000) for i in range(2)]
    together = forecast_starts(nodes, pending, running, CONFIG, now=NOW, resolution_seconds=60)
    assert together.starts == {"p0": NOW + 130, "p1": NOW + 130} and together.steps == 2
    apart = forecast_starts(nodes, pending, running, CONFIG, now=NOW, resolution_seconds=0)
    assert apart.starts == {"p0": NOW + 100, "p1": NOW + 130} and apart.steps == 3


def test_the_forecast_yields_between_passes():
    nodes = [node("n1", 1, free=0)]
    running = [running_on("r1", "n1", [0], end=NOW + 10)]
    pending = [JobRequest(f"p{i}", 1, submit_time=float(i), estimated_runtime_seconds=100) for i in range(3)]
    steps = forecast_steps(nodes, pending, running, CONFIG, now=NOW)
    assert [next(steps), next(steps), next(steps)] == [1, 2, 3]


def test_work_is_bounded_and_the_rest_is_left_unknown():
    nodes = [node("n1", 1, free=1)]
    pending = [JobRequest(f"p{i:03d}", 1, submit_time=float(i), estimated_runtime_seconds=10) for i in range(50)]
    by_steps = forecast_starts(nodes, pending, [], CONFIG, now=NOW, max_steps=5)
    assert by_steps.steps == 5 and len(by_steps.starts) == 5
    by_jobs = forecast_starts(nodes, pending, [], CONFIG, now=NOW, max_jobs=3)
    assert sorted(by_jobs.starts) == ["p000", "p001", "p002"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=3),
    st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(min_value=1, max_value=900)), min_size=1, max_size=12),
)
def test_no_estimate_is_before_now_and_gpus_are_never_overcommitted(running_ends, jobs):
    nodes = [node(f"n{i}", 8, free=0) for i in range(len(running_ends))]
    running = [running_on(f"r{i}", f"n{i}", range(8), end=NOW + end) for i, end in enumerate(running_ends)]
    pending = [JobRequest(f"p{i:02d}", g, submit_time=float(i), estimated_runtime_seconds=r) for i, (g, r) in enumerate(jobs)]
    starts = forecast_starts(nodes, pending, running, CONFIG, now=NOW).starts
    by_id = {job.job_id: job for job in pending}
    assert all(start >= NOW for start in starts.values())
    # At every start, the GPUs of the forecast's jobs then running fit in the cluster.
    for moment in starts.values():
        busy = sum(by_id[j].gpus for j, s in starts.items() if s <= moment < s + by_id[j].estimated_runtime_seconds)
        busy += sum(8 for r in running if r.estimated_end_time > moment)
        assert busy <= 8 * len(nodes)


def test_the_jobs_forecast_are_the_first_in_the_live_order_a_starved_las_job_included():
    """The forecast estimates the first max_jobs in the order a live pass uses at `now`: under las a job
    promoted for having starved is among them, ahead of a fresh one."""
    las = SchedulerConfig(policy="las", las_starve_limit_seconds=100.0, las_starve_factor=0.0)
    later = NOW + 36000.0 + 500  # the starved job ran 36,000 s and has waited 500 s since
    nodes = [node("n1", 8, free=0)]
    running = [running_on("r1", "n1", range(8), start=later - 10, end=later + 300)]
    starved = JobRequest("starved", 8, submit_time=NOW, attained_service_seconds=8 * 36000.0, estimated_runtime_seconds=100)
    fresh = JobRequest("fresh", 8, submit_time=later - 1, estimated_runtime_seconds=100)
    forecast = forecast_starts(nodes, [fresh, starved], running, las, now=later, max_jobs=1)
    assert set(forecast.starts) == {"starved"}
