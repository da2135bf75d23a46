"""The scheduler as a pure function: orders, scores, packing, shapes, reasons, reservations."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import (
    POLICIES,
    GpuView,
    JobRequest,
    NodeView,
    SchedulerConfig,
    SchedulingResult,
    order_jobs,
    place,
    schedule,
    score_gpu,
    too_big_for_cluster,
)

GIB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
CONFIG = SchedulerConfig()


def gpu(node_id, index, *, free=True, healthy=True, model=H100, memory_gib=80, used_gib=0.0, util=0.0, temp=40.0):
    return GpuView(f"{node_id}-g{index}", index, model, memory_gib * GIB, int(used_gib * GIB), util, temp, healthy, free)


def node(node_id, total=8, *, free=None, schedulable=True, **kw):
    """A node of `total` GPUs of which the first `free` (default all) are free."""
    free = total if free is None else free
    return NodeView(node_id, schedulable, tuple(gpu(node_id, i, free=i < free, **kw) for i in range(total)))


def job(job_id, gpus, **kw):
    return JobRequest(job_id, gpus, **kw)


def run(nodes, jobs, config=CONFIG, *, now=0.0, **kw) -> SchedulingResult:
    return schedule(nodes, jobs, config, now=now, **kw)


def shape(result_or_decision, job_id=None):
    """[(node_id, number of GPUs)] in node-rank order for one placed job; None if not placed."""
    decision = result_or_decision
    if isinstance(result_or_decision, SchedulingResult):
        decision = next((d for d in result_or_decision.placed if d.job_id == job_id), None)
    if decision is None:
        return None
    return [(share.node_id, len(share.gpu_uuids)) for share in decision.nodes]


def ids(jobs):
    return [j.job_id for j in jobs]


# --- policies -----------------------------------------------------------------------------------------------


def test_priority_orders_by_priority_then_submit_time_then_job_id():
    jobs = [
        job("c", 1, priority=0, submit_time=1.0),
        job("b", 1, priority=5, submit_time=9.0),
        job("a", 1, priority=0, submit_time=1.0),
        job("d", 1, priority=0, submit_time=0.5),
        job("e", 1, priority=-1, submit_time=0.0),
    ]
    assert ids(order_jobs(jobs, SchedulerConfig(policy="priority"), {})) == ["b", "d", "a", "c", "e"]


def test_fcfs_orders_by_submit_time_alone():
    jobs = [job("late", 1, priority=9, submit_time=3.0), job("early", 1, submit_time=1.0), job("mid", 1, submit_time=2.0)]
    assert ids(order_jobs(jobs, SchedulerConfig(policy="fcfs"), {})) == ["early", "mid", "late"]


def test_sjf_puts_short_jobs_first_counts_an_unknown_runtime_as_the_default_and_ages_waiting_jobs():
    jobs = [
        job("unknown-early", 1, submit_time=0.0),
        job("long", 1, submit_time=1.0, estimated_runtime_seconds=3600),
        job("short-late", 1, submit_time=5.0, estimated_runtime_seconds=60),
        job("short-early", 1, submit_time=2.0, estimated_runtime_seconds=60),
        job("unknown-late", 1, submit_time=3.0),
    ]
    assert ids(order_jobs(jobs, SchedulerConfig(policy="sjf", default_runtime_seconds=7200), {})) == [
        "short-early",
        "short-late",
        "long",
        "unknown-early",
        "unknown-late",
    ]
    # Aged: an unknown job that has waited longer than the default runtime goes before a new short one.
    old_unknown, new_short = job("old", 1, submit_time=0.0), job("new", 1, submit_time=7300.0, estimated_runtime_seconds=60)
    assert ids(order_jobs([new_short, old_unknown], SchedulerConfig(policy="sjf", default_runtime_seconds=7200), {})) == [
        "old",
        "new",
    ]


def test_fair_share_serves_the_lightest_owner_first_and_interleaves_owners_as_it_charges_them():
    jobs = [job(f"{owner}{n}", 1, owner=owner, submit_time=n, estimated_runtime_seconds=60) for owner in "ab" for n in range(3)]
    # a starts at 0 and pays 60 per job; b starts at 100: a0 (->60), a1 (->120), b0 (100->160), a2 (->180), b1, b2.
    order = order_jobs(jobs, SchedulerConfig(policy="fair_share"), {"a": 0.0, "b": 100.0})
    assert ids(order) == ["a0", "a1", "b0", "a2", "b1", "b2"]


def test_fair_share_within_an_owner_goes_by_priority_then_submit_time():
    jobs = [job("x-old", 1, owner="x", submit_time=0), job("x-urgent", 1, owner="x", priority=3, submit_time=5)]
    jobs.append(job("x-new", 1, owner="x", submit_time=1))
    assert ids(order_jobs(jobs, SchedulerConfig(policy="fair_share"), {})) == ["x-urgent", "x-old", "x-new"]


def test_fair_share_in_a_pass_charges_only_the_jobs_it_places():
    # a's huge job cannot be placed, so a is not charged for it and a's small job still beats b's.
    jobs = [
        job("a-huge", 100, owner="a", priority=1),
        job("a-small", 1, owner="a", submit_time=1),
        job("b-small", 1, owner="b", submit_time=0),
    ]
    result = run([node("n1", 1)], jobs, SchedulerConfig(policy="fair_share"), usage_by_owner={"a": 0.0, "b": 10.0})
    assert [d.job_id for d in result.placed] == ["a-small"]
    # The projected order charges every job, so there b comes before a-small.
    projected = order_jobs(jobs, SchedulerConfig(policy="fair_share"), {"a": 0.0, "b": 10.0})
    assert ids(projected) == ["a-huge", "b-small", "a-small"]


def test_fair_share_in_a_pass_charges_what_it_places_so_a_heavy_owner_still_gets_a_turn():
    jobs = [job(f"a{n}", 1, owner="a", submit_time=n, estimated_runtime_seconds=60) for n in range(3)]
    jobs.append(job("b0", 1, owner="b", submit_time=0, estimated_runtime_seconds=60))
    result = run([node("n1", 3)], jobs, SchedulerConfig(policy="fair_share"), usage_by_owner={"a": 0.0, "b": 100.0})
    # a0 (a: 60), a1 (a: 120 > b's 100), then b0; a2 finds the cluster full.
    assert [d.job_id for d in result.placed] == ["a0", "a1", "b0"]
    assert "a2" in result.pending_reasons


def test_unknown_policy_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        SchedulerConfig(policy="lottery")
    message = str(excinfo.value)
    assert "'lottery'" in message
    for known in POLICIES:
        assert known in message


# --- device scoring -----------------------------------------------------------------------------------------


def test_score_weighs_free_memory_and_idleness_and_penalises_heat_above_the_threshold():
    assert score_gpu(gpu("n", 0), CONFIG) == pytest.approx(1.0)
    assert score_gpu(gpu("n", 0, used_gib=40), CONFIG) == pytest.approx(0.6 * 0.5 + 0.4)
    assert score_gpu(gpu("n", 0, util=50), CONFIG) == pytest.approx(0.6 + 0.4 * 0.5)
    assert score_gpu(gpu("n", 0, temp=80), CONFIG) == pytest.approx(1.0)  # at the threshold: no penalty
    assert score_gpu(gpu("n", 0, temp=90), CONFIG) == pytest.approx(1.0 - 0.02 * 10)


def test_score_weights_decide_between_free_memory_and_utilisation():
    half_memory, half_busy = gpu("n", 0, used_gib=40), gpu("n", 1, util=50)
    assert score_gpu(half_memory, CONFIG) < score_gpu(half_busy, CONFIG)
    memory_light = SchedulerConfig(memory_weight=0.3, utilization_weight=0.7)
    assert score_gpu(half_memory, memory_light) > score_gpu(half_busy, memory_light)


def test_placement_takes_the_best_scored_gpus_and_orders_them_by_index():
    gpus = (
        gpu("n", 0, temp=95),  # hot
        gpu("n", 1, util=10),
        gpu("n", 2, used_gib=60),  # memory mostly taken
        gpu("n", 3),  # best
    )
    decision = place(job("j", 2), [NodeView("n", True, gpus)], CONFIG)
    assert decision is not None
    assert decision.nodes[0].gpu_uuids == ("n-g1", "n-g3")


def test_a_hot_gpu_is_chosen_last():
    gpus = (gpu("n", 0, temp=100), gpu("n", 1, used_gib=20, util=40), gpu("n", 2, used_gib=20, util=40))
    decision = place(job("j", 2), [NodeView("n", True, gpus)], CONFIG)
    assert decision.nodes[0].gpu_uuids == ("n-g1", "n-g2")


# --- packing ------------------------------------------------------------------------------------------------


def test_best_fit_puts_a_small_job_on_the_node_it_fills_rather_than_a_whole_node():
    nodes = [node("whole", 8), node("pair", 8, free=2)]
    assert shape(place(job("j", 2), nodes, CONFIG)) == [("pair", 2)]
    assert shape(place(job("j", 3), nodes, CONFIG)) == [("whole", 3)]
    assert shape(place(job("j", 2), list(reversed(nodes)), CONFIG)) == [("pair", 2)]


def test_a_job_too_big_for_any_node_uses_the_fewest_nodes_largest_first_then_best_fit():
    nodes = [node("b", 8, free=3), node("c", 8, free=3), node("a", 8), node("d", 8, free=5)]
    assert shape(place(job("j", 10), nodes, CONFIG)) == [("a", 8), ("b", 2)]
    assert shape(place(job("j", 13), nodes, CONFIG)) == [("a", 8), ("d", 5)]
    assert shape(place(job("j", 19), nodes, CONFIG)) == [("a", 8), ("d", 5), ("b", 3), ("c", 3)]
    assert place(job("j", 20), nodes, CONFIG) is None


def test_many_small_holes_do_not_beat_one_big_node():
    nodes = [node(f"s{i}", 8, free=2) for i in range(5)] + [node("big", 8)]
    assert shape(place(job("j", 10), nodes, CONFIG)) == [("big", 8), ("s0", 2)]


def test_gpus_per_node_gives_exactly_that_many_on_each_node_preferring_the_tightest_nodes():
    nodes = [node("a", 8), node("b", 8, free=4), node("c", 8, free=5), node("d", 8, free=2)]
    assert shape(place(job("j", 8, gpus_per_node=4), nodes, CONFIG)) == [("b", 4), ("c", 4)]
    # 4 GPUs as 2 x 2 even though one node could hold all four.
    assert shape(place(job("j", 4, gpus_per_node=2), nodes, CONFIG)) == [("d", 2), ("b", 2)]
    assert place(job("j", 12, gpus_per_node=6), nodes, CONFIG) is None  # only "a" has 6 free


def test_spread_uses_as_many_nodes_as_it_can_evenly():
    nodes = [node(f"n{i}", 8) for i in range(4)]
    assert shape(place(job("j", 4, spread=True), nodes, CONFIG)) == [("n0", 1), ("n1", 1), ("n2", 1), ("n3", 1)]
    assert sorted(n for _, n in shape(place(job("j", 6, spread=True), nodes, CONFIG))) == [1, 1, 2, 2]
    assert shape(place(job("j", 4, spread=True, gpus_per_node=2), nodes, CONFIG)) == [("n0", 2), ("n1", 2)]
    uneven = [node("a", 8, free=1), node("b", 8, free=1), node("c", 8)]
    assert dict(shape(place(job("j", 6, spread=True), uneven, CONFIG))) == {"a": 1, "b": 1, "c": 4}


# --- eligibility --------------------------------------------------------------------------------------------


def test_minimum_memory_filters_gpus():
    nodes = [node("small", 8, memory_gib=40), node("large", 8, memory_gib=80)]
    assert shape(place(job("j", 2, min_memory_per_gpu_bytes=41 * GIB), nodes, CONFIG)) == [("large", 2)]
    assert shape(place(job("j", 2, min_memory_per_gpu_bytes=40 * GIB), nodes, CONFIG)) == [("small", 2)]
    assert place(job("j", 9, min_memory_per_gpu_bytes=41 * GIB), nodes, CONFIG) is None


def test_model_is_a_case_insensitive_substring():
    nodes = [node("a", 4, model=A100), node("h", 4, model=H100)]
    assert shape(place(job("j", 1, gpu_model="h100"), nodes, CONFIG)) == [("h", 1)]
    assert shape(place(job("j", 1, gpu_model="A100-SXM4"), nodes, CONFIG)) == [("a", 1)]
    assert place(job("j", 1, gpu_model="V100"), nodes, CONFIG) is None
    result = run(nodes, [job("j", 1, gpu_model="V100")])
    assert result.pending_reasons == {"j": "needs 1 GPU matching 'V100'; 0 are free, 0 exist"}
    assert result.reserved_for is None


def test_requirements_pick_the_matching_gpus_within_a_mixed_node():
    mixed = NodeView("m", True, (gpu("m", 0, model=A100), gpu("m", 1, model=A100), gpu("m", 2), gpu("m", 3)))
    decision = place(job("j", 2, gpu_model="H100"), [mixed], CONFIG)
    assert decision.nodes[0].gpu_uuids == ("m-g2", "m-g3")


def test_unhealthy_busy_and_unschedulable_gpus_are_never_used():
    drained = node("drained", 8, schedulable=False)
    partly_sick = NodeView(
        "sick",
        True,
        (*(gpu("sick", i, healthy=i >= 5) for i in range(7)), gpu("sick", 7, free=False)),
    )
    result = run([drained, partly_sick], [job("two", 2, submit_time=0), job("three", 3, submit_time=1)])
    assert [(d.job_id, d.nodes[0].gpu_uuids) for d in result.placed] == [("two", ("sick-g5", "sick-g6"))]
    # Three healthy GPUs exist on schedulable nodes (g5, g6, busy g7): it could fit later, so it reserves.
    assert result.reserved_for == "three"
    assert result.pending_reasons["three"] == "reserving sick: 0 of 3 GPUs free so far"
    never = run([drained, partly_sick], [job("four", 4)])
    assert never.pending_reasons == {"four": "needs 4 GPUs; 2 are free, 3 exist"}
    assert never.reserved_for is None


def test_no_gpu_is_given_twice_in_a_pass_even_across_requirement_classes():
    nodes = [NodeView("n", True, (gpu("n", 0), gpu("n", 1), gpu("n", 2), gpu("n", 3, model=A100)))]
    jobs = [
        job("h100s", 2, gpu_model="H100", submit_time=0),
        job("any", 1, submit_time=1),
        job("more-h100s", 1, gpu_model="H100", submit_time=2),
        job("last", 1, submit_time=3),
    ]
    result = run(nodes, jobs, SchedulerConfig(reservations=False))
    given = {d.job_id: d.nodes[0].gpu_uuids for d in result.placed}
    assert given == {"h100s": ("n-g0", "n-g1"), "any": ("n-g2",), "last": ("n-g3",)}
    assert result.pending_reasons == {"more-h100s": "needs 1 GPU matching 'H100'; 0 are free, 3 exist"}


def test_many_jobs_in_one_pass_never_share_a_gpu():
    nodes = [node(f"n{i}", 8, free=i % 9) for i in range(20)]
    jobs = [job(f"j{i}", 1 + i % 7, submit_time=i, spread=i % 5 == 0) for i in range(60)]
    result = run(nodes, jobs)
    uuids = [u for d in result.placed for s in d.nodes for u in s.gpu_uuids]
    assert len(result.placed) > 5
    assert len(uuids) == len(set(uuids))
    assert len(uuids) == sum(j.gpus for j in jobs if j.job_id in {d.job_id for d in result.placed})


# --- reasons and reservations -------------------------------------------------------------------------------


def test_reason_for_a_job_bigger_than_the_cluster():
    result = run([node("n1", 4)], [job("j", 5)])
    assert result.placed == ()
    assert result.pending_reasons == {"j": "needs 5 GPUs; 4 are free, 4 exist"}
    assert result.reserved_for is None


def test_reason_names_the_memory_requirement_and_counts_only_eligible_gpus():
    busy_large = tuple(gpu("n2", i, free=False) for i in range(4))
    n2 = NodeView("n2", True, busy_large + tuple(gpu("n2", i, memory_gib=24) for i in range(4, 8)))
    result = run([node("n1", 8), n2], [job("j", 16, min_memory_per_gpu_bytes=40 * GIB)])
    assert result.pending_reasons == {"j": "needs 16 GPUs with >= 40 GiB; 8 are free, 12 exist"}
    assert result.reserved_for is None  # it can never fit: no reservation


def test_reasons_for_gpus_per_node():
    nodes = [node("n1", 4), node("n2", 4, free=2), node("n3", 2)]
    no_reservations = SchedulerConfig(reservations=False)
    result = run(nodes, [job("j", 8, gpus_per_node=4)], no_reservations)
    assert result.pending_reasons == {"j": "needs 4 GPUs per node on 2 nodes; only 1 node has 4 free"}
    never = run(nodes, [job("j", 12, gpus_per_node=4)])
    assert never.pending_reasons == {"j": "needs 4 GPUs per node on 3 nodes; only 2 nodes have 4 at all (1 with 4 free)"}
    assert never.reserved_for is None
    reserving = run(nodes, [job("j", 8, gpus_per_node=4)])
    assert reserving.reserved_for == "j" and reserving.reserved_nodes == ("n1", "n2")
    assert reserving.pending_reasons == {"j": "reserving n1, n2: 6 of 8 GPUs free so far"}


def test_reason_for_an_invalid_shape():
    result = run([node("n1", 8)], [job("j", 5, gpus_per_node=2), job("z", 0)])
    assert result.pending_reasons == {
        "j": "gpus (5) is not a multiple of gpus_per_node (2)",
        "z": "asks for 0 GPUs; needs at least 1",
    }


def test_the_first_blocked_job_that_could_fit_reserves_and_later_jobs_backfill_around_it():
    nodes = [node("n1", 8, free=3), node("n2", 8, free=3), node("n3", 8, free=2)]
    jobs = [
        job("j-1", 100, priority=9),  # can never fit: no reservation
        job("j-3", 16, priority=5),
        job("j-4", 2, priority=1, submit_time=1),
        job("j-5", 3, priority=1, submit_time=2),
        job("j-6", 30),
    ]
    result = run(nodes, jobs)
    assert result.reserved_for == "j-3"
    assert result.reserved_nodes == ("n1", "n2")
    assert [(d.job_id, shape(d)) for d in result.placed] == [("j-4", [("n3", 2)])]
    assert result.pending_reasons == {
        "j-1": "needs 100 GPUs; 8 are free, 24 exist",
        "j-3": "reserving n1, n2: 6 of 16 GPUs free so far",
        "j-5": "waiting behind j-3, which holds a reservation on n1, n2",
        "j-6": "needs 30 GPUs; 6 are free, 24 exist",
    }


def test_without_reservations_later_jobs_use_every_free_gpu():
    nodes = [node("n1", 8, free=3), node("n2", 8, free=3), node("n3", 8, free=2)]
    result = run(nodes, [job("big", 16), job("small", 3, submit_time=1)], SchedulerConfig(reservations=False))
    assert result.reserved_for is None
    assert [d.job_id for d in result.placed] == ["small"]


def test_a_job_takes_a_reservation_only_after_waiting_reserve_after_seconds():
    nodes = [node("n1", 8, free=4), node("n2", 8, free=2)]
    jobs = [job("big", 16, submit_time=100.0), job("small", 2, submit_time=101.0)]
    config = SchedulerConfig(reserve_after_seconds=60)
    young = run(nodes, jobs, config, now=130.0)
    assert young.reserved_for is None
    assert shape(young, "small") == [("n2", 2)]
    old = run(nodes, jobs, config, now=160.0)
    assert old.reserved_for == "big"
    assert old.placed == ()
    assert old.pending_reasons["small"] == "waiting behind big, which holds a reservation on n1, n2"


def _simulate_stream(config: SchedulerConfig, passes: int):
    """3 x 8 GPUs, all busy with 1-GPU jobs started round-robin over the nodes, and a 16-GPU job pending.

    Each pass the two oldest running jobs finish and three more 1-GPU jobs arrive. Returns the pass at
    which the big job was placed (None if never), and the small jobs' placements while it waited.
    """
    node_ids = ["n1", "n2", "n3"]
    holder: dict[str, str] = {}
    running: list[tuple[str, tuple[str, ...]]] = []
    for n in range(24):
        node_id, index = node_ids[n % 3], n // 3
        uuid = f"{node_id}-g{index}"
        holder[uuid] = f"s{n}"
        running.append((f"s{n}", (uuid,)))
    pending = {"big": job("big", 16, submit_time=0.0)}
    submitted = 0
    small_placements = []
    for p in range(passes):
        for _ in range(2):
            _, uuids = running.pop(0)
            for uuid in uuids:
                del holder[uuid]
        for _ in range(3):
            submitted += 1
            pending[f"t{submitted}"] = job(f"t{submitted}", 1, submit_time=float(submitted))
        nodes = [NodeView(nid, True, tuple(gpu(nid, i, free=f"{nid}-g{i}" not in holder) for i in range(8))) for nid in node_ids]
        result = run(nodes, list(pending.values()), config, now=float(p))
        for decision in result.placed:
            uuids = tuple(u for share in decision.nodes for u in share.gpu_uuids)
            for uuid in uuids:
                assert uuid not in holder
                holder[uuid] = decision.job_id
            del pending[decision.job_id]
            if decision.job_id == "big":
                return p, small_placements
            running.append((decision.job_id, uuids))
            small_placements.append((result.reserved_for, result.reserved_nodes, decision))
    return None, small_placements


def test_a_big_job_is_not_starved_by_a_stream_of_small_jobs():
    placed_at, small = _simulate_stream(SchedulerConfig(), passes=40)
    # 16 GPUs must finish on two nodes; two finish per pass: about 12 passes, whatever keeps arriving.
    assert placed_at is not None and placed_at <= 13
    assert small, "small jobs should backfill the node that is not reserved"
    for reserved_for, reserved_nodes, decision in small:
        assert reserved_for == "big"
        assert len(reserved_nodes) == 2
        assert not {share.node_id for share in decision.nodes} & set(reserved_nodes)


def test_the_same_stream_starves_the_big_job_without_reservations():
    placed_at, small = _simulate_stream(SchedulerConfig(reservations=False), passes=40)
    assert placed_at is None
    assert len(small) == 80  # every GPU freed went to a small job


# --- invariants ---------------------------------------------------------------------------------------------

_gpu_strategy = st.fixed_dictionaries(
    {
        "free": st.booleans(),
        "healthy": st.sampled_from([True, True, True, False]),
        "model": st.sampled_from([H100, A100]),
        "memory_gib": st.sampled_from([40, 80]),
        "util": st.floats(0, 100),
        "temp": st.floats(20, 100),
    }
)
_job_strategy = st.fixed_dictionaries(
    {
        "gpus": st.integers(1, 12),
        "gpus_per_node": st.sampled_from([0, 0, 0, 1, 2, 4]),
        "priority": st.integers(0, 3),
        "min_memory_per_gpu_bytes": st.sampled_from([0, 0, 64 * GIB]),
        "gpu_model": st.sampled_from(["", "", "a100", "H100"]),
        "spread": st.booleans(),
    }
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(_gpu_strategy, min_size=0, max_size=8), min_size=0, max_size=6),
    st.lists(_job_strategy, min_size=0, max_size=12),
    st.sampled_from(POLICIES),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_every_pass_respects_the_invariants(node_specs, job_specs, policy, unschedulable):
    nodes = []
    for n, specs in enumerate(node_specs):
        gpus = tuple(gpu(f"n{n}", i, **spec) for i, spec in enumerate(specs))
        nodes.append(NodeView(f"n{n}", not unschedulable[n], gpus))
    jobs = [job(f"j{n}", submit_time=float(n), owner=f"o{n % 2}", **spec) for n, spec in enumerate(job_specs)]
    result = run(nodes, jobs, SchedulerConfig(policy=policy))

    gpus_by_uuid = {g.uuid: (nd, g) for nd in nodes for g in nd.gpus}
    jobs_by_id = {j.job_id: j for j in jobs}
    placed_ids = {d.job_id for d in result.placed}
    assert placed_ids.isdisjoint(result.pending_reasons)
    assert placed_ids | set(result.pending_reasons) == set(jobs_by_id)
    assert all(result.pending_reasons.values())
    seen = set()
    for decision in result.placed:
        j = jobs_by_id[decision.job_id]
        counts = [len(s.gpu_uuids) for s in decision.nodes]
        assert sum(counts) == j.gpus
        assert len({s.node_id for s in decision.nodes}) == len(decision.nodes)
        if j.gpus_per_node:
            assert counts == [j.gpus_per_node] * (j.gpus // j.gpus_per_node)
        for share in decision.nodes:
            indices = []
            for uuid in share.gpu_uuids:
                assert uuid not in seen
                seen.add(uuid)
                owner_node, g = gpus_by_uuid[uuid]
                assert owner_node.node_id == share.node_id
                assert owner_node.schedulable and g.healthy and g.free
                assert g.memory_total_bytes >= j.min_memory_per_gpu_bytes
                assert j.gpu_model.lower() in g.model.lower()
                indices.append(g.index)
            assert indices == sorted(indices)
    if result.reserved_for is not None:
        assert result.reserved_for in result.pending_reasons
        assert result.pending_reasons[result.reserved_for].startswith("reserving ")
        assert result.reserved_nodes
        if policy != "fair_share":  # fair_share's order depends on what was placed
            order = ids(order_jobs(jobs, SchedulerConfig(policy=policy), {}))
            after = order.index(result.reserved_for)
            for decision in result.placed:
                if order.index(decision.job_id) > after:
                    assert not {s.node_id for s in decision.nodes} & set(result.reserved_nodes)


# --- speed --------------------------------------------------------------------------------------------------


def _big_cluster(busy: bool):
    rng = random.Random(7)
    return [
        NodeView(
            f"n{n}",
            True,
            tuple(gpu(f"n{n}", i, free=not busy, used_gib=rng.uniform(0, 4), util=rng.uniform(0, 30)) for i in range(8)),
        )
        for n in range(1000)
    ]


def test_a_pass_over_a_thousand_nodes_and_ten_thousand_jobs_is_fast():
    rng = random.Random(3)
    jobs = [job(f"j{n}", rng.randint(1, 16), submit_time=float(n), priority=rng.randint(0, 3)) for n in range(10_000)]
    for busy, expect_placed in ((False, 900), (True, 0)):
        nodes = _big_cluster(busy)
        started = time.perf_counter()
        result = run(nodes, jobs)
        elapsed = time.perf_counter() - started
        placed = sum(len(s.gpu_uuids) for d in result.placed for s in d.nodes)
        assert len(result.placed) >= expect_placed
        assert placed <= 8000
        assert len(result.placed) + len(result.pending_reasons) == len(jobs)
        # Typically ~10 ms full and ~40 ms empty on a laptop core; the bound only catches a blow-up.
        assert elapsed < 1.0, f"one pass took {elapsed * 1000:.0f} ms (busy={busy})"


def test_too_big_counts_every_known_gpu_whatever_its_state():
    nodes = [node("a", 8, free=0), node("b", 8, schedulable=False, healthy=False)]  # busy; drained or DOWN, unhealthy
    assert too_big_for_cluster(JobRequest("j", 16), nodes) is None, "every known GPU is capacity that may come back"
    reason = too_big_for_cluster(JobRequest("j", 17), nodes)
    assert reason == "needs 17 GPUs, but the 2 known nodes have 16 GPUs in all"
    assert too_big_for_cluster(JobRequest("j", 4096), []) is None, "no node registered yet: nothing is refused"


def test_too_big_counts_only_the_pool_the_job_may_use():
    nodes = [node("a", 8), node("b", 4, model=A100, memory_gib=40)]
    assert too_big_for_cluster(JobRequest("j", 8, gpu_model="h100"), nodes) is None
    assert too_big_for_cluster(JobRequest("j", 9, gpu_model="H100"), nodes) == (
        "needs 9 GPUs matching 'H100', but the 2 known nodes have 8 of 12 such GPUs in all"
    )
    assert "with >= 80 GiB" in too_big_for_cluster(JobRequest("j", 10, min_memory_per_gpu_bytes=80 * GIB), nodes)
    assert too_big_for_cluster(JobRequest("j", 12), nodes) is None
    assert too_big_for_cluster(JobRequest("j", 8, gpus_per_node=4), nodes) is None
    shaped = too_big_for_cluster(JobRequest("j", 12, gpus_per_node=4), nodes)
    assert shaped == "needs 4 GPUs per node on 3 nodes, but only 2 of the 2 known nodes have 4 (the most on one node is 8)"
    assert too_big_for_cluster(JobRequest("j", 6, gpus_per_node=6), [node("c", 4)]).endswith("the most on one node is 4)")
