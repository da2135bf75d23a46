"""Liveness rules as pure functions of (state, event, time)."""

from __future__ import annotations

import math

from coordinator.model.cluster import public_state
from coordinator.rules import liveness
from coordinator.rules.liveness import Liveness, LivenessPolicy
from gpuorch.v1 import cluster_pb2

POLICY = LivenessPolicy(grace_period=10.0, missed_heartbeats=3)


def test_registration_makes_a_node_ready():
    state = liveness.registered(now=100.0, heartbeat_interval=1.0)
    assert state.state is Liveness.READY and state.connected and state.since == 100.0


def test_closed_stream_makes_a_ready_node_suspect_at_once():
    ready = liveness.registered(now=100.0, heartbeat_interval=1.0)
    suspect = liveness.stream_closed(ready, now=100.5)
    assert suspect.state is Liveness.SUSPECT
    assert not suspect.connected
    assert suspect.since == 100.5


def test_suspect_node_is_down_exactly_when_the_grace_period_is_over():
    suspect = liveness.stream_closed(liveness.registered(0.0, 1.0), now=5.0)
    assert liveness.expire(suspect, last_seen=4.9, now=14.99, policy=POLICY).state is Liveness.SUSPECT
    down = liveness.expire(suspect, last_seen=4.9, now=15.0, policy=POLICY)
    assert down.state is Liveness.DOWN
    assert "grace" in down.reason
    assert liveness.next_deadline(suspect, 4.9, POLICY) == 15.0


def test_silent_open_stream_is_down_after_missed_heartbeats_of_the_agents_own_interval():
    ready = liveness.registered(now=0.0, heartbeat_interval=0.5)
    assert liveness.expire(ready, last_seen=10.0, now=11.49, policy=POLICY) is ready
    down = liveness.expire(ready, last_seen=10.0, now=11.5, policy=POLICY)
    assert down.state is Liveness.DOWN and down.connected
    assert "3 intervals of 0.5s" in down.reason
    assert liveness.next_deadline(ready, 10.0, POLICY) == 11.5


def test_heartbeats_keep_a_node_ready_indefinitely():
    ready = liveness.registered(now=0.0, heartbeat_interval=1.0)
    for second in range(1, 100):
        assert liveness.expire(ready, last_seen=float(second), now=second + 0.9, policy=POLICY) is ready


def test_reregistration_brings_down_and_suspect_nodes_back():
    down = liveness.expire(liveness.stream_closed(liveness.registered(0, 1), 1), 1, 50, POLICY)
    assert down.state is Liveness.DOWN
    assert liveness.registered(now=60, heartbeat_interval=1).state is Liveness.READY


def test_down_stays_down_without_registration_and_has_no_deadline():
    down = liveness.expire(liveness.stream_closed(liveness.registered(0, 1), 1), 1, 50, POLICY)
    assert liveness.expire(down, last_seen=1, now=10_000, policy=POLICY) is down
    assert liveness.stream_closed(down, 60).state is Liveness.DOWN
    assert math.isinf(liveness.next_deadline(down, 1, POLICY))


def test_zero_grace_period_means_down_on_the_first_check():
    policy = LivenessPolicy(grace_period=0.0)
    suspect = liveness.stream_closed(liveness.registered(0, 1), now=3)
    assert liveness.expire(suspect, 3, 3, policy).state is Liveness.DOWN


def test_public_state_puts_liveness_before_drain():
    assert public_state(Liveness.READY, drained=False, busy=False) == cluster_pb2.NODE_STATE_READY
    assert public_state(Liveness.READY, drained=True, busy=True) == cluster_pb2.NODE_STATE_DRAINING
    assert public_state(Liveness.READY, drained=True, busy=False) == cluster_pb2.NODE_STATE_DRAINED
    assert public_state(Liveness.SUSPECT, drained=True, busy=False) == cluster_pb2.NODE_STATE_SUSPECT
    assert public_state(Liveness.DOWN, drained=False, busy=True) == cluster_pb2.NODE_STATE_DOWN
