"""Runtime prediction (coordinator/scheduler/prediction.py): tiers, sample floors, quantiles, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.scheduler.prediction import RuntimePredictor


def test_nothing_known_is_unknown_unless_a_default_is_configured():
    assert RuntimePredictor().predict(owner="alice", name="train", gpus=8).seconds == 0.0
    assert RuntimePredictor().predict(owner="alice", name="train", gpus=8).tier == "none"
    defaulted = RuntimePredictor(default_seconds=600).predict(owner="alice", gpus=8)
    assert (defaulted.seconds, defaulted.tier) == (600, "default")


def test_the_most_specific_tier_with_enough_samples_answers():
    predictor = RuntimePredictor(quantile=0.5, min_samples=3)
    for runtime in (100, 100, 100):
        predictor.observe(runtime, owner="alice", name="train", gpus=8, pool="a")
    for runtime in (5000, 5000, 5000):
        predictor.observe(runtime, owner="bob", name="train", gpus=8, pool="a")
    alice = predictor.predict(owner="alice", name="train", gpus=8, pool="a")
    assert (alice.seconds, alice.tier, alice.samples) == (100, "owner_name_gpus", 3)
    # alice's other job name: her (owner, gpus) history speaks for it.
    assert predictor.predict(owner="alice", name="eval", gpus=8, pool="a").tier == "owner_gpus"
    # carol has no history: the pool's 8-GPU jobs (both users) answer.
    carol = predictor.predict(owner="carol", name="train", gpus=8, pool="a")
    assert carol.tier == "pool_gpus" and carol.samples == 6
    assert predictor.predict(owner="carol", gpus=2, pool="a").tier == "pool"
    assert predictor.predict(owner="carol", gpus=2, pool="b").tier == "cluster"


def test_a_tier_below_its_sample_floor_falls_through_to_the_next():
    predictor = RuntimePredictor(quantile=0.5, min_samples=3)
    predictor.observe(10, owner="alice", name="train", gpus=1)
    predictor.observe(10, owner="alice", name="train", gpus=1)
    for runtime in (1000, 1000, 1000):
        predictor.observe(runtime, owner="bob", name="x", gpus=1)
    prediction = predictor.predict(owner="alice", name="train", gpus=1)
    assert prediction.tier == "pool_gpus"  # alice has 2 samples of each of her tiers: not enough
    predictor.observe(10, owner="alice", name="train", gpus=1)
    assert predictor.predict(owner="alice", name="train", gpus=1).seconds == 10


def test_anonymous_jobs_use_no_owner_tier():
    predictor = RuntimePredictor(min_samples=1)
    predictor.observe(50, gpus=4, pool="vc1")
    assert predictor.predict(gpus=4, pool="vc1").tier == "pool_gpus"
    assert predictor.predict(owner="", name="", gpus=4, pool="vc1").seconds == 50


def test_the_quantile_is_high_so_most_runtimes_are_at_or_below_it():
    predictor = RuntimePredictor(quantile=0.8, min_samples=1, window=10)
    for runtime in range(1, 11):  # 1..10
        predictor.observe(runtime * 100, owner="a", name="n", gpus=1)
    assert predictor.predict(owner="a", name="n", gpus=1).seconds == 800


def test_only_the_last_window_runtimes_count():
    predictor = RuntimePredictor(quantile=1.0, min_samples=1, window=3)
    for runtime in (9000, 10, 20, 30):
        predictor.observe(runtime, owner="a", name="n", gpus=1)
    assert predictor.predict(owner="a", name="n", gpus=1).seconds == 30


def test_keys_are_bounded_least_recently_observed_dropped_first():
    predictor = RuntimePredictor(min_samples=1, max_keys=8)
    for n in range(100):
        predictor.observe(60, owner=f"user{n}", name="job", gpus=1)
    assert len(predictor) <= 8
    assert predictor.predict(owner="user99", name="job", gpus=1).tier == "owner_name_gpus"
    assert predictor.predict(owner="user0", name="job", gpus=1).tier != "owner_name_gpus"


def test_the_touched_keys_are_those_an_observation_changed_and_a_prediction_depends_on_its_tier_and_narrower():
    predictor = RuntimePredictor(min_samples=1, max_keys=6)
    assert predictor.take_touched() == set()
    predictor.observe(10, owner="alice", name="train", gpus=2)
    assert predictor.take_touched() == set(RuntimePredictor.keys("alice", "train", 2, "default"))
    assert predictor.take_touched() == set()  # taken: forgotten
    # bob's first runtime: his owner keys and the shared pool and cluster keys; his owner_gpus key is the seventh,
    # over max_keys, so the oldest (alice's owner_name_gpus) is dropped, and touched: her jobs fall back a tier.
    predictor.observe(20, owner="bob", name="eval", gpus=2)
    touched = predictor.take_touched()
    assert ("owner_name_gpus", "alice", "train", 2) in touched and ("owner_gpus", "bob", 2) in touched
    prediction = predictor.predict(owner="alice", name="train", gpus=2)
    assert prediction.tier == "owner_gpus"
    assert predictor.depends_on(prediction, owner="alice", name="train", gpus=2) == (
        ("owner_name_gpus", "alice", "train", 2),
        ("owner_gpus", "alice", 2),
    )
    unknown = RuntimePredictor().predict(owner="zed", gpus=1)
    assert RuntimePredictor().depends_on(unknown, owner="zed", gpus=1) == tuple(RuntimePredictor.keys("zed", "", 1, "default"))


def test_too_many_touched_keys_to_list_read_as_any():
    predictor = RuntimePredictor(min_samples=1, max_keys=3)
    for n in range(3):
        predictor.observe(10, owner=f"u{n}", name="x", gpus=1)
    assert predictor.take_touched() is None
    assert predictor.take_touched() == set()


def test_nonsense_runtimes_are_ignored_and_counted_nowhere():
    predictor = RuntimePredictor(min_samples=1)
    for runtime in (0, -5, float("nan"), float("inf")):
        predictor.observe(runtime, owner="a", gpus=1)
    assert predictor.observed == 0
    assert predictor.predict(owner="a", gpus=1).tier == "none"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"quantile": 0}, "quantile"), ({"min_samples": 0}, "min_samples"), ({"window": 2}, "window"), ({"max_keys": 0}, "max_keys"),
     ({"default_seconds": -1}, "default_seconds")],
)  # fmt: skip
def test_bad_parameters_are_refused_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=named):
        RuntimePredictor(**kwargs)


@given(st.lists(st.floats(min_value=1, max_value=1e7), min_size=1, max_size=200), st.floats(min_value=0.05, max_value=1.0))
def test_a_prediction_is_one_of_the_recent_runtimes_and_at_least_the_quantile_of_them_are_at_or_below_it(runtimes, q):
    predictor = RuntimePredictor(quantile=q, min_samples=1, window=50)
    for runtime in runtimes:
        predictor.observe(runtime, owner="a", name="n", gpus=1)
    recent = runtimes[-50:]
    predicted = predictor.predict(owner="a", name="n", gpus=1).seconds
    assert predicted in recent
    assert sum(r <= predicted for r in recent) >= q * len(recent) - 1e-9
    assert sum(r < predicted for r in recent) < q * len(recent)
