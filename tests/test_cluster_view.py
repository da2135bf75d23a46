"""The cluster view's bookkeeping: telemetry history, ingest stats, and the garbage settler."""

from __future__ import annotations

import gc

from coordinator.control.cluster_view import ClusterView
from coordinator.control.liveness_loop import (
    LIVENESS_TICK_SECONDS,
    SETTLE_SECONDS,
    UNFREEZE_SECONDS,
    YOUNG_COLLECTION_THRESHOLD,
    GarbageSettler,
    liveness_tick,
    tune_collector,
)
from coordinator.model.telemetry import HeartbeatStats, TelemetryHistory, sample_of, telemetry_of
from coordinator.rules.liveness import Liveness, LivenessPolicy
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2, cluster_pb2


def test_history_keeps_the_last_samples_oldest_first():
    history = TelemetryHistory(3)
    assert history.samples() == [] and len(history) == 0
    for second in range(5):
        history.append(float(second), 10.0 * second, 1.0, 40.0, 300.0)
    assert len(history) == 3
    assert [sample[0] for sample in history.samples()] == [2.0, 3.0, 4.0]
    assert history.samples()[-1] == (4.0, 40.0, 1.0, 40.0, 300.0)


def test_heartbeat_stats_report_rate_and_percentiles_over_the_window():
    stats = HeartbeatStats(window_seconds=10, max_samples=1000)
    for i in range(100):
        stats.record(1000.0 + i * 0.1, 0.001 if i < 98 else 0.5)
    rate, p50, p99 = stats.summary(1010.0)
    assert 9.5 < rate < 10.5
    assert p50 == 1.0 and p99 == 500.0
    assert stats.summary(2000.0) == (0.0, 0.0, 0.0), "nothing in the window"


def test_samples_round_trip_between_tuple_and_message():
    message = cluster_pb2.DeviceTelemetry(uuid="GPU-1", memory_used_bytes=5, temperature_celsius=61.5, last_xid=79, lost=True)
    assert telemetry_of("GPU-1", sample_of(message)) == message


def test_heartbeats_fill_the_history_and_device_health():
    view = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0, history_length=4)
    register = agent_pb2.Register(node_id="n1")
    register.devices.add(uuid="GPU-1", index=0, memory_total_bytes=80)
    _, session, _ = view.register(register)
    for temperature in (40, 50, 95):
        heartbeat = agent_pb2.Heartbeat(
            sequence=1, devices=[cluster_pb2.DeviceTelemetry(uuid="GPU-1", temperature_celsius=temperature)]
        )
        view.heartbeat(session, heartbeat)
    device = view.nodes["n1"].devices["GPU-1"]
    assert [sample[3] for sample in device.history.samples()] == [40, 50, 95]
    assert not device.health.healthy and "95C" in device.health.reason


def test_the_coordinators_collector_runs_young_collections_less_often_and_keeps_the_older_thresholds():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's defaults
        tune_collector()
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10)
        gc.set_threshold(100_000, 5, 7)
        tune_collector()
        assert gc.get_threshold() == (100_000, 5, 7), "a higher threshold is not lowered"
    finally:
        gc.set_threshold(*saved)


def test_garbage_settler_freezes_after_quiet_and_unfreezes_hourly():
    clock = FakeClock(monotonic=0.0)
    settler = GarbageSettler(clock)
    gc.unfreeze()
    try:
        settler.registered()
        clock.advance(SETTLE_SECONDS - 0.1)
        settler.tick()
        assert gc.get_freeze_count() == 0, "not while registrations are recent"
        clock.advance(0.1)
        settler.tick()
        assert gc.get_freeze_count() > 0
        clock.advance(UNFREEZE_SECONDS)
        settler.tick()
        assert settler.frozen_at == clock.monotonic(), "unfrozen and frozen again in the same quiet tick"
    finally:
        gc.unfreeze()


def test_the_coordinators_own_stall_is_not_counted_as_any_nodes_silence():
    """Found by bench/heartbeats.py --progress: one 1-3 s stall of the event loop (a pass over 2,000 queued jobs, then
    the work of nodes declared down) left heartbeats unread; counting that time as silence declared healthy nodes
    down, whose failed jobs stalled the loop again, until 1,769 of 2,000 nodes were down."""
    clock = FakeClock()
    policy = LivenessPolicy(missed_heartbeats=3, grace_period=10.0)
    cluster = ClusterView(policy=policy, default_heartbeat_interval=1.0, clock=clock)
    garbage = GarbageSettler(clock)
    _, talking, _ = cluster.register(agent_pb2.Register(node_id="talking", addresses=["127.0.0.1"]))
    _, closing, _ = cluster.register(agent_pb2.Register(node_id="closing", addresses=["127.0.0.1"]))
    cluster.stream_closed(closing)  # SUSPECT: 10 s to come back
    previous = clock.monotonic()
    for _ in range(20):  # 1 s of regular ticks
        clock.advance(LIVENESS_TICK_SECONDS)
        liveness_tick(cluster, garbage, previous, clock.monotonic())
        previous = clock.monotonic()
    cluster.heartbeat(talking, agent_pb2.Heartbeat(sequence=1))
    clock.advance(9.5)  # the coordinator held for 9.5 s: no heartbeat read, no tick
    liveness_tick(cluster, garbage, previous, clock.monotonic())
    previous = clock.monotonic()
    assert cluster.nodes["talking"].liveness.state is Liveness.READY
    assert cluster.nodes["closing"].liveness.state is Liveness.SUSPECT, "its grace does not count the stall either"
    for _ in range(70):  # 3.5 s of regular ticks and silence: now it counts
        clock.advance(LIVENESS_TICK_SECONDS)
        liveness_tick(cluster, garbage, previous, clock.monotonic())
        previous = clock.monotonic()
    assert cluster.nodes["talking"].liveness.state is Liveness.DOWN
    assert "no heartbeat for 3.0s" in cluster.nodes["talking"].liveness.reason
    assert cluster.nodes["closing"].liveness.state is Liveness.SUSPECT
    for _ in range(120):
        clock.advance(LIVENESS_TICK_SECONDS)
        liveness_tick(cluster, garbage, previous, clock.monotonic())
        previous = clock.monotonic()
    assert cluster.nodes["closing"].liveness.state is Liveness.DOWN
