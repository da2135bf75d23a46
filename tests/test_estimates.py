"""Runtime estimates in the coordinator (control/estimates.py): learned from jobs that end and from the store after a
restart, used for jobs without an estimate, refreshed; start-time estimates on pending jobs."""

from __future__ import annotations

import pytest

from coordinator.control.cluster_view import ClusterView
from coordinator.control.estimates import Estimates
from coordinator.control.job_manager import JobManager
from coordinator.rules.liveness import LivenessPolicy
from coordinator.scheduler import JobRequest
from coordinator.scheduler.prediction import RuntimePredictor
from coordinator.settings import CoordinatorSettings
from coordinator.store.memory import MemoryJobStore
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, job_pb2
from tests.test_job_manager import register


def manager_with(store, clock, gpus=1, min_samples=1):
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, clock=clock)
    register(cluster, "n1", gpus)
    estimates = Estimates(RuntimePredictor(min_samples=min_samples, quantile=1.0))
    return JobManager(cluster, store, clock=clock, estimates=estimates)


def spec(name="train", owner="alice", gpus=1, estimate=0):
    return job_pb2.JobSpec(argv=["x"], gpus=gpus, owner=owner, name=name, estimated_runtime_seconds=estimate)


async def run_to_success(manager, clock, job_id, seconds):
    assert job_id in await manager.schedule_pass()
    clock.advance(seconds)
    for rank in range(manager.get(job_id).job.placement.world_size):
        ended = agent_pb2.TaskStatus(job_id=job_id, attempt=1, rank=rank, state=agent_pb2.TASK_STATE_EXITED, exit_code=0)
        manager.on_task_status("n1", ended)
    assert manager.get(job_id).job.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_a_finished_job_s_runtime_becomes_the_estimate_of_the_next_like_it():
    clock = FakeClock()
    manager = manager_with(MemoryJobStore(), clock)
    await manager.start()
    await run_to_success(manager, clock, await manager.submit(spec()), 120)
    following = await manager.submit(spec())
    assert manager.scheduling.request(manager.get(following)).estimated_runtime_seconds == 120
    # The user's own estimate wins over the prediction.
    told = await manager.submit(spec(estimate=30))
    assert manager.scheduling.request(manager.get(told)).estimated_runtime_seconds == 30


async def test_a_restarted_coordinator_learns_from_the_store_s_finished_jobs():
    clock, store = FakeClock(), MemoryJobStore()
    first = manager_with(store, clock)
    await first.start()
    await run_to_success(first, clock, await first.submit(spec(name="nightly")), 300)
    second = manager_with(store, clock)
    await second.start()
    job_id = await second.submit(spec(name="nightly"))
    assert second.scheduling.request(second.get(job_id)).estimated_runtime_seconds == 300


async def test_a_cached_prediction_is_refreshed_by_the_first_pass_after_a_runtime_is_learned_whatever_the_clock():
    clock = FakeClock()
    manager = manager_with(MemoryJobStore(), clock, gpus=2)
    await manager.start()
    first = await manager.submit(spec(gpus=2))
    await run_to_success(manager, clock, first, 100)
    assert first not in manager.scheduling.estimates.predicted  # final: its prediction is not refreshed any more
    blocker = await manager.submit(spec(name="other", owner="bob", gpus=2, estimate=1000))
    assert await manager.schedule_pass() == [blocker]
    queued = await manager.submit(spec(gpus=2))
    await manager.schedule_pass()
    assert manager.scheduling.request(manager.get(queued)).estimated_runtime_seconds == 100
    manager.scheduling.estimates.predictor.observe(500, owner="alice", name="train", gpus=2)
    # No time passed: the pass sees what was learned before it, not what a timer allowed (a coordinator's
    # passes and a simulator's come at different times, and must still see the same estimates).
    await manager.schedule_pass()
    assert manager.scheduling.request(manager.get(queued)).estimated_runtime_seconds == 500


