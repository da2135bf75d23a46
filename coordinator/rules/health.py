"""Whether a GPU may get work, as a pure function of its telemetry.

XID codes follow NVIDIA's XID catalogue: the ones below mean the GPU, its
memory or its links are broken and a job on it cannot go on. Application
XIDs (13 graphics engine exception, 31 MMU fault, 43 GPU stopped processing,
45 preemptive cleanup) are caused by the job's own code and say nothing about
the hardware, so they do not make a device unhealthy.
"""

from __future__ import annotations

from coordinator.model.node_state import HEALTHY, DeviceHealth

__all__ = ["HEALTHY", "DeviceHealth"]

CRITICAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
}

DEFAULT_TEMPERATURE_LIMIT_CELSIUS = 90.0


def assess_device(
    *,
    lost: bool,
    last_xid: int,
    ecc_uncorrected_errors: int,
    temperature_celsius: float,
    temperature_limit_celsius: float,
) -> DeviceHealth:
    """Judges one device from its latest telemetry.

    `temperature_limit_celsius` of 0 or less means the coordinator's default.
    """
    if lost:
        return DeviceHealth(False, "lost: the agent can no longer reach the device")
    if last_xid in CRITICAL_XIDS:
        return DeviceHealth(False, f"xid {last_xid} ({CRITICAL_XIDS[last_xid]})")
    if ecc_uncorrected_errors > 0:
        return DeviceHealth(False, f"{ecc_uncorrected_errors} uncorrected ECC error(s)")
    limit = temperature_limit_celsius if temperature_limit_celsius > 0 else DEFAULT_TEMPERATURE_LIMIT_CELSIUS
    if temperature_celsius >= limit:
        return DeviceHealth(False, f"temperature {temperature_celsius:.0f}C at or above its limit of {limit:.0f}C")
    return HEALTHY


def quarantined(
    assessed: DeviceHealth, last_unhealthy_at: float | None, last_reason: str, now: float, recovery_seconds: float
) -> DeviceHealth:
    """A device that was unhealthy stays excluded until it has been healthy for `recovery_seconds`
    (a GPU that threw an XID often throws another), or until an operator clears it."""
    if not assessed.healthy or last_unhealthy_at is None:
        return assessed
    healthy_for = now - last_unhealthy_at
    if healthy_for >= recovery_seconds:
        return assessed
    return DeviceHealth(
        False,
        f"recovering from {last_reason}: healthy for {healthy_for:.0f}s of the {recovery_seconds:g}s required "
        "(or clear it with gpuctl resume NODE)",
    )
