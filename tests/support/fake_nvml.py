"""A stand-in for pynvml where no NVIDIA driver exists (this machine, CI).

It starts from the REAL pynvml module (nvidia-ml-py, pinned): every constant,
error class and result struct is the real one; only the functions that call
into libnvidia-ml are replaced, and a test checks that each replaced name
exists in pynvml with a compatible signature. Values follow what an H100
showed on the device machine (see shared/REAL-ENGINES-HERE.md).
"""

from __future__ import annotations

import ctypes
import time
import types
from dataclasses import dataclass, field

import pynvml

MiB = 1024 * 1024


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    util_gpu: int = 37
    util_mem: int = 12
    mem_total: int = 81559 * MiB
    mem_used: int = 1024 * MiB
    mem_reserved: int = 529 * MiB
    temperature: int = 41
    slowdown: int = 87
    power_mw: int = 118_532
    power_limit_mw: int = 700_000
    energy_mj: int = 9_876_543_210
    sm_mhz: int = 1980
    mem_mhz: int = 2619
    clock_events: int = pynvml.nvmlClocksEventReasonGpuIdle
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    pcie_tx_kb: int = 1500
    pcie_rx_kb: int = 250
    pstate: int = 0
    fan_percent: int = 30
    compute_capability: tuple[int, int] = (9, 0)
    processes: list[tuple[int, int | None]] = field(default_factory=lambda: [(4242, 1024 * MiB)])
    #: names of the replaced functions that answer NVML_ERROR_NOT_SUPPORTED on this GPU
    unsupported: set[str] = field(default_factory=set)
    xid_events: list[int] = field(default_factory=list)


#: pynvml functions the fake replaces (tests check each against the real module)
REPLACED = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlEventSetCreate",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
)


def fake_nvml(gpus: list[FakeGpu], driver: str = "580.159.04") -> types.SimpleNamespace:
    """A module-like namespace: the real pynvml with its driver calls answered by *gpus*."""
    n = types.SimpleNamespace(**{k: v for k, v in vars(pynvml).items() if not k.startswith("__")})
    # real handle objects (c_nvmlDevice_t pointers), told apart by address
    structs = [pynvml.struct_c_nvmlDevice_t() for _ in gpus]
    pointers = [pynvml.c_nvmlDevice_t(s) for s in structs]
    by_address = {ctypes.addressof(s): g for s, g in zip(structs, gpus, strict=True)}

    def address(handle) -> int:
        return ctypes.cast(handle, ctypes.c_void_p).value

    def gpu(handle, fn: str) -> FakeGpu:
        g = by_address[address(handle)]
        if fn in g.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g

    def memory_info(handle, version=None):
        g = gpu(handle, "nvmlDeviceGetMemoryInfo")
        if version:
            if "nvmlDeviceGetMemoryInfo_v2" in g.unsupported:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            free = g.mem_total - g.mem_used - g.mem_reserved
            return pynvml.c_nvmlMemory_v2_t(
                version=version,
                total=g.mem_total,
                reserved=g.mem_reserved,
                free=free,
                used=g.mem_used,
            )
        return pynvml.c_nvmlMemory_t(
            total=g.mem_total, free=g.mem_total - g.mem_used, used=g.mem_used
        )

    def processes(handle):
        g = gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        out = []
        for pid, used in g.processes:
            na = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
            obj = pynvml.nvmlStructToFriendlyObject(
                pynvml.c_nvmlProcessInfo_v2_t(pid=pid, usedGpuMemory=na if used is None else used)
            )
            if obj.usedGpuMemory == na:  # what pynvml itself does for WDDM / WSL2
                obj.usedGpuMemory = None
            out.append(obj)
        return out

    registered: list[int] = []

    def register(handle, event_types, event_set):
        gpu(handle, "nvmlDeviceRegisterEvents")
        registered.append(gpus.index(by_address[address(handle)]))

    def wait(event_set, timeout_ms):
        for i in registered:
            if gpus[i].xid_events:
                data = pynvml.c_nvmlEventData_t()
                data.device = pointers[i]
                data.eventType = pynvml.nvmlEventTypeXidCriticalError
                data.eventData = gpus[i].xid_events.pop(0)
                return data
        time.sleep(min(timeout_ms, 20) / 1000)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def of(handle) -> FakeGpu:
        return by_address[address(handle)]

    n.nvmlInit = lambda: None
    n.nvmlShutdown = lambda: None
    n.nvmlSystemGetDriverVersion = lambda: driver
    n.nvmlDeviceGetCount = lambda: len(gpus)
    n.nvmlDeviceGetHandleByIndex = lambda i: pointers[i]
    n.nvmlDeviceGetIndex = lambda h: gpus.index(of(h))
    n.nvmlDeviceGetName = lambda h: gpu(h, "nvmlDeviceGetName").name
    n.nvmlDeviceGetUUID = lambda h: gpu(h, "nvmlDeviceGetUUID").uuid
    n.nvmlDeviceGetUtilizationRates = lambda h: pynvml.c_nvmlUtilization_t(
        gpu=gpu(h, "nvmlDeviceGetUtilizationRates").util_gpu, memory=of(h).util_mem
    )
    n.nvmlDeviceGetMemoryInfo = memory_info
    n.nvmlDeviceGetTemperature = lambda h, sensor: gpu(h, "nvmlDeviceGetTemperature").temperature
    n.nvmlDeviceGetTemperatureThreshold = lambda h, t: (
        gpu(h, "nvmlDeviceGetTemperatureThreshold").slowdown
    )
    n.nvmlDeviceGetPowerUsage = lambda h: gpu(h, "nvmlDeviceGetPowerUsage").power_mw
    n.nvmlDeviceGetEnforcedPowerLimit = lambda h: (
        gpu(h, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw
    )
    n.nvmlDeviceGetTotalEnergyConsumption = lambda h: (
        gpu(h, "nvmlDeviceGetTotalEnergyConsumption").energy_mj
    )
    n.nvmlDeviceGetClockInfo = lambda h, clock: (
        gpu(h, "nvmlDeviceGetClockInfo").sm_mhz if clock == pynvml.NVML_CLOCK_SM else of(h).mem_mhz
    )
    n.nvmlDeviceGetCurrentClocksEventReasons = lambda h: (
        gpu(h, "nvmlDeviceGetCurrentClocksEventReasons").clock_events
    )
    n.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: (
        gpu(h, "nvmlDeviceGetTotalEccErrors").ecc_corrected
        if kind == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        else of(h).ecc_uncorrected
    )
    n.nvmlDeviceGetPcieThroughput = lambda h, counter: (
        gpu(h, "nvmlDeviceGetPcieThroughput").pcie_tx_kb
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES
        else of(h).pcie_rx_kb
    )
    n.nvmlDeviceGetPerformanceState = lambda h: gpu(h, "nvmlDeviceGetPerformanceState").pstate
    n.nvmlDeviceGetFanSpeed = lambda h: gpu(h, "nvmlDeviceGetFanSpeed").fan_percent
    n.nvmlDeviceGetComputeRunningProcesses = processes
    n.nvmlDeviceGetCudaComputeCapability = lambda h: (
        gpu(h, "nvmlDeviceGetCudaComputeCapability").compute_capability
    )
    n.nvmlEventSetCreate = lambda: object()
    n.nvmlDeviceRegisterEvents = register
    n.nvmlEventSetWait_v2 = wait
    n.nvmlEventSetFree = lambda event_set: None
    return n
