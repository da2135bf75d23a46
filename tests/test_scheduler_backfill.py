"""EASY backfill: the blocked head job's reservation in time and space, and what may start around it."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.scheduler import Reservation, SchedulerConfig, estimated_start, schedule
from tests.scheduler_cases import as_running, cluster, holding, job

CONFIG = SchedulerConfig(policy="fcfs")


def test_the_head_reserves_at_the_estimated_start_and_a_short_job_backfills_onto_reserved_gpus():
    running = [holding("r1", {"n1": [0, 1, 2, 3]}, end=100), holding("r2", {"n2": [0, 1]}, end=1000)]
    nodes = cluster({"n1": 4, "n2": 4}, running)
    jobs = [
        job("head", 6, submit_time=0),
        job("long", 2, submit_time=1, estimated_runtime_seconds=500),
        job("unknown", 2, submit_time=2),
        job("short", 2, submit_time=3, estimated_runtime_seconds=50),
    ]
    result = schedule(nodes, jobs, CONFIG, now=0.0, running=running)
    # Six GPUs are free at 100 (n1's four when r1 ends, n2's two free now).
    assert result.reserved_for == "head" and result.reserved_start_time == 100
    assert set(result.reserved_nodes) == {"n1", "n2"}
    assert [d.job_id for d in result.placed] == ["short"]  # ends at 50 < 100: cannot delay the head
    assert result.pending_reasons["long"] == "waiting behind head, which holds a reservation on n1, n2"
    assert result.pending_reasons["unknown"] == result.pending_reasons["long"]  # unknown estimate: not on reserved GPUs
    assert result.pending_reasons["head"] == "reserving n1, n2: 2 of 6 GPUs free so far; estimated to start in 100 s"
    assert result.reservations == (Reservation("head", result.reserved_nodes, 100.0, "default"),)


def test_a_long_job_starts_at_once_on_gpus_the_reservation_does_not_hold():
    running = [holding("r1", {"n1": [0, 1, 2, 3]}, end=100)]
    nodes = cluster({"n1": 4, "n2": 4, "n3": 4}, running)
    jobs = [
        job("head", 4, gpus_per_node=4, submit_time=0, priority=1),
        job("long", 4, submit_time=1, estimated_runtime_seconds=9999),
    ]
    # n2 and n3 are free now: the head fits at once; then the long one takes what is left.
    result = schedule(nodes, jobs, CONFIG, now=0.0, running=running)
    assert [d.job_id for d in result.placed] == ["head", "long"]
    blocked = schedule(
        nodes,
        [job("head", 12, gpus_per_node=4), job("long", 4, submit_time=1, estimated_runtime_seconds=9999)],
        CONFIG,
        now=0.0,
        running=running,
    )
    assert blocked.reserved_for == "head" and blocked.reserved_start_time == 100
    assert blocked.placed == ()  # every node is reserved, and the long one would end after 100


def test_the_reservation_stays_on_its_nodes_unless_another_choice_is_earlier():
    running = [
        holding("a", {"n1": [0, 1, 2, 3]}, end=200),
        holding("b", {"n2": [0, 1, 2, 3]}, end=200),
        holding("c", {"n3": [0, 1, 2, 3]}, end=500),
    ]
    nodes = cluster({"n1": 4, "n2": 4, "n3": 4}, running)
    head = job("head", 4, gpus_per_node=4)
    fresh = schedule(nodes, [head], CONFIG, now=0.0, running=running)
    assert fresh.reserved_nodes == ("n1",) and fresh.reserved_start_time == 200
    kept = schedule(
        nodes, [head], CONFIG, now=10.0, running=running, previous_reservations=(Reservation("head", ("n2",), 200.0),)
    )
    assert kept.reserved_nodes == ("n2",)  # as early as n1: it stays
    moved = schedule(
        nodes, [head], CONFIG, now=10.0, running=running, previous_reservations=(Reservation("head", ("n3",), 500.0),)
    )
    assert moved.reserved_nodes == ("n1",) and moved.reserved_start_time == 200  # n1 is earlier than n3
    gone = schedule(
        nodes[:2], [head], CONFIG, now=10.0, running=running[:2], previous_reservations=(Reservation("head", ("n3",), 1),)
    )
    assert gone.reserved_nodes == ("n1",)  # its node left the cluster


def test_a_node_that_frees_is_not_swept_into_the_reservation():
    # The old reservation re-picked the most free nodes every pass: n3, idle now, would have been taken from others.
    running = [holding("a", {"n1": [0, 1, 2, 3]}, end=100), holding("b", {"n2": [0, 1, 2]}, end=100)]
    nodes = cluster({"n1": 4, "n2": 4, "n3": 2}, running)
    head = job("head", 8, submit_time=0)
    first = schedule(nodes, [head], CONFIG, now=0.0, running=running)
    assert first.reserved_nodes == ("n1", "n2") and first.reserved_start_time == 100
    later = schedule(
        nodes,
        [head, job("small", 2, submit_time=1, estimated_runtime_seconds=500)],
        CONFIG,
        now=1.0,
        running=running,
        previous_reservations=first.reservations,
    )
    assert later.reserved_nodes == ("n1", "n2")
    assert [d.job_id for d in later.placed] == ["small"]  # n3 stays open to long jobs


def test_without_backfill_nothing_starts_behind_a_blocked_head():
    running = [holding("r1", {"n1": [0, 1, 2, 3]}, end=100)]
    nodes = cluster({"n1": 4, "n2": 4}, running)
    jobs = [job("head", 8), job("tiny", 1, submit_time=1, estimated_runtime_seconds=1)]
    strict = schedule(nodes, jobs, SchedulerConfig(policy="fcfs", backfill=False), now=0.0, running=running)
    assert strict.placed == ()
    assert strict.pending_reasons["tiny"] == "waiting behind head (strict order: no backfill)"
    easy = schedule(nodes, jobs, CONFIG, now=0.0, running=running)
    assert [d.job_id for d in easy.placed] == ["tiny"]


def test_an_unknown_running_end_counts_as_start_plus_the_default_runtime_and_an_overdue_one_as_now():
    running = [holding("r", {"n1": [0, 1]}, start=0.0)]
    nodes = cluster({"n1": 2}, running)
    config = SchedulerConfig(policy="fcfs", default_runtime_seconds=600)
    assert schedule(nodes, [job("h", 2)], config, now=100.0, running=running).reserved_start_time == 600
    assert schedule(nodes, [job("h", 2)], config, now=900.0, running=running).reserved_start_time == 900
    # GPUs busy with nothing the scheduler knows of: no estimate, and nothing may backfill onto them.
    unknown = schedule(nodes, [job("h", 2), job("s", 1, submit_time=1, estimated_runtime_seconds=1)], config, now=0.0)
    assert unknown.reserved_start_time == math.inf and unknown.placed == ()


# --- backfill never delays the reserved job ------------------------------------------------------------------

sizes_strategy = st.lists(st.integers(1, 8), min_size=1, max_size=5)


@st.composite
def scenarios(draw):
    sizes = {f"n{i}": n for i, n in enumerate(draw(sizes_strategy))}
    running = []
    for node_id, n in sizes.items():
        taken = 0
        while taken < n and draw(st.booleans()):
            width = draw(st.integers(1, n - taken))
            end = draw(st.sampled_from([0.0, 10.0, 50.0, 100.0, 300.0, 1000.0]))
            running.append(holding(f"r{len(running)}", {node_id: list(range(taken, taken + width))}, start=-5.0, end=end))
            taken += width
    pending = []
    total = sum(sizes.values())
    for i in range(draw(st.integers(1, 12))):
        k = draw(st.sampled_from([0, 0, 1, 2, 4]))
        gpus = draw(st.integers(1, total))
        if k:
            gpus = max(k, gpus - gpus % k)
        estimate = draw(st.sampled_from([0.0, 5.0, 40.0, 90.0, 200.0, 5000.0]))
        pending.append(job(f"j{i}", gpus, gpus_per_node=k, submit_time=i, estimated_runtime_seconds=estimate))
    policy = draw(st.sampled_from(["fcfs", "priority", "sjf", "las"]))
    return sizes, running, pending, policy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_backfill_never_delays_the_reserved_jobs_estimated_start(scenario):
    sizes, running, pending, policy = scenario
    config = SchedulerConfig(policy=policy)
    nodes = cluster(sizes, running)
    result = schedule(nodes, pending, config, now=0.0, running=running)
    if result.reserved_for is None:
        return
    head = next(j for j in pending if j.job_id == result.reserved_for)
    after = running + as_running(result, pending, 0.0, config)
    nodes_after = cluster(sizes, after)
    start = result.reserved_start_time
    assert estimated_start(head, nodes_after, after, config, now=0.0, on_nodes=result.reserved_nodes) <= start
    assert estimated_start(head, nodes_after, after, config, now=0.0) <= start
