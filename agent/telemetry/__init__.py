"""Telemetry sources: NVML on GPU nodes, simulated elsewhere. See api.py for the interface."""

from __future__ import annotations

from agent.telemetry.api import TelemetrySource, TelemetryUnavailable


def open_source(*, simulate_gpus: int, node_id: str, faults_file: str | None = None) -> TelemetrySource:
    """The simulated source when simulate_gpus > 0, else NVML (TelemetryUnavailable if absent)."""
    if simulate_gpus > 0:
        from agent.telemetry.simulated import SimulatedSource

        return SimulatedSource(simulate_gpus, node_id=node_id, faults_file=faults_file)
    from agent.telemetry.nvml import NvmlSource

    return NvmlSource()


__all__ = ["TelemetrySource", "TelemetryUnavailable", "open_source"]