class CountingPredictor(RuntimePredictor):
    """Counts the predictions asked of it, by owner."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.asked: list[str] = []

    def predict(self, *, owner="", name="", gpus=1, pool="default"):
        self.asked.append(owner)
        return super().predict(owner=owner, name=name, gpus=gpus, pool=pool)


def test_a_refresh_re_predicts_only_the_jobs_whose_tiers_got_a_runtime():
    estimates = Estimates(CountingPredictor(min_samples=1, quantile=1.0))
    predictor = estimates.predictor
    predictor.observe(100, owner="alice", name="train", gpus=1)
    predictor.observe(200, owner="bob", name="eval", gpus=1)
    requests = {
        r.job_id: estimates.with_estimate(r, name)
        for r, name in ((JobRequest("a", 1, owner="alice"), "train"), (JobRequest("b", 1, owner="bob"), "eval"))
    }
    assert [requests[j].estimated_runtime_seconds for j in "ab"] == [100, 200]
    assert estimates.refresh(requests) == 0  # what was learned before they were predicted changes nothing
    predictor.asked.clear()
    predictor.observe(300, owner="alice", name="train", gpus=1)  # the pool and cluster tiers change too: bob's is
    assert estimates.refresh(requests) == 1  # answered by his own tier, which did not
    assert predictor.asked == ["alice"]
    assert [requests[j].estimated_runtime_seconds for j in "ab"] == [300, 200]
    assert estimates.refresh(requests) == 0 and predictor.asked == ["alice"]  # nothing new: nothing asked
    estimates.forget("a")  # final
    assert set(estimates.predicted) == {"b"} and all("a" not in jobs for jobs in estimates.dependents.values())
    del requests["b"]  # its request dropped (to be built again): forgotten once a refresh comes to it
    predictor.observe(400, owner="bob", name="eval", gpus=1)
    assert estimates.refresh(requests) == 0 and not estimates.predicted and not estimates.dependents


def test_a_job_predicted_from_a_broad_tier_is_refreshed_once_its_own_tier_has_enough_runtimes():
    estimates = Estimates(RuntimePredictor(min_samples=2, quantile=1.0))
    predictor = estimates.predictor
    for runtime in (1000, 1000):
        predictor.observe(runtime, owner="bob", name="big", gpus=8)
    requests = {"a": estimates.with_estimate(JobRequest("a", 1, owner="alice"), "train")}
    assert requests["a"].estimated_runtime_seconds == 1000  # the pool's runtimes speak for alice's first jobs
    predictor.observe(60, owner="alice", name="train", gpus=1)
    assert estimates.refresh(requests) == 0  # one runtime of hers: below the floor, the pool still answers
    predictor.observe(50, owner="alice", name="train", gpus=1)
    assert estimates.refresh(requests) == 1
    assert requests["a"].estimated_runtime_seconds == 60


async def test_a_job_queued_behind_a_running_one_is_estimated_to_start_at_its_end_and_loses_it_once_started():
    clock = FakeClock()
    manager = manager_with(MemoryJobStore(), clock)
    await manager.start()
    running = await manager.submit(spec(estimate=600))
    assert await manager.schedule_pass() == [running]
    queued = await manager.submit(spec(name="next", estimate=60))
    unknown_behind = await manager.submit(spec(name="after-unknown", owner="zed"))  # no estimate, nothing learned
    clock.advance(10)
    forecast = manager.scheduling.estimates.forecast(manager.scheduling, clock.monotonic())
    start_of_running = manager.get(running).job.start_time.ToNanoseconds() / 1e9
    estimated = manager.get(queued).job.estimated_start_time
    assert estimated.ToNanoseconds() / 1e9 == start_of_running + 600
    assert forecast.starts[queued] == start_of_running + 600
    assert forecast.starts[unknown_behind] == start_of_running + 660
    assert not manager.get(running).job.HasField("estimated_start_time")
    # The running job ends early: the queued one starts and carries no estimate any more.
    for_rank = agent_pb2.TaskStatus(job_id=running, attempt=1, rank=0, state=agent_pb2.TASK_STATE_EXITED, exit_code=0)
    manager.on_task_status("n1", for_rank)
    assert queued in await manager.schedule_pass()
    assert not manager.get(queued).job.HasField("estimated_start_time")


async def test_start_estimates_run_at_most_every_interval():
    clock = FakeClock()
    estimates = Estimates(interval_seconds=5)
    assert estimates.forecast_due(clock.monotonic())
    manager = manager_with(MemoryJobStore(), clock)
    manager.scheduling.estimates = estimates
    await manager.start()
    estimates.forecast(manager.scheduling, clock.monotonic())
    assert not estimates.forecast_due(clock.monotonic() + 4.9)
    assert estimates.forecast_due(clock.monotonic() + 5)
    assert not Estimates(interval_seconds=0).forecast_due(clock.monotonic())


async def test_a_forecast_with_no_job_waiting_takes_no_snapshot_of_the_nodes_and_clears_the_old_estimates():
    clock = FakeClock()
    manager = manager_with(MemoryJobStore(), clock)
    await manager.start()
    blocker = await manager.submit(spec(estimate=600))
    assert await manager.schedule_pass() == [blocker]
    queued = await manager.submit(spec(name="next", estimate=60))
    estimates, loop = manager.scheduling.estimates, manager.scheduling
    assert queued in estimates.forecast(loop, clock.monotonic()).starts
    snapshots = []
    node_views = loop.node_views
    loop.node_views = lambda: snapshots.append(1) or node_views()  # type: ignore[method-assign]
    assert (await manager.cancel(queued)).state == job_pb2.JOB_STATE_CANCELLED
    # The snapshot of every node is what stalls a large cluster's event loop; with nothing pending it is skipped.
    forecast = estimates.forecast(loop, clock.monotonic())
    assert (forecast.starts, forecast.steps, snapshots) == ({}, 0, [])
    assert not manager.get(queued).job.HasField("estimated_start_time")
    await manager.submit(spec(name="later", estimate=60))
    estimates.forecast(loop, clock.monotonic())
    assert snapshots == [1]


async def test_an_estimate_stored_before_a_restart_is_cleared_by_the_first_forecast():
    clock, store = FakeClock(), MemoryJobStore()
    first = manager_with(store, clock)
    await first.start()
    blocker = await first.submit(spec(estimate=0))  # no estimate: what waits behind it is unknown
    assert await first.schedule_pass() == [blocker]
    queued = first.get(await first.submit(spec(name="next", estimate=60)))
    queued.job.estimated_start_time.FromSeconds(int(clock.wall()) + 3600)  # an estimate from earlier times
    await first.save([queued])
    second = manager_with(store, clock)
    await second.start()
    assert second.get(queued.job.job_id).job.HasField("estimated_start_time")
    second.scheduling.estimates.forecast(second.scheduling, clock.monotonic())
    assert not second.get(queued.job.job_id).job.HasField("estimated_start_time")


def test_the_estimate_is_the_user_s_else_the_time_limit_else_the_prediction():
    estimates = Estimates(RuntimePredictor(min_samples=1, quantile=1.0))
    estimates.predictor.observe(42, owner="alice", name="train", gpus=1)
    told = JobRequest("j1", 1, owner="alice", estimated_runtime_seconds=10, time_limit_seconds=300)
    limited = JobRequest("j2", 1, owner="alice", time_limit_seconds=300)
    neither = JobRequest("j3", 1, owner="alice")
    assert [estimates.with_estimate(r, "train").estimated_runtime_seconds for r in (told, limited, neither)] == [10, 300, 42]
    assert set(estimates.predicted) == {"j3"}  # only a predicted estimate is refreshed later


@pytest.mark.parametrize(
    ("setting", "value"),
    [("runtime_prediction_quantile", 0.0), ("runtime_prediction_quantile", 1.5), ("runtime_prediction_min_samples", 0),
     ("runtime_prediction_default", -1.0), ("start_estimate_interval_seconds", -1.0)],
)  # fmt: skip
def test_bad_prediction_and_estimate_settings_are_refused_naming_them(setting, value):
    with pytest.raises(ValueError, match=setting):
        CoordinatorSettings(**{setting: value}).validate()
