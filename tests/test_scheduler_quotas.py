"""Running-GPU quotas in the pass: running jobs plus this pass's placements, per owner and per group."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import Quotas, SchedulerConfig, schedule
from tests.scheduler_cases import cluster, holding, job


def quota_config(**quotas) -> SchedulerConfig:
    return SchedulerConfig(policy="fcfs", quotas=Quotas(**quotas))


def test_an_owner_at_the_cap_waits_with_a_reason_naming_the_quota():
    running = [holding("a1", {"n1": [0, 1, 2, 3, 4, 5, 6, 7]}, owner="alice")]
    nodes = cluster({"n1": 8, "n2": 8}, running)
    config = quota_config(max_gpus_per_owner={"alice": 8})
    result = schedule(
        nodes, [job("a2", 1, owner="alice"), job("b1", 2, owner="bob", submit_time=1)], config, now=0.0, running=running
    )
    assert [d.job_id for d in result.placed] == ["b1"]
    assert result.pending_reasons == {
        "a2": "quota: alice runs 8 of the 8 GPUs quotas.users.alice.max_gpus allows and this job needs 1"
    }


def test_placements_of_the_same_pass_count_and_the_star_is_everyone_elses_cap():
    nodes = cluster({"n1": 8, "n2": 8})
    config = quota_config(max_gpus_per_owner={"*": 4, "carol": 0})
    jobs = [job(f"d{i}", 2, owner="dave", submit_time=i) for i in range(3)] + [job("c", 8, owner="carol", submit_time=9)]
    result = schedule(nodes, jobs, config, now=0.0)
    assert sorted(d.job_id for d in result.placed) == ["c", "d0", "d1"]  # carol's 0 = no cap
    assert (
        result.pending_reasons["d2"] == 'quota: dave runs 4 of the 4 GPUs quotas.users."*".max_gpus allows and this job needs 2'
    )


def test_a_group_cap_holds_every_member_and_a_capped_job_takes_no_reservation():
    running = [holding("x", {"n1": [0, 1, 2]}, owner="erin", group="ml")]
    nodes = cluster({"n1": 4, "n2": 4}, running)
    config = quota_config(max_gpus_per_group={"ml": 4})
    jobs = [job("big", 2, owner="frank", group="ml"), job("ok", 1, owner="frank", group="ml", submit_time=1)]
    result = schedule(nodes, jobs, config, now=0.0, running=running)
    assert [d.job_id for d in result.placed] == ["ok"]
    assert result.pending_reasons == {
        "big": "quota: group ml runs 3 of the 4 GPUs quotas.groups.ml.max_gpus allows and this job needs 2"
    }
    assert result.reserved_for is None


@settings(max_examples=150, deadline=None)
@given(
    owners=st.lists(st.sampled_from("abc"), min_size=1, max_size=20),
    sizes=st.lists(st.integers(1, 4), min_size=20, max_size=20),
    cap=st.integers(1, 8),
    held=st.integers(0, 4),
)
def test_no_owner_ever_runs_more_than_the_cap(owners, sizes, cap, held):
    running = [holding("r", {"n0": list(range(held))}, owner="a")] if held else []
    nodes = cluster({f"n{i}": 4 for i in range(6)}, running)
    jobs = [job(f"j{i}", sizes[i], owner=o, submit_time=i) for i, o in enumerate(owners)]
    result = schedule(nodes, jobs, quota_config(max_gpus_per_owner={"*": cap}), now=0.0, running=running)
    by_id = {j.job_id: j for j in jobs}
    totals = {"a": held}
    for d in result.placed:
        totals[by_id[d.job_id].owner] = totals.get(by_id[d.job_id].owner, 0) + by_id[d.job_id].gpus
    assert all(total <= max(cap, held) for total in totals.values())
    for j in jobs:  # a job that waits for its quota says so, and only when it is really over
        reason = result.pending_reasons.get(j.job_id, "")
        if reason.startswith("quota:"):
            assert (
                j.gpus
                + sum(by_id[d.job_id].gpus for d in result.placed if by_id[d.job_id].owner == j.owner)
                + (held if j.owner == "a" else 0)
                > cap
            )
