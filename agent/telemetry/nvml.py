"""GPU telemetry from NVIDIA's driver through NVML (the nvidia-ml-py package, module `pynvml`)."""

from __future__ import annotations

import importlib
from typing import Any

from agent.telemetry.api import TelemetrySource, TelemetryUnavailable
from gpuorch.logs import get_logger
from gpuorch.v1 import cluster_pb2

log = get_logger("agent.telemetry")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSource(TelemetrySource):
    blocking = True

    def __init__(self, nvml: Any = None) -> None:
        """Opens NVML. `nvml` replaces the pynvml module (tests pass a fake driver)."""
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")  # only GPU nodes need the driver bindings
            except ImportError as error:
                raise TelemetryUnavailable(
                    f"cannot import pynvml ({error}); install nvidia-ml-py, or start with --simulate-gpus N"
                ) from None
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise TelemetryUnavailable(
                f"NVML is not available ({error}): no NVIDIA driver on this machine? "
                "Install the driver, or start the agent with --simulate-gpus N to use simulated GPUs"
            ) from None
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())]
        self._devices = [self._inventory(index, handle) for index, handle in enumerate(self._handles)]
        self._xid_count = [0] * len(self._handles)
        self._last_xid = [0] * len(self._handles)
        self._lost = [False] * len(self._handles)
        self._events = self._open_xid_events()

    def _optional(self, call, *args, default=0):
        """Calls an NVML query that some GPUs do not support; `default` when unsupported."""
        try:
            return call(*args)
        except self.nvml.NVMLError_NotSupported:
            return default

    def _inventory(self, index: int, handle) -> cluster_pb2.DeviceInfo:
        nvml = self.nvml
        return cluster_pb2.DeviceInfo(
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_bytes=nvml.nvmlDeviceGetMemoryInfo(handle).total,
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            temperature_limit_celsius=float(
                self._optional(nvml.nvmlDeviceGetTemperatureThreshold, handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            ),
            power_limit_watts=self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle) / 1000.0,
        )

    def _open_xid_events(self):
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as error:
            log.warning("XID events unavailable; XIDs will not be reported", error=str(error))
            return None
        for index, handle in enumerate(self._handles):
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
            except nvml.NVMLError as error:
                log.warning("cannot watch XIDs of device", index=index, error=str(error))
        return events

    def _drain_xid_events(self) -> None:
        nvml = self.nvml
        if self._events is None:
            return
        while True:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as error:
                log.warning("reading XID events failed", error=str(error))
                return
            for index, handle in enumerate(self._handles):
                if event.device == handle or _text(nvml.nvmlDeviceGetUUID(event.device)) == self._devices[index].uuid:
                    self._xid_count[index] += 1
                    self._last_xid[index] = int(event.eventData)
                    log.warning("xid error", index=index, xid=int(event.eventData))
                    break

    def devices(self) -> list[cluster_pb2.DeviceInfo]:
        return list(self._devices)

    def sample(self) -> list[cluster_pb2.DeviceTelemetry]:
        nvml = self.nvml
        self._drain_xid_events()
        samples = []
        for index, (info, handle) in enumerate(zip(self._devices, self._handles, strict=True)):
            sample = cluster_pb2.DeviceTelemetry(uuid=info.uuid, xid_count=self._xid_count[index], last_xid=self._last_xid[index])
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                sample.memory_used_bytes = memory.used
                rates = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle, default=None)
                if rates is not None:
                    sample.gpu_utilization_percent = rates.gpu
                    sample.memory_utilization_percent = rates.memory
                sample.temperature_celsius = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                sample.power_watts = self._optional(nvml.nvmlDeviceGetPowerUsage, handle) / 1000.0
                sample.ecc_corrected_errors = self._optional(
                    nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC
                )
                sample.ecc_uncorrected_errors = self._optional(
                    nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                )
                self._lost[index] = False
            except nvml.NVMLError as error:
                # GPU_IS_LOST is the documented case (fell off the bus); any failure to read
                # the device means no job should be placed on it until it reads again.
                if not self._lost[index]:
                    log.error("device unreadable; reporting it lost", index=index, uuid=info.uuid, error=str(error))
                self._lost[index] = True
                sample = cluster_pb2.DeviceTelemetry(
                    uuid=info.uuid, lost=True, xid_count=self._xid_count[index], last_xid=self._last_xid[index]
                )
            samples.append(sample)
        return samples

    def close(self) -> None:
        try:
            if self._events is not None:
                self.nvml.nvmlEventSetFree(self._events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass
