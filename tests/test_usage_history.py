"""The usage history (coordinator/model/usage.py) on a fake clock, and its rendering for GetUsageHistory."""

from __future__ import annotations

import pytest

from coordinator.model.usage import DAY, HOUR, MINUTE, UsageHistory, UsageSample, UsageTier, totals
from coordinator.observe.usage_sampler import usage_problem, usage_response
from gpuorch.clock import FakeClock
from gpuorch.v1 import cluster_pb2

START = 1_800_000_000.0 - 1_800_000_000.0 % HOUR  # on an hour boundary, so the intervals are easy to count


def busy(allocated: int, owner: str = "alice", pool: str = "default", total: int = 8, utilization: float = 50.0):
    return UsageSample(
        total, allocated, utilization, {owner: allocated} if allocated else {}, {pool: allocated} if allocated else {}
    )


def run(history: UsageHistory, clock: FakeClock, seconds: float, sample: UsageSample, step: float = 10.0) -> None:
    for _ in range(int(seconds / step)):
        history.record(clock.wall(), sample)
        clock.advance(step)


def test_minute_points_average_the_samples_weighted_by_time_and_owners_get_gpu_seconds():
    clock = FakeClock(wall=START)
    history = UsageHistory(10.0, clock.wall())
    run(history, clock, 60, busy(4, "alice", utilization=80.0))
    run(history, clock, 30, busy(8, "bob", pool="a100", utilization=100.0))
    run(history, clock, 30, busy(0, utilization=0.0))
    first, second = history.minutes.intervals
    assert (first.start, first.covered_seconds, first.gpus_allocated, first.mean_gpu_utilization_percent) == (START, 60, 4, 80)
    assert second.start == START + MINUTE
    assert second.gpus_allocated == pytest.approx(4.0)  # 8 GPUs for half of it, none for the other half
    assert second.mean_gpu_utilization_percent == pytest.approx(50.0)
    owners, pools = totals(history.minutes.intervals)
    assert owners == [("bob", 240.0), ("alice", 240.0)] or owners == [("alice", 240.0), ("bob", 240.0)]
    assert dict(pools) == {"default": 240.0, "a100": 240.0}
    (hour,) = history.hours.intervals
    assert hour.covered_seconds == 120 and hour.gpu_seconds_allocated == 480


def test_a_gap_counts_at_most_two_sample_intervals_and_a_clock_step_back_counts_nothing():
    clock = FakeClock(wall=START)
    history = UsageHistory(10.0, clock.wall())
    history.record(clock.wall(), busy(8))
    clock.advance(3600)  # the coordinator stalled (or the machine slept) for an hour
    history.record(clock.wall(), busy(8))
    assert sum(interval.covered_seconds for interval in history.minutes.intervals) == 10 + 20
    history.record(clock.wall() - 500, busy(8))  # the wall clock stepped back
    assert sum(interval.covered_seconds for interval in history.minutes.intervals) == 30


def test_tiers_stay_bounded_by_their_retention():
    clock = FakeClock(wall=START)
    history = UsageHistory(MINUTE, clock.wall())
    run(history, clock, 8 * DAY, busy(1), step=MINUTE)
    assert len(history.minutes.intervals) == 7 * DAY // MINUTE
    assert history.minutes.intervals[0].start >= clock.wall() - 7 * DAY - MINUTE
    assert len(history.hours.intervals) == 8 * 24
    run(history, clock, 90 * DAY, busy(1), step=HOUR)
    assert len(history.hours.intervals) == 90 * 24
    # hourly samples leave one minute interval an hour, and those older than 7 days expire
    assert len(history.minutes.intervals) == 7 * 24 + 1
    assert all(interval.start > clock.wall() - 7 * DAY - 2 * HOUR for interval in history.minutes.intervals)


def test_a_tier_refuses_nonsense_and_the_history_names_its_tiers():
    with pytest.raises(ValueError, match="width > 0"):
        UsageTier(0, 10)
    with pytest.raises(ValueError, match="sample_interval"):
        UsageHistory(0, START)
    with pytest.raises(ValueError, match="no usage tier of 5 seconds"):
        UsageHistory(1, START).tier(5)


