"""las (discretised least attained service with starvation promotion), srtf (the simulator's oracle), and
starvation-freedom under every policy an operator may choose."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.scheduler import POLICIES, SIMULATOR_POLICIES, SchedulerConfig, order_jobs, schedule
from coordinator.scheduler.ordering import pending_las_queue
from tests.scheduler_cases import Loop, cluster, holding, job

LAS = SchedulerConfig(policy="las", las_thresholds_gpu_seconds=(100.0, 1000.0), las_starve_limit_seconds=500.0)


def ids(jobs):
    return [j.job_id for j in jobs]


def test_las_orders_by_attained_service_queue_then_fifo_and_priority_comes_first():
    jobs = [
        job("served", 1, submit_time=0, attained_service_seconds=5000),
        job("some", 2, submit_time=1, attained_service_seconds=150),
        job("fresh-late", 1, submit_time=3),
        job("fresh-early", 4, submit_time=2, attained_service_seconds=99),
        job("urgent", 1, submit_time=9, priority=5, attained_service_seconds=9999),
    ]
    assert ids(order_jobs(jobs, LAS, now=10.0)) == ["urgent", "fresh-early", "fresh-late", "some", "served"]


def test_las_promotes_a_job_that_waited_past_the_starve_limit_to_the_first_queue():
    served = job("served", 2, submit_time=0, attained_service_seconds=2000)  # ran 1000 s on 2 GPUs
    fresh = job("fresh", 1, submit_time=1400)
    absolute = replace(LAS, las_starve_factor=0.0)  # the limit alone: 500 s of waiting
    assert ids(order_jobs([served, fresh], absolute, now=1450.0)) == ["fresh", "served"]  # waited 450 s: not yet
    assert ids(order_jobs([served, fresh], absolute, now=1550.0)) == ["served", "fresh"]  # waited 550 s: promoted, and older


def test_las_promotes_a_long_served_job_only_after_waiting_its_starve_factor_times_its_run():
    """Relative, as in Tiresias: a job that ran 1000 s waits 8 x 1000 s (the default factor), not just the
    500 s limit, so a long job is not promoted only to be preempted again by the next arrival."""
    served = job("served", 2, submit_time=0, attained_service_seconds=2000)  # ran 1000 s on 2 GPUs
    assert LAS.las_starve_factor == 8.0
    fresh = job("fresh", 1, submit_time=8000)
    assert ids(order_jobs([served, fresh], LAS, now=1550.0)) == ["fresh", "served"]
    assert ids(order_jobs([served, fresh], LAS, now=8999.0)) == ["fresh", "served"]  # waited 7,999 s
    assert ids(order_jobs([served, fresh], LAS, now=9001.0)) == ["served", "fresh"]  # waited 8,001 s: promoted
    assert pending_las_queue(served, LAS, now=9001.0) == 0 and pending_las_queue(served, LAS, now=8999.0) == 2


def test_las_preempts_a_job_of_a_later_queue_that_has_run_longer_than_a_preemption_costs():
    running = [
        holding("long-runner", {"n1": [0, 1]}, start=0.0),  # 2 GPUs x 600 s = 1200 GPU-s: queue 2
        holding("newcomer", {"n2": [0, 1]}, start=590.0),  # 20 GPU-s: queue 0
    ]
    nodes = cluster({"n1": 2, "n2": 2}, running)
    result = schedule(nodes, [job("fresh", 2, submit_time=599)], LAS, now=600.0, running=running)
    assert [(p.victim_job_id, p.for_job_id) for p in result.preemptions] == [("long-runner", "fresh")]
    assert "las queue 0 before queue 2" in result.preemptions[0].reason
    # The same queue preempts nobody; nor does a victim that ran less than preemption_cost_seconds.
    same = schedule(nodes, [job("fresh", 2, attained_service_seconds=1500)], LAS, now=600.0, running=running)
    assert same.preemptions == ()
    young = [holding("young-but-served", {"n1": [0, 1]}, start=570.0, attained_service_seconds=5000), running[1]]
    assert schedule(nodes, [job("fresh", 2)], LAS, now=600.0, running=young).preemptions == ()


def test_srtf_is_for_the_simulator_only_and_preempts_for_a_shorter_remaining_time():
    assert "srtf" in SIMULATOR_POLICIES and "srtf" not in POLICIES and "las" in POLICIES
    srtf = SchedulerConfig(policy="srtf")
    jobs = [
        job("long", 1, estimated_runtime_seconds=1000),
        job("half-done", 2, estimated_runtime_seconds=1000, attained_service_seconds=1800),
    ]
    assert ids(order_jobs(jobs, srtf)) == ["half-done", "long"]  # 100 s left before 1000 s
    running = [holding("slow", {"n1": [0]}, start=0.0, estimated_runtime_seconds=5000)]
    result = schedule(
        cluster({"n1": 1}, running), [job("quick", 1, estimated_runtime_seconds=10)], srtf, now=100.0, running=running
    )
    assert [p.victim_job_id for p in result.preemptions] == ["slow"]


# --- starvation-freedom ------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    gpus=st.sampled_from([1, 3, 4, 8]),
    estimate=st.sampled_from([0.0, 300.0, 2000.0]),
    offset=st.integers(0, 60),
)
def test_no_job_starves_behind_a_steady_stream_of_short_jobs_under_any_policy(policy, gpus, estimate, offset):
    """8 GPUs kept busy by a 1-GPU job every 5 s, each 30-50 s long (offered load about 1); the job under test,
    submitted into that stream (its estimate unknown, or long), must start within a bound."""
    config = SchedulerConfig(policy=policy, default_runtime_seconds=600.0, las_starve_limit_seconds=600.0)
    loop = Loop({"n1": 4, "n2": 4}, config, {})
    arrivals = 0

    def stream():
        nonlocal arrivals
        duration = 30 + 10 * (arrivals % 3)
        loop.add(job(f"s{arrivals:04d}", 1, owner=f"u{arrivals % 3}", estimated_runtime_seconds=duration), duration)
        arrivals += 1

    for _ in range(offset):
        stream()
        loop.step(5)
    loop.add(job("target", gpus, owner="t", estimated_runtime_seconds=estimate), estimate or 500.0)
    bound = 600.0 + 2000.0 + 200.0  # its (default) estimate aged away under sjf, then the running jobs' ends
    submitted = loop.now
    while "target" not in loop.started and loop.now - submitted <= bound:
        stream()
        loop.step(5)
    assert "target" in loop.started, f"{policy}: not started {loop.now - submitted:.0f} s after submission"
