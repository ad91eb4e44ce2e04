"""The devices a plan places engines on: GPUs (NVML, config, catalogue) and host memory.

``kiban.planning.inventory.discover_gpus()`` asks NVML for them; without NVML the
GPUs come from the ``gpus:`` key of kiban.yaml or from ``kiban plan --gpu/--gpu-memory``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kiban.sizing import catalogue


@dataclass(frozen=True)
class GpuInfo:
    """One GPU: index, name, total memory, compute capability (None when unknown).

    ``used_bytes`` is memory other processes hold at planning time (NVML only);
    the planner subtracts it from what it shares out.
    """

    index: int
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None
    used_bytes: int = 0
    source: str = "config"

    @property
    def supports_fp8(self) -> bool | None:
        """FP8 tensor cores (Ada sm89, Hopper sm90, Blackwell); None when unknown."""
        if self.compute_capability is None:
            return None
        return self.compute_capability >= (8, 9)


def gpu_from_type(index: int, gpu_type: catalogue.GpuType, source: str) -> GpuInfo:
    """A GpuInfo for a catalogue GPU type."""
    return GpuInfo(
        index, gpu_type.name, gpu_type.memory_bytes, gpu_type.compute_capability, 0, source
    )


@dataclass(frozen=True)
class HostInfo:
    """Host memory for engines that run on the CPU, and whether the CPU has AVX-512/AMX."""

    memory_bytes: int
    available_bytes: int
    cpu_flags: frozenset[str]

    @property
    def has_avx512_or_amx(self) -> bool:
        return "avx512f" in self.cpu_flags or "amx_tile" in self.cpu_flags


def host_info(
    meminfo: Path = Path("/proc/meminfo"), cpuinfo: Path = Path("/proc/cpuinfo")
) -> HostInfo:
    """Total and available memory from /proc/meminfo, CPU flags from /proc/cpuinfo."""
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[key] = int(parts[0]) * 1024
    except OSError:
        pass
    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return HostInfo(total, values.get("MemAvailable", total), frozenset(flags))
