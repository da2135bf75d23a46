"""Node liveness as pure functions of (state, event, time).

The coordinator owns liveness (as Nomad's heartbeat timers do): it knows each
agent's heartbeat interval, and decides from the stream's life and the time of
the last message whether a node is READY, SUSPECT or DOWN.

    register                          -> READY
    READY   + stream closed           -> SUSPECT   (at once)
    SUSPECT + grace period over       -> DOWN
    READY   + silent for N intervals  -> DOWN      (stream open, nobody talking: hung agent, partition)
    any     + register                -> READY

Heartbeats on an open stream change no state; they move `last_seen` only, which
the caller keeps (so the hot path allocates nothing). A DOWN-by-silence node's
stream is closed by the caller so the agent has to re-register.

Time the coordinator itself was held (its event loop busy with one long piece of
work) is not counted as any node's silence: no heartbeat was read meanwhile, and
counting it turned one stall into a cascade of healthy nodes declared down (the
local-health idea of Lifeguard, which scales a member's timeouts while it is slow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from coordinator.model.node_state import Liveness, NodeLiveness

__all__ = ["Liveness", "LivenessPolicy", "NodeLiveness"]

STALL_EXCUSED_SECONDS = 0.5
"""A gap between two liveness ticks longer than their interval by this much is the coordinator's own stall."""


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """How long the coordinator waits before giving up on a node."""

    grace_period: float = 10.0
    """Seconds a node whose stream closed may take to come back before it is DOWN."""
    missed_heartbeats: int = 3
    """Heartbeat intervals of silence on an open stream after which a node is DOWN."""


def registered(now: float, heartbeat_interval: float) -> NodeLiveness:
    """An agent (re-)registered: the node is READY, whatever it was."""
    return NodeLiveness(Liveness.READY, True, heartbeat_interval, now, "registered")


def stream_closed(current: NodeLiveness, now: float, why: str = "stream closed") -> NodeLiveness:
    """The node's stream ended. READY turns SUSPECT at once; DOWN stays DOWN."""
    if current.state is Liveness.READY:
        return NodeLiveness(Liveness.SUSPECT, False, current.heartbeat_interval, now, why)
    return replace(current, connected=False)


def silence_limit(current: NodeLiveness, policy: LivenessPolicy) -> float:
    """Seconds without a message after which a connected node is DOWN."""
    return policy.missed_heartbeats * current.heartbeat_interval


def expire(current: NodeLiveness, last_seen: float, now: float, policy: LivenessPolicy) -> NodeLiveness:
    """Applies the passage of time: returns the state at `now` (the same object if nothing changed)."""
    if current.state is Liveness.READY and current.connected:
        silent_for = now - last_seen
        if silent_for >= silence_limit(current, policy):
            return NodeLiveness(
                Liveness.DOWN,
                True,
                current.heartbeat_interval,
                now,
                f"no heartbeat for {silent_for:.1f}s ({policy.missed_heartbeats} intervals of "
                f"{current.heartbeat_interval:g}s) while its stream stayed open",
            )
    elif current.state is Liveness.SUSPECT:
        away_for = now - current.since
        if away_for >= policy.grace_period:
            return NodeLiveness(
                Liveness.DOWN,
                False,
                current.heartbeat_interval,
                now,
                f"stream closed and not back within the {policy.grace_period:g}s grace period",
            )
    return current


def next_deadline(current: NodeLiveness, last_seen: float, policy: LivenessPolicy) -> float:
    """The earliest monotonic time at which `expire` could change the state; inf if never."""
    if current.state is Liveness.READY and current.connected:
        return last_seen + silence_limit(current, policy)
    if current.state is Liveness.SUSPECT:
        return current.since + policy.grace_period
    return math.inf


def coordinator_stall(previous_tick: float, now: float, tick_seconds: float) -> float:
    """Seconds the coordinator was held between two liveness ticks (0 unless at least STALL_EXCUSED_SECONDS)."""
    held = now - previous_tick - tick_seconds
    return held if held >= STALL_EXCUSED_SECONDS else 0.0


def excused(current: NodeLiveness, last_seen: float, stall: float) -> tuple[NodeLiveness, float]:
    """The node's state and last_seen with `stall` seconds of the coordinator's own stall not counted."""
    if current.state is Liveness.SUSPECT:
        current = replace(current, since=current.since + stall)
    return current, last_seen + stall
