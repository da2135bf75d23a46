"""Simulated GPUs with plausible, changing telemetry and injectable faults.

Faults come from the Python API (inject_xid, set_temperature, lose, restore)
or, for a running agent process, from a JSON file that the source re-reads
whenever it changes:

    {"0": {"xid": 79}, "1": {"temperature": 97.0}, "2": {"lost": true},
     "3": {"ecc_uncorrected": 2}, "4": {"utilization": 0.0}}

("utilization" pins a device's utilisation in percent: an idle or a busy GPU.)

Keys are device indexes; a device missing from the file is healthy again.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.telemetry.api import TelemetrySource
from gpuorch.logs import get_logger
from gpuorch.v1 import cluster_pb2

log = get_logger("agent.telemetry")

SIMULATED_MODEL = "gpuorch simulated H100 80GB"
SIMULATED_MEMORY_BYTES = 80 * 1024**3
SIMULATED_POWER_LIMIT_WATTS = 700.0
SIMULATED_TEMPERATURE_LIMIT_CELSIUS = 90.0
IDLE_POWER_WATTS = 70.0
AMBIENT_TEMPERATURE_CELSIUS = 32.0


@dataclass
class _Fault:
    xid: int = 0
    temperature: float | None = None
    lost: bool = False
    ecc_uncorrected: int = 0
    utilization: float | None = None
    """Pins the GPU's utilisation (percent), e.g. 0 for an idle job or 90 for a busy one."""


@dataclass
class _DeviceState:
    utilization: float
    memory_used: int
    temperature: float
    xid_count: int = 0
    last_xid: int = 0
    ecc_corrected: int = 0


class SimulatedSource(TelemetrySource):
    def __init__(self, count: int, *, node_id: str, seed: int | None = None, faults_file: str | Path | None = None) -> None:
        if count < 1:
            raise ValueError(f"--simulate-gpus must be at least 1, got {count}")
        self.rng = random.Random(seed)
        self.faults_file = Path(faults_file) if faults_file else None
        self._faults_mtime: float | None = None
        self._file_faults: dict[int, _Fault] = {}
        self._api_faults: dict[int, _Fault] = {}
        namespace = uuid.uuid5(uuid.NAMESPACE_DNS, f"{node_id}.gpuorch.sim")
        self._devices = [
            cluster_pb2.DeviceInfo(
                uuid=f"GPU-{uuid.uuid5(namespace, str(index))}",
                index=index,
                name=SIMULATED_MODEL,
                memory_total_bytes=SIMULATED_MEMORY_BYTES,
                pci_bus_id=f"00000000:{0x18 + index * 0x10:02X}:00.0",
                temperature_limit_celsius=SIMULATED_TEMPERATURE_LIMIT_CELSIUS,
                power_limit_watts=SIMULATED_POWER_LIMIT_WATTS,
            )
            for index in range(count)
        ]
        self._state = [
            _DeviceState(
                utilization=self.rng.uniform(0, 10),
                memory_used=int(self.rng.uniform(0.5, 2) * 1024**3),
                temperature=AMBIENT_TEMPERATURE_CELSIUS + self.rng.uniform(0, 5),
            )
            for _ in range(count)
        ]

    def devices(self) -> list[cluster_pb2.DeviceInfo]:
        return list(self._devices)

    # -- fault injection (tests and demos) ------------------------------------------------

    def _fault(self, index: int) -> _Fault:
        if not 0 <= index < len(self._devices):
            raise IndexError(f"no simulated device with index {index} (have {len(self._devices)})")
        return self._api_faults.setdefault(index, _Fault())

    def inject_xid(self, index: int, code: int) -> None:
        self._fault(index).xid = code

    def set_temperature(self, index: int, celsius: float | None) -> None:
        self._fault(index).temperature = celsius

    def set_utilization(self, index: int, percent: float | None) -> None:
        self._fault(index).utilization = percent

    def inject_ecc_uncorrected(self, index: int, count: int = 1) -> None:
        self._fault(index).ecc_uncorrected = count

    def lose(self, index: int) -> None:
        self._fault(index).lost = True

    def restore(self, index: int) -> None:
        """Clears every injected fault of a device (its XID count stays: counts never go back)."""
        self._fault(index)
        self._api_faults.pop(index, None)

    def _reload_faults_file(self) -> None:
        if self.faults_file is None:
            return
        try:
            mtime = self.faults_file.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._faults_mtime:
            return
        self._faults_mtime = mtime
        faults: dict[int, _Fault] = {}
        if mtime is not None:
            try:
                document = json.loads(self.faults_file.read_text() or "{}")
                for key, spec in document.items():
                    faults[int(key)] = _Fault(
                        xid=int(spec.get("xid", 0)),
                        temperature=float(spec["temperature"]) if "temperature" in spec else None,
                        lost=bool(spec.get("lost", False)),
                        ecc_uncorrected=int(spec.get("ecc_uncorrected", 0)),
                        utilization=min(100.0, max(0.0, float(spec["utilization"]))) if "utilization" in spec else None,
                    )
            except (ValueError, AttributeError, TypeError) as error:
                log.warning("ignoring unreadable faults file", path=str(self.faults_file), error=str(error))
                return
        self._file_faults = faults
        log.info("simulated faults loaded", path=str(self.faults_file), faults=sorted(faults))

    # -- sampling -------------------------------------------------------------------------

    def sample(self) -> list[cluster_pb2.DeviceTelemetry]:
        self._reload_faults_file()
        samples = []
        for info, state in zip(self._devices, self._state, strict=True):
            fault = self._api_faults.get(info.index) or self._file_faults.get(info.index) or _Fault()
            # A bounded random walk: busy GPUs stay busy, idle ones idle, with jitter.
            state.utilization = min(100.0, max(0.0, state.utilization + self.rng.uniform(-5, 5)))
            if fault.utilization is not None:
                state.utilization = fault.utilization
            state.memory_used = int(
                min(
                    SIMULATED_MEMORY_BYTES * 0.95, max(256 * 1024**2, state.memory_used + self.rng.uniform(-1, 1) * 256 * 1024**2)
                )
            )
            target_temperature = AMBIENT_TEMPERATURE_CELSIUS + 0.4 * state.utilization
            state.temperature += 0.3 * (target_temperature - state.temperature) + self.rng.uniform(-0.5, 0.5)
            if self.rng.random() < 0.001:
                state.ecc_corrected += 1
            if fault.xid and fault.xid != state.last_xid:
                state.xid_count += 1
                state.last_xid = fault.xid
            elif not fault.xid:
                state.last_xid = 0
            if fault.lost:
                samples.append(
                    cluster_pb2.DeviceTelemetry(uuid=info.uuid, lost=True, xid_count=state.xid_count, last_xid=state.last_xid)
                )
                continue
            samples.append(
                cluster_pb2.DeviceTelemetry(
                    uuid=info.uuid,
                    memory_used_bytes=state.memory_used,
                    gpu_utilization_percent=round(state.utilization, 1),
                    memory_utilization_percent=round(state.utilization * 0.6, 1),
                    temperature_celsius=round(fault.temperature if fault.temperature is not None else state.temperature, 1),
                    power_watts=round(
                        IDLE_POWER_WATTS + (SIMULATED_POWER_LIMIT_WATTS - IDLE_POWER_WATTS) * state.utilization / 100, 1
                    ),
                    ecc_corrected_errors=state.ecc_corrected,
                    ecc_uncorrected_errors=fault.ecc_uncorrected,
                    xid_count=state.xid_count,
                    last_xid=state.last_xid,
                )
            )
        return samples
