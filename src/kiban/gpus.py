"""What NVML (nvidia-ml-py) says about this machine's NVIDIA GPUs, for fail-fast checks.

Every call initialises NVML once per process and turns NVML's failures into
:class:`GpuUnavailable` with a sentence a user can act on. Readings the
platform does not give (the process list under WSL2, for one) come back as
``None``, never as a made-up zero.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import pynvml

from kiban.errors import KibanError

MIB = 1024 * 1024


class GpuUnavailable(KibanError):
    """NVML cannot be used here; the message says what is missing and what to do."""


@dataclass(frozen=True)
class NvmlGpu:
    """One GPU as NVML reports it (memory in bytes)."""

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    memory_free: int
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU (``used_bytes`` None where NVML withholds it)."""

    pid: int
    used_bytes: int | None


def is_wsl() -> bool:
    """True under WSL (the Windows driver serves NVML; some queries are not supported)."""
    try:
        release = Path("/proc/sys/kernel/osrelease").read_text().lower()
    except OSError:
        return False
    return "microsoft" in release or "wsl" in release


@functools.cache
def _init() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        hint = (
            "install the NVIDIA driver for Windows (WSL2 gets libnvidia-ml from it)"
            if is_wsl()
            else "install the NVIDIA driver (nvidia-smi must work)"
        )
        raise GpuUnavailable(f"NVML library libnvidia-ml.so.1 not found: {hint}") from None
    except pynvml.NVMLError_DriverNotLoaded:
        raise GpuUnavailable(
            "the NVIDIA kernel driver is not loaded (is there an NVIDIA GPU? try nvidia-smi)"
        ) from None
    except pynvml.NVMLError as err:
        raise GpuUnavailable(f"NVML failed to initialise: {err}") from None


def driver_version() -> str:
    """The NVIDIA driver version string."""
    _init()
    version = pynvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else version


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def inventory() -> list[NvmlGpu]:
    """Every GPU NVML sees, in NVML index order (which CUDA_VISIBLE_DEVICES ignores)."""
    _init()
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(
            NvmlGpu(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                memory_total=int(memory.total),
                memory_used=int(memory.used),
                memory_free=int(memory.free),
                compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
            )
        )
    return gpus


def processes(index: int) -> list[GpuProcess] | None:
    """Compute processes on GPU *index*; None where the platform does not say (WSL2)."""
    _init()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    try:
        found = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError_NotSupported:
        return None
    out = []
    for proc in found:
        used = proc.usedGpuMemory
        out.append(GpuProcess(int(proc.pid), None if used is None else int(used)))
    return out


def visible_devices_env(indices: list[int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for NVML *indices*, by UUID when NVML answers (order-proof).

    CUDA numbers devices fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so plain
    NVML indices could select the wrong card; UUIDs cannot.
    """
    try:
        by_index = {g.index: g.uuid for g in inventory()}
        ids = [by_index[i] for i in indices]
    except (GpuUnavailable, KeyError):
        ids = [str(i) for i in indices]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def environment_summary() -> dict[str, str | None]:
    """CUDA-related environment variables that change which GPUs a process sees."""
    names = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES")
    return {name: os.environ.get(name) for name in names}


def mib(value: int) -> str:
    """Bytes as a human MiB/GiB figure."""
    if value >= 1024 * MIB:
        return f"{value / (1024 * MIB):.1f} GiB"
    return f"{value / MIB:.0f} MiB"
