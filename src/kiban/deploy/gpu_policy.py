"""GPU fail-fast: engines run on the GPU they name, or not at all.

Before launch, :func:`preflight` checks through NVML that every GPU a managed
engine names exists, that the driver answers, and that enough memory is free.
After start, :func:`verify_on_gpu` checks that the engine really holds memory on
its GPUs: from NVML's process list, or, where the platform hides it (WSL2),
from the engine's own start-up report. An engine with ``launch.device: cpu``
is allowed on the CPU because the user said so; nothing falls back silently.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from kiban import gpus as nvml
from kiban.config import EngineConfig, KibanConfig
from kiban.engines.telemetry import StartupReport

GIB = 1024**3


def gpu_required(cfg: KibanConfig) -> bool:
    """``gpu.require``, which defaults to true whenever a managed engine runs on a GPU."""
    if cfg.gpu.require is not None:
        return cfg.gpu.require
    return any(e.launch is not None and e.launch.device == "gpu" for e in cfg.engines)


def _gpu_engines(engines: list[EngineConfig]) -> list[EngineConfig]:
    return [e for e in engines if e.launch is not None and e.launch.device == "gpu"]


def preflight(
    cfg: KibanConfig, engines: list[EngineConfig], need_bytes: dict[int, int] | None = None
) -> list[str]:
    """Problems that must stop `kiban up` before anything starts (empty when all is well).

    *need_bytes* is the memory the plan needs on each GPU index; without a plan,
    each engine's ``launch.gpu_memory_gib`` and ``gpu.min_free_mib`` are checked.
    """
    wanted = _gpu_engines(engines)
    if not wanted:
        return []
    try:
        found = {g.index: g for g in nvml.inventory()}
    except nvml.GpuUnavailable as err:
        listed = ", ".join(f"{e.name!r} (GPUs {_ids(e)})" for e in wanted)
        return [
            f"engines {listed} need an NVIDIA GPU, but {err}. "
            "To run an engine on the CPU on purpose, set its launch.device: cpu."
        ]
    problems = []
    for engine in wanted:
        assert engine.launch is not None
        missing = [i for i in engine.launch.gpus if i not in found]
        if missing:
            have = ", ".join(f"{g.index} ({g.name})" for g in found.values()) or "none"
            problems.append(
                f"engine {engine.name!r}: launch.gpus names GPU {_join(missing)}, "
                f"which does not exist; this machine has GPUs: {have}"
            )
    need = dict(need_bytes) if need_bytes is not None else _declared_need(wanted)
    floor = cfg.gpu.min_free_mib * nvml.MIB
    users: dict[int, list[str]] = defaultdict(list)
    for engine in wanted:
        assert engine.launch is not None
        for index in engine.launch.gpus:
            users[index].append(engine.name)
    for index, names in sorted(users.items()):
        gpu = found.get(index)
        if gpu is None:
            continue
        required = max(need.get(index, 0), floor)
        if gpu.memory_free < required:
            problems.append(
                f"GPU {index} ({gpu.name}) has {nvml.mib(gpu.memory_free)} free of "
                f"{nvml.mib(gpu.memory_total)}, but engines {', '.join(map(repr, names))} "
                f"need {nvml.mib(required)}: stop what else uses it (nvidia-smi), or plan "
                "a smaller context, fewer sequences or a smaller KV-cache dtype (kiban plan)"
            )
    return problems


def _declared_need(engines: list[EngineConfig]) -> dict[int, int]:
    need: dict[int, int] = defaultdict(int)
    for engine in engines:
        assert engine.launch is not None
        if engine.launch.gpu_memory_gib is None:
            continue
        per_gpu = int(engine.launch.gpu_memory_gib * GIB)
        for index in engine.launch.gpus:
            need[index] += per_gpu
    return need


def _ids(engine: EngineConfig) -> str:
    assert engine.launch is not None
    return _join(engine.launch.gpus)


def _join(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class Verdict:
    """Whether an engine was seen on its GPU (None: no way to tell) and how."""

    on_gpu: bool | None
    detail: str


def verify_on_gpu(engine: EngineConfig, pids: set[int], report: StartupReport) -> Verdict:
    """Is any of *pids* (the engine's process group) holding memory on its GPUs?"""
    assert engine.launch is not None
    held: list[str] = []
    unknown = False
    try:
        for index in engine.launch.gpus:
            procs = nvml.processes(index)
            if procs is None:
                unknown = True
                continue
            for proc in procs:
                if proc.pid in pids:
                    amount = "memory" if proc.used_bytes is None else nvml.mib(proc.used_bytes)
                    held.append(f"PID {proc.pid} holds {amount} on GPU {index}")
    except nvml.GpuUnavailable as err:
        return Verdict(False, f"cannot read GPU processes: {err}")
    reported = report.device.lower() if report.device else None
    if reported is not None and not reported.startswith(("cuda", "gpu")):
        # A CUDA context alone shows in NVML's list too: the engine's own word decides.
        return Verdict(False, f"the engine's log reports device {report.device!r}")
    if held:
        return Verdict(True, "; ".join(held))
    if unknown:
        # NVML hides processes here (WSL2): the engine's own report decides.
        if report.device is None:
            return Verdict(
                None, "NVML lists no processes here and the engine's log names no device"
            )
        return Verdict(True, f"the engine's log reports device {report.device!r}")
    return Verdict(
        False,
        f"no process of the engine holds memory on GPU {_ids(engine)}: it fell back to the CPU "
        "or lost its GPU",
    )
