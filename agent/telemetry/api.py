"""The telemetry source interface: what the agent needs to know about its GPUs.

Two engines sit behind it, chosen at start-up: NVML on a GPU node
(agent/telemetry/nvml.py) and a simulated source for laptops, CI and
benchmarks (agent/telemetry/simulated.py). Both speak in the wire messages
(DeviceInfo, DeviceTelemetry), so the agent forwards samples without copying.
"""

from __future__ import annotations

import abc

from gpuorch.v1 import cluster_pb2


class TelemetryUnavailable(RuntimeError):
    """No source can be opened; the message tells the operator what to do."""


class TelemetrySource(abc.ABC):
    blocking: bool = False
    """True when sample() may block on a driver (the agent then calls it in a thread)."""

    @abc.abstractmethod
    def devices(self) -> list[cluster_pb2.DeviceInfo]:
        """Static inventory, in index order. Fixed for the source's lifetime."""

    @abc.abstractmethod
    def sample(self) -> list[cluster_pb2.DeviceTelemetry]:
        """One sample per device, in index order. Never raises for a single bad device:
        a device that cannot be read is reported with `lost` set."""

    def close(self) -> None:  # noqa: B027 - optional: a source without a driver has nothing to release
        """Releases the driver, if any."""
