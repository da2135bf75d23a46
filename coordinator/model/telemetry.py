"""Telemetry as the coordinator keeps it: latest samples as plain tuples, short histories in arrays.

Plain data, no I/O; read by the cluster view, the scheduler's views and the metrics.
"""

from __future__ import annotations

import array
import math

from gpuorch.v1 import cluster_pb2

# A device's latest telemetry is kept as a plain tuple of numbers, in this order, not as the
# message it came in: the garbage collector stops tracking such tuples, so the samples of
# 16,000 GPUs, replaced every second, neither lengthen nor trigger full collections (which
# stall the event loop and with it heartbeat ingest).
SAMPLE_FIELDS = (
    "memory_used_bytes", "gpu_utilization_percent", "memory_utilization_percent", "temperature_celsius",
    "power_watts", "ecc_corrected_errors", "ecc_uncorrected_errors", "xid_count", "last_xid", "lost",
)  # fmt: skip
MEMORY_USED, GPU_UTILIZATION, _, TEMPERATURE, POWER, _, ECC_UNCORRECTED, _, LAST_XID, LOST = range(len(SAMPLE_FIELDS))


def sample_of(telemetry: cluster_pb2.DeviceTelemetry) -> tuple:
    return (
        telemetry.memory_used_bytes,
        telemetry.gpu_utilization_percent,
        telemetry.memory_utilization_percent,
        telemetry.temperature_celsius,
        telemetry.power_watts,
        telemetry.ecc_corrected_errors,
        telemetry.ecc_uncorrected_errors,
        telemetry.xid_count,
        telemetry.last_xid,
        telemetry.lost,
    )


def telemetry_of(uuid: str, sample: tuple) -> cluster_pb2.DeviceTelemetry:
    return cluster_pb2.DeviceTelemetry(uuid=uuid, **dict(zip(SAMPLE_FIELDS, sample, strict=True)))


class TelemetryHistory:
    """The last `length` samples of (wall time, GPU utilisation, memory used, temperature, power),
    in one preallocated array of doubles: constant memory, nothing for the garbage collector to walk."""

    WIDTH = 5
    __slots__ = ("count", "length", "values")

    def __init__(self, length: int) -> None:
        self.length = length
        self.values = array.array("d", bytes(8 * self.WIDTH * length))
        self.count = 0

    def append(self, wall: float, utilization: float, memory_used: float, temperature: float, power: float) -> None:
        start = (self.count % self.length) * self.WIDTH
        self.values[start : start + self.WIDTH] = array.array("d", (wall, utilization, memory_used, temperature, power))
        self.count += 1

    def __len__(self) -> int:
        return min(self.count, self.length)

    def samples(self) -> list[tuple[float, ...]]:
        """Oldest first."""
        first = self.count - len(self)
        return [
            tuple(self.values[(i % self.length) * self.WIDTH : (i % self.length + 1) * self.WIDTH])
            for i in range(first, self.count)
        ]


class HeartbeatStats:
    """Ingest lag and rate over recent heartbeats, for GetClusterStatus and benchmarks.

    A ring of the last `max_samples` (received time, lag) pairs in arrays of doubles: the hot path
    writes two numbers, and the garbage collector has nothing to walk."""

    def __init__(self, window_seconds: float = 10.0, max_samples: int = 1 << 16) -> None:
        self.window_seconds = window_seconds
        self.max_samples = max_samples
        self.received = array.array("d", bytes(8 * max_samples))
        self.lags = array.array("d", bytes(8 * max_samples))
        self.count = 0

    def record(self, received_wall: float, lag_seconds: float) -> None:
        slot = self.count % self.max_samples
        self.received[slot] = received_wall
        self.lags[slot] = lag_seconds
        self.count += 1

    def summary(self, now_wall: float) -> tuple[float, float, float]:
        """(heartbeats per second, p50 lag ms, p99 lag ms) over the window."""
        held = min(self.count, self.max_samples)
        if not held:
            return 0.0, 0.0, 0.0
        cutoff = now_wall - self.window_seconds
        received, lags = self.received[:held], self.lags[:held]
        recent = sorted(lag for when, lag in zip(received, lags, strict=True) if when >= cutoff)
        if not recent:
            return 0.0, 0.0, 0.0
        oldest = min(received)
        span = self.window_seconds if oldest <= cutoff else max(now_wall - oldest, 1e-3)
        return (
            len(recent) / span,
            1000 * recent[len(recent) // 2],
            1000 * recent[min(len(recent) - 1, math.ceil(0.99 * len(recent)) - 1)],
        )
