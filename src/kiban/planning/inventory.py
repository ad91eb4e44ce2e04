"""Which GPUs a plan uses: NVML first, then kiban.yaml's ``gpus:``, then CLI options."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban import gpus as nvml
from kiban.sizing import catalogue
from kiban.sizing.devices import GpuInfo, gpu_from_type
from kiban.sizing.units import parse_size

if TYPE_CHECKING:
    from kiban.config import GpuInventory, KibanConfig


def discover_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees (empty without the library, a driver or a GPU)."""
    try:
        found = nvml.inventory()
    except nvml.GpuUnavailable:
        return []
    return [
        GpuInfo(g.index, g.name, g.memory_total, g.compute_capability, g.memory_used, "nvml")
        for g in found
    ]


def gpu_from_inventory(entry: GpuInventory) -> GpuInfo:
    """A GpuInfo from one validated ``gpus:`` entry (memory and capability override the type)."""
    gpu_type = catalogue.find_gpu(entry.type) if entry.type else None
    capability = gpu_type.compute_capability if gpu_type else None
    if entry.compute_capability:
        major, minor = entry.compute_capability.split(".")
        capability = (int(major), int(minor))
    if entry.memory is not None:
        memory = parse_size(entry.memory)
    else:
        assert gpu_type is not None  # validated: a known type where no memory is given
        memory = gpu_type.memory_bytes
    name = gpu_type.name if gpu_type else f"GPU {entry.index} ({entry.memory})"
    return GpuInfo(entry.index, name, memory, capability, 0, "config")


def resolve_gpus(cfg: KibanConfig) -> list[GpuInfo]:
    """NVML's GPUs when there are any, else the ``gpus:`` inventory of *cfg*."""
    found = discover_gpus()
    if found:
        return found
    return [gpu_from_inventory(entry) for entry in cfg.gpus]


def gpus_from_options(gpu: str | None, memory: str | None, count: int) -> list[GpuInfo]:
    """*count* alike GPUs from ``--gpu TYPE`` and/or ``--gpu-memory SIZE``.

    Raises ValueError with the accepted names or size forms.
    """
    gpu_type = None
    if gpu is not None:
        gpu_type = catalogue.find_gpu(gpu)
        if gpu_type is None:
            raise ValueError(
                f"unknown GPU type {gpu!r}; expected one of {', '.join(catalogue.gpu_keys())}"
            )
    size = parse_size(memory) if memory is not None else None
    out = []
    for index in range(count):
        if gpu_type is not None:
            info = gpu_from_type(index, gpu_type, "option")
            if size is not None:
                info = GpuInfo(index, info.name, size, info.compute_capability, 0, "option")
        else:
            info = GpuInfo(index, f"GPU {index} ({memory})", size or 0, None, 0, "option")
        out.append(info)
    return out
