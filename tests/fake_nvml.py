"""A small hand-written stand-in for the pynvml module (fakes before mocks), driven by plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 1024**3
    used: int = 1024**3
    gpu_util: int = 40
    mem_util: int = 20
    temperature: int = 55
    slowdown_temperature: int = 87
    power_mw: int = 350_000
    power_limit_mw: int = 700_000
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    supports_ecc: bool = True
    lost: bool = False
    bus_id: bytes = b"00000000:18:00.0"


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    driver_present: bool = True
    pending_xids: list[tuple[int, int]] = field(default_factory=list)
    """(device index, xid code) events waiting to be read."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 8

    def nvmlInit(self):
        if not self.driver_present:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def _gpu(self, handle) -> FakeGpu:
        gpu = self.gpus[handle]
        if gpu.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return gpu

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle].uuid

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle)
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=self._gpu(handle).bus_id)

    def nvmlDeviceGetTemperatureThreshold(self, handle, kind):
        return self._gpu(handle).slowdown_temperature

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return self._gpu(handle).power_limit_mw

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._gpu(handle)
        return SimpleNamespace(gpu=gpu.gpu_util, memory=gpu.mem_util)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._gpu(handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._gpu(handle).power_mw

    def nvmlDeviceGetTotalEccErrors(self, handle, kind, counter):
        gpu = self._gpu(handle)
        if not gpu.supports_ecc:
            raise NVMLError_NotSupported("Not Supported")
        return gpu.ecc_corrected if kind == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else gpu.ecc_uncorrected

    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, handle, kinds, event_set):
        pass

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        if not self.pending_xids:
            raise NVMLError_Timeout("Timeout")
        index, code = self.pending_xids.pop(0)
        return SimpleNamespace(device=index, eventData=code, eventType=self.nvmlEventTypeXidCriticalError)

    def nvmlEventSetFree(self, event_set):
        pass
