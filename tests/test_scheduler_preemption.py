"""Preemption by priority class: who may preempt whom, and the victims that lose the fewest GPU-seconds."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.scheduler import PreemptionRule, SchedulerConfig, place, schedule
from tests.scheduler_cases import cluster, holding, job

NOW = 10_000.0
HIGH_PREEMPTS_LOW = SchedulerConfig(policy="priority", preemption=(PreemptionRule(min_priority=100, preempts_below_priority=50),))


def busy_cluster():
    running = [
        holding("big-old", {"n1": [0, 1, 2, 3]}, start=NOW - 1000),  # 4000 GPU-seconds of work
        holding("mid", {"n2": [0, 1]}, start=NOW - 100),  # 200
        holding("young", {"n2": [2, 3]}, start=NOW - 10),  # 20
    ]
    return cluster({"n1": 4, "n2": 4}, running), running


def victims(result):
    return sorted(p.victim_job_id for p in result.preemptions)


def test_a_high_priority_job_preempts_the_victims_that_lose_the_least_work():
    nodes, running = busy_cluster()
    two = schedule(nodes, [job("urgent", 2, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert victims(two) == ["young"]
    assert two.placed == ()  # it starts in a later pass, once the victim has stopped
    assert two.preemptions[0].for_job_id == "urgent"
    assert two.preemptions[0].reason == "preempted for urgent (priority 100 preempts priority 0)"
    assert two.pending_reasons["urgent"] == "preempting young (priority 100 preempts priority 0); starts once they stop"
    four = schedule(nodes, [job("urgent", 4, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert victims(four) == ["mid", "young"]  # 220 GPU-seconds rather than big-old's 4000
    shaped = schedule(nodes, [job("urgent", 4, gpus_per_node=4, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert victims(shaped) == ["mid", "young"]


def test_the_shape_decides_which_victims_help():
    running = [
        holding("a", {"n1": [0, 1]}, start=NOW - 10),
        holding("b", {"n2": [0, 1]}, start=NOW - 10),
        holding("c", {"n2": [2, 3]}, start=NOW - 500),
    ]
    nodes = cluster({"n1": 2, "n2": 4}, running)
    # Four GPUs on one node: only n2 has four, so b and c go although a is cheaper.
    result = schedule(nodes, [job("u", 4, gpus_per_node=4, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert victims(result) == ["b", "c"]


def test_who_may_not_be_preempted():
    nodes, running = busy_cluster()
    guarded = [
        running[0],
        holding("mid", {"n2": [0, 1]}, start=NOW - 100, preemptible=False),
        holding("young", {"n2": [2, 3]}, start=NOW - 10, priority=60),
    ]
    result = schedule(nodes, [job("urgent", 2, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=guarded)
    assert victims(result) == ["big-old"]  # mid is not preemptible, young's priority 60 is not below 50
    normal = schedule(nodes, [job("normal", 2, priority=99)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert normal.preemptions == ()  # no rule lets priority 99 preempt
    no_rules = schedule(nodes, [job("urgent", 2, priority=100)], SchedulerConfig(), now=NOW, running=running)
    assert no_rules.preemptions == ()


def test_victims_already_stopping_are_not_preempted_again_and_count_as_coming_free():
    nodes, running = busy_cluster()
    stopping = [running[0], running[1], holding("young", {"n2": [2, 3]}, start=NOW - 10, stopping=True)]
    again = schedule(nodes, [job("urgent", 2, priority=100)], HIGH_PREEMPTS_LOW, now=NOW + 1, running=stopping)
    assert again.preemptions == ()
    assert again.pending_reasons["urgent"] == "waiting for preempted jobs to stop"
    more = schedule(nodes, [job("urgent", 4, priority=100)], HIGH_PREEMPTS_LOW, now=NOW + 1, running=stopping)
    assert victims(more) == ["mid"]  # young's two are coming; two more are needed


def test_no_preemption_for_a_job_that_would_start_by_waiting_less_than_a_preemption_costs():
    running = [holding("ending", {"n1": [0, 1]}, start=NOW - 100, end=NOW + 30)]
    nodes = cluster({"n1": 2}, running)
    soon = schedule(nodes, [job("urgent", 2, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert soon.preemptions == () and soon.reserved_start_time == NOW + 30
    later = [holding("ending", {"n1": [0, 1]}, start=NOW - 100, end=NOW + 600)]
    result = schedule(nodes, [job("urgent", 2, priority=100)], HIGH_PREEMPTS_LOW, now=NOW, running=later)
    assert victims(result) == ["ending"]


def test_victims_are_not_reused_in_the_same_pass_and_one_victim_is_preempted_once():
    nodes, running = busy_cluster()
    jobs = [job("u1", 2, priority=100, submit_time=0), job("u2", 2, priority=100, submit_time=1)]
    result = schedule(nodes, jobs, HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert len(result.preemptions) == 2
    assert {p.for_job_id for p in result.preemptions} == {"u1", "u2"}
    assert len({p.victim_job_id for p in result.preemptions}) == 2
    assert result.placed == ()


def test_a_rule_may_not_let_a_priority_preempt_its_own_or_higher():
    with pytest.raises(ValueError, match="only lower priorities"):
        PreemptionRule(min_priority=10, preempts_below_priority=11)


# --- properties ------------------------------------------------------------------------------------------------


@st.composite
def busy(draw):
    sizes = {f"n{i}": n for i, n in enumerate(draw(st.lists(st.sampled_from([2, 4, 8]), min_size=1, max_size=4)))}
    running = []
    for node_id, n in sizes.items():
        taken = 0
        while taken < n:
            width = draw(st.integers(1, n - taken))
            running.append(
                holding(
                    f"r{len(running)}",
                    {node_id: list(range(taken, taken + width))},
                    start=NOW - draw(st.integers(0, 5000)),
                    priority=draw(st.sampled_from([0, 0, 60])),
                    preemptible=draw(st.sampled_from([True, True, False])),
                )
            )
            taken += width
    k = draw(st.sampled_from([0, 1, 2, 4]))
    gpus = draw(st.integers(1, sum(sizes.values())))
    if k:
        gpus = max(k, gpus - gpus % k)
    return sizes, running, job("urgent", gpus, gpus_per_node=k, priority=100)


def fits_without(sizes, running, urgent, gone):
    left = [r for r in running if r.job_id not in gone]
    return place(urgent, cluster(sizes, left), SchedulerConfig()) is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(busy())
def test_victims_suffice_are_all_needed_and_cost_no_more_than_twice_the_cheapest_set(case):
    sizes, running, urgent = case
    result = schedule(cluster(sizes, running), [urgent], HIGH_PREEMPTS_LOW, now=NOW, running=running)
    allowed = [r for r in running if r.priority < 50 and r.preemptible]
    if not result.preemptions:
        if urgent.gpus_per_node == 0 or len(allowed) <= 10:
            assert not fits_without(sizes, running, urgent, {r.job_id for r in allowed})
        return
    chosen = {p.victim_job_id for p in result.preemptions}
    assert chosen <= {r.job_id for r in allowed}
    assert fits_without(sizes, running, urgent, chosen)
    for one in chosen:
        assert not fits_without(sizes, running, urgent, chosen - {one}), f"{one} is not needed"
    cost = {r.job_id: r.gpus * (NOW - r.start_time) for r in running}
    if len(allowed) <= 10:
        best = min(
            sum(cost[v.job_id] for v in subset)
            for n in range(1, len(allowed) + 1)
            for subset in combinations(allowed, n)
            if fits_without(sizes, running, urgent, {v.job_id for v in subset})
        )
        assert sum(cost[v] for v in chosen) <= 2 * best + 1e-9


# --- priority classes in the coordinator's settings ---------------------------------------------------------------


def test_priority_classes_from_toml_become_preemption_rules(tmp_path):
    from coordinator.settings import CoordinatorSettings
    from gpuorch.settings import load_settings

    config = tmp_path / "coordinator.toml"
    config.write_text(
        "[priority_classes.low]\npriority = 0\n[priority_classes.normal]\npriority = 10\n"
        '[priority_classes.high]\npriority = 100\npreempts = ["low", "normal"]\n'
    )
    settings = load_settings(CoordinatorSettings, config_file=config, env={})
    settings.validate()
    assert settings.preemption_rules() == (PreemptionRule(min_priority=100, preempts_below_priority=100),)
    # A job of priority 100+ preempts everything of class normal (10..99) and low, nothing of its own class.
    rules = SchedulerConfig(preemption=settings.preemption_rules())
    for victim_priority, preempted in ((99, ["v"]), (10, ["v"]), (100, [])):
        running = [holding("v", {"n1": [0, 1, 2, 3]}, start=0.0, priority=victim_priority)]
        result = schedule(cluster({"n1": 4}, running), [job("h", 4, priority=100)], rules, now=NOW, running=running)
        assert victims(result) == preempted
    bad = CoordinatorSettings(priority_classes={"high": {"priority": 100, "preempts": ["normal"]}, "low": {"priority": 0}})
    with pytest.raises(ValueError, match="preempts 'normal', which is not a priority class"):
        bad.validate()
    with pytest.raises(ValueError, match="must be TOML tables"):
        load_settings(CoordinatorSettings, env={"GPUORCH_PRIORITY_CLASSES": "high"}).validate()


def test_a_preempting_job_holds_the_free_gpus_it_counts_on_until_it_starts():
    # Without the hold, B takes the free GPU, J preempts B next, A takes it back: the two would preempt in turn.
    running = [holding("a", {"n1": [0]}, start=NOW - 500)]
    nodes = cluster({"n1": 2}, running)
    jobs = [job("j", 2, priority=100, submit_time=1), job("b", 1, submit_time=2)]
    first = schedule(nodes, jobs, HIGH_PREEMPTS_LOW, now=NOW, running=running)
    assert victims(first) == ["a"] and first.placed == ()
    assert first.pending_reasons["b"] == "waiting behind j, which holds a reservation on n1"
    stopping = [holding("a", {"n1": [0]}, start=NOW - 500, stopping=True)]
    second = schedule(nodes, jobs, HIGH_PREEMPTS_LOW, now=NOW + 5, running=stopping, previous_reservations=first.reservations)
    assert second.placed == () and second.preemptions == ()
    assert second.pending_reasons["j"] == "waiting for preempted jobs to stop"
    stopped = schedule(cluster({"n1": 2}), jobs, HIGH_PREEMPTS_LOW, now=NOW + 10, running=[])
    assert [d.job_id for d in stopped.placed] == ["j"]
