"""The states the node rules (rules/liveness.py, rules/health.py) move between: plain data."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Liveness(enum.Enum):
    READY = "ready"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeLiveness:
    state: Liveness
    connected: bool
    """Whether the node's stream is open."""
    heartbeat_interval: float
    """Seconds between the agent's heartbeats: the interval it actually uses."""
    since: float
    """Monotonic time the current state began."""
    reason: str
    """Why the node is in this state, for operators."""


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    healthy: bool
    reason: str
    """Why the device is unhealthy; empty when healthy."""


HEALTHY = DeviceHealth(True, "")