def test_the_response_holds_the_range_asked_for_with_totals_over_it():
    clock = FakeClock(wall=START)
    history = UsageHistory(10.0, clock.wall())
    run(history, clock, 5 * MINUTE, busy(2, "alice"))
    run(history, clock, 5 * MINUTE, busy(6, "bob", pool="b"))
    now = clock.wall()
    everything = usage_response(history, cluster_pb2.GetUsageHistoryRequest(), now)
    assert everything.point_seconds == 60 and len(everything.points) == 10
    assert [(total.name, total.gpu_seconds) for total in everything.owners] == [("bob", 1800.0), ("alice", 600.0)]
    assert everything.points[0].allocated_gpu_seconds == 120.0
    request = cluster_pb2.GetUsageHistoryRequest()
    request.start_time.FromSeconds(int(START + 5 * MINUTE))
    later = usage_response(history, request, now)
    assert len(later.points) == 5 and [total.name for total in later.owners] == ["bob"]
    hourly = usage_response(history, cluster_pb2.GetUsageHistoryRequest(resolution=cluster_pb2.USAGE_RESOLUTION_HOUR), now)
    assert hourly.point_seconds == 3600 and len(hourly.points) == 1
    assert hourly.points[0].gpus_allocated == pytest.approx(4.0)


def test_bad_requests_are_named():
    assert "resolution 9" in usage_problem(cluster_pb2.GetUsageHistoryRequest(resolution=9))
    request = cluster_pb2.GetUsageHistoryRequest()
    request.start_time.FromSeconds(200)
    request.end_time.FromSeconds(100)
    assert usage_problem(request) == "start_time is after end_time"
    assert usage_problem(cluster_pb2.GetUsageHistoryRequest()) is None
    beyond = cluster_pb2.GetUsageHistoryRequest()
    beyond.start_time.seconds = -(2**63)  # what a hostile client may send: no Timestamp holds it
    assert "start_time is not a valid time" in usage_problem(beyond)


def test_a_real_coordinator_serves_usage_who_am_i_and_gpu_history(tmp_path):
    """GetUsageHistory, WhoAmI and GetNode's telemetry history over the wire, and gpuctl usage."""
    import subprocess
    import sys

    from tests.harness import LocalCluster, wait_for

    cluster = LocalCluster(tmp_path)
    cluster.start_coordinator()
    cluster.add_agent("node-a", 2)
    try:
        cluster.wait_for_nodes(1)
        client = cluster.client()
        job_id = client.submit_job(argv=["sleep", "60"], gpus=2, owner="alice")
        wait_for(lambda: client.get_job(job_id).state == 2, timeout=20, what="the job to run")
        # The sampler takes one sample at start and one every 10 s: wait for one that sees the job.
        usage = wait_for(
            lambda: (found := client.usage_history()) and any(total.name == "alice" for total in found.owners) and found,
            timeout=30,
            interval=0.5,
            what="alice's GPU-seconds",
        )
        # A minute point is the time-weighted mean of its samples: one taken before the agent registered (0 GPUs)
        # may share the minute, so the latest point lies between what the samples saw.
        assert usage.point_seconds == 60 and usage.points and 0 < usage.points[-1].gpus_total <= 2
        assert client.usage_history("hour").point_seconds == 3600
        with pytest.raises(ValueError, match="unknown resolution"):
            client.usage_history("second")
        me = client.who_am_i()
        assert (me.authenticated, me.role) == (False, "admin")
        node = client.get_node("node-a", include_telemetry_history=True)
        assert all(len(device.telemetry_history) >= 1 for device in node.devices)
        assert not any(device.telemetry_history for device in client.get_node("node-a").devices)
        shown = subprocess.run(
            [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, "usage", "--history", "--days", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "alice" in shown.stdout and "GPU-HOURS" in shown.stdout
        refused = subprocess.run(
            [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, "usage", "--history", "--days", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode != 0 and "--days must be > 0" in refused.stderr
    finally:
        cluster.stop()
