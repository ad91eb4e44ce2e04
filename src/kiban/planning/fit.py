"""Share each device's memory among the engines placed on it, then size their caches.

Per device (a GPU, or host memory for CPU engines) the usable memory is the
total less what other processes use (NVML) and ``planning.reserve_fraction``.
Shares are, in order:

1. ``launch.gpu_memory_gib`` where set (a cap the user chose);
2. for engines with both ``context`` and ``concurrency``: weights + overhead +
   exactly the KV cache those need (in the engine's block layout);
3. the rest split evenly among the remaining engines, each keeping its weights
   and overhead, so the KV budget is the same for each.

An engine spanning several GPUs (tensor parallel) gets the smallest of its
per-GPU shares on each of them. Engines start in config order; ``free at
start`` (what lmdeploy and SGLang size their fractions from) assumes that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiban.config import EngineConfig, KibanConfig, LaunchConfig
from kiban.cpulist import split_cores, usable_cores
from kiban.engines import ENGINE_KINDS
from kiban.engines.kv_layout import KvLayout
from kiban.planning.hf_config import ModelConfigError
from kiban.planning.models import UnknownModelError, load_spec
from kiban.planning.weights import WeightsError
from kiban.sizing.devices import GpuInfo, HostInfo, host_info
from kiban.sizing.kv import KvFormat, KvNeed
from kiban.sizing.plan import DevicePlan, EnginePlan, Plan
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.sizing.units import GiB, human

#: the most sequences a plan gives an engine when the user set no concurrency
#: (vLLM's own default for its OpenAI server on GPUs under 70 GiB)
DEFAULT_MAX_CONCURRENCY = 256
MIN_CONTEXT = 16


@dataclass
class _Draft:
    """An engine between model/dtype resolution and memory sharing."""

    config: EngineConfig
    kv: KvLayout
    spec: ModelSpec
    target: PlanTarget
    k: KvFormat
    v: KvFormat
    need: KvNeed
    weights: int
    overhead: int
    devices: list[str]
    share: int = 0  # its share of its devices' memory, set once memory is shared out
    warnings: list[str] = field(default_factory=list)
    cpus: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def launch(self) -> LaunchConfig:
        return _launch(self.config)

    @property
    def fixed(self) -> int:
        return self.weights + self.overhead

    def requested_kv(self) -> int | None:
        """KV bytes for the requested context x concurrency, when both are set."""
        launch = self.launch
        if launch.context is None or launch.concurrency is None:
            return None
        raw = self.kv.kv_cache_bytes(self.need, launch.context, launch.concurrency, self.target)
        return _round_up(raw, self.kv.kv_allocation_unit(self.target))


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _round_down(value: int, unit: int) -> int:
    return max(0, value // unit * unit)


def _devices(cfg: KibanConfig, gpus: list[GpuInfo], host: HostInfo) -> dict[str, DevicePlan]:
    reserve = cfg.planning.reserve_fraction
    out = {
        f"gpu{g.index}": DevicePlan(
            f"gpu{g.index}",
            g.name,
            g.memory_bytes,
            g.used_bytes,
            int(g.memory_bytes * reserve),
            g.source,
        )
        for g in gpus
    }
    used = host.memory_bytes - host.available_bytes
    out["host"] = DevicePlan(
        "host", "host memory", host.memory_bytes, used, int(host.memory_bytes * reserve), "/proc"
    )
    return out


def _launch(engine: EngineConfig) -> LaunchConfig:
    assert engine.launch is not None  # plan_config drafts launched engines only
    return engine.launch


def _target(engine: EngineConfig, gpus: dict[int, GpuInfo], host: HostInfo) -> PlanTarget:
    launch = _launch(engine)
    if launch.device == "cpu":
        return PlanTarget("cpu", host, args=tuple(launch.args))
    missing = [i for i in launch.gpus if i not in gpus]
    if missing:
        known = ", ".join(str(i) for i in sorted(gpus)) or "none"
        raise PlanRefusal(
            f"GPU {', '.join(map(str, missing))} unknown (known GPUs: {known}); NVML sees no GPU "
            "here, so describe it under `gpus:` in kiban.yaml or pass --gpu / --gpu-memory"
        )
    return PlanTarget(
        "gpu", host, gpus[launch.gpus[0]], tp=len(launch.gpus), args=tuple(launch.args)
    )


def _draft(engine: EngineConfig, gpus: dict[int, GpuInfo], host: HostInfo) -> _Draft:
    kv = ENGINE_KINDS[engine.kind].kv
    if kv is None:
        raise PlanRefusal(f"kiban does not launch {engine.kind} engines, so it cannot plan one")
    launch = _launch(engine)
    try:
        spec = load_spec(launch.model)
    except (UnknownModelError, ModelConfigError, WeightsError) as err:
        raise PlanRefusal(str(err)) from None
    target = _target(engine, gpus, host)
    k, v = kv.kv_formats(launch.kv_cache_dtype, spec, target)
    need = kv.kv_need(spec, k, v, target)
    context = launch.context or spec.max_context
    concurrency = launch.concurrency or DEFAULT_MAX_CONCURRENCY
    overhead = kv.overhead_bytes(spec, target, context, concurrency)
    devices = [f"gpu{i}" for i in launch.gpus] if target.on_gpu else ["host"]
    warnings = [*spec.notes, *kv.planning_warnings(spec, k, v, target)]
    if spec.vision_bytes:
        warnings.append(
            f"vision tower ({human(spec.vision_bytes)}) counted in the weights; image "
            "encoder activations are not in the overhead estimate, so leave headroom"
        )
    if launch.context and launch.context > spec.max_context:
        warnings.append(
            f"context {launch.context} exceeds the model's max_position_embeddings "
            f"{spec.max_context}"
        )
    return _Draft(
        engine, kv, spec, target, k, v, need, kv.weights_on_device(spec, target), overhead,
        devices, warnings=warnings,
    )  # fmt: skip


def _share_out(device: DevicePlan, drafts: list[_Draft]) -> dict[str, int]:
    """Each draft's share of *device* (before taking the minimum over a TP group)."""
    shares: dict[str, int] = {}
    flexible = []
    for d in drafts:
        if d.launch.gpu_memory_gib is not None:
            shares[d.name] = int(d.launch.gpu_memory_gib * GiB)
        elif (kv := d.requested_kv()) is not None:
            shares[d.name] = d.fixed + kv
        else:
            flexible.append(d)
    rest = device.usable_bytes - sum(shares.values())
    spare = max(0, rest - sum(d.fixed for d in flexible))
    for d in flexible:
        shares[d.name] = d.fixed + spare // len(flexible)
    return shares


def _size_cache(d: _Draft) -> tuple[int, int, int]:
    """(kv bytes, context, concurrency) for a draft whose share is set."""
    kv, target, need, launch = d.kv, d.target, d.need, d.launch
    unit = kv.kv_allocation_unit(target)
    requested = d.requested_kv()
    if requested is not None:
        assert launch.context is not None and launch.concurrency is not None  # requested_kv
        return requested, launch.context, launch.concurrency
    budget = _round_down(d.share - d.fixed, unit)
    block = kv.kv_block_tokens(target)
    per_token = max(1, need.bytes_per_token + need.sliding_bytes_per_token)
    if launch.context is not None:
        context = launch.context
        per_sequence = kv.kv_cache_bytes(need, context, 1, target)
        concurrency = min(DEFAULT_MAX_CONCURRENCY, budget // per_sequence)
    elif launch.concurrency is not None:
        concurrency = launch.concurrency
        context = min(d.spec.max_context, budget // concurrency // per_token // block * block)
    else:
        context = d.spec.max_context
        per_sequence = kv.kv_cache_bytes(need, context, 1, target)
        concurrency = min(DEFAULT_MAX_CONCURRENCY, budget // per_sequence)
        if concurrency < 1:
            shortened = budget // per_token // block * block
            d.warnings.append(
                f"context shortened from the model's {context} to {shortened} tokens "
                "to fit one sequence"
            )
            context, concurrency = shortened, 1
    if kv.kv_sized_by_tokens and concurrency >= 1:
        budget = kv.kv_cache_bytes(need, context, concurrency, target)
    return budget, context, concurrency


def _alternatives(d: _Draft, budget: int) -> list[str]:
    """Settings that would fit a KV budget of *budget* bytes (for refusals)."""
    launch, kv, target = d.launch, d.kv, d.target
    context, concurrency = launch.context, launch.concurrency
    out: list[str] = []
    if budget <= 0:
        return out
    if context:
        tokens = kv.kv_capacity_tokens(d.need, budget, context, target)
        if (seqs := tokens // context) >= 1:
            out.append(f"{seqs} sequence{'s' if seqs > 1 else ''} at context {context}")
    if concurrency:
        per_token = d.need.bytes_per_token + d.need.sliding_bytes_per_token
        block = kv.kv_block_tokens(target)
        fitting = budget // concurrency // per_token // block * block
        if fitting >= MIN_CONTEXT:
            plural = "s" if concurrency > 1 else ""
            out.append(f"context {fitting} at {concurrency} sequence{plural}")
    for name in kv.kv_dtypes:
        try:
            k, v = kv.kv_formats(name, d.spec, target)
        except PlanRefusal:
            continue
        need = kv.kv_need(d.spec, k, v, target)
        if need.bytes_per_token >= d.need.bytes_per_token or not (context and concurrency):
            continue
        if kv.kv_cache_bytes(need, context, concurrency, target) <= budget:
            out.append(f"kv_cache_dtype {name}")
    return out


def _finish(
    d: _Draft, free_at_start: int, deficit: int, others: list[str]
) -> tuple[EnginePlan, list[str]]:
    """The engine's plan; *deficit* (<= 0) is how far its device is over-committed."""
    problems = []
    kv_bytes, context, concurrency = _size_cache(d)
    needed = d.kv.kv_cache_bytes(d.need, context, concurrency, d.target) if concurrency else 0
    required = d.fixed + needed
    margin = d.share + deficit - required
    fits = margin >= 0 and concurrency >= 1 and context >= MIN_CONTEXT and kv_bytes > 0
    plan = EnginePlan(
        engine=d.name,
        kind=d.config.kind,
        model=d.spec,
        device=d.target.device,
        gpus=tuple(d.launch.gpus) if d.target.on_gpu else (),
        device_name=d.target.name,
        device_total_bytes=d.target.total_bytes,
        kv_format=d.k,
        kv_format_v=d.v,
        need=d.need,
        weights_bytes=d.weights,
        overhead_bytes=d.overhead,
        share_bytes=d.share,
        kv_cache_bytes=kv_bytes,
        context=context,
        concurrency=concurrency,
        kv_tokens=d.kv.kv_capacity_tokens(d.need, kv_bytes, context, d.target) if context else 0,
        required_bytes=required,
        free_at_start_bytes=free_at_start,
        fits=fits,
        margin_bytes=margin,
        requested_context=d.launch.context,
        requested_concurrency=d.launch.concurrency,
        warnings=list(d.warnings),
        args=d.target.args,
        cpus=d.cpus,
    )
    if not fits:  # no flags: they would ask the engine for memory the device does not have
        problems.append(_refusal(d, plan, deficit, others))
        return plan, problems
    plan.flags = d.kv.plan_flags(plan)
    plan.env = d.kv.plan_env(plan)
    return plan, problems


def _refusal(d: _Draft, plan: EnginePlan, deficit: int, others: list[str]) -> str:
    head = f"engine {d.name}: "
    parts = (
        f"weights {human(d.weights)}, overhead {human(d.overhead)}, "
        f"KV {human(plan.required_bytes - d.fixed)}"
    )
    available = d.share + deficit
    beside = f" beside {', '.join(others)}" if others else ""
    where = plan.device_name
    if plan.gpus:
        where = f"GPU {', '.join(map(str, plan.gpus))} ({where})"
    if available < d.fixed:
        return (
            head + f"weights and overhead alone need {human(d.fixed)} per GPU but "
            f"{human(max(0, available))} of {where} is left for it{beside}: short by "
            f"{human(d.fixed - available)}; use quantized weights, more GPUs (tensor "
            "parallel) or a larger GPU"
        )
    alternatives = _alternatives(d, available - d.fixed)
    tail = f"; would fit: {'; '.join(alternatives)}" if alternatives else ""
    if deficit < 0:
        return (
            head + f"needs {human(plan.required_bytes)} per GPU ({parts}); {where} "
            f"is over-committed by {human(-deficit)}{beside}" + tail
        )
    wanted = f"{plan.context} tokens x {plan.concurrency} sequences"
    if plan.concurrency < 1 or plan.context < MIN_CONTEXT:
        wanted = f"one sequence of context {plan.context}"
    return (
        head + f"{wanted} needs {human(plan.required_bytes)} per GPU ({parts}) but its share of "
        f"{where} is {human(d.share)}: short by {human(-plan.margin_bytes)}{tail}"
    )


def _place_on_cores(drafts: list[_Draft]) -> list[str]:
    """Cores for CPU engines: ``launch.cpus`` where set; engines that pin their threads to
    fixed cores by themselves (vLLM) get cores of their own once several share the host."""
    on_cpu = [d for d in drafts if not d.target.on_gpu]
    fixed = {d.name: d.launch.cpu_cores for d in on_cpu if d.launch.cpu_cores}
    pinning = [d.name for d in on_cpu if d.kv.pins_cpu_threads and d.name not in fixed]
    if len(pinning) + bool(fixed) < 2:
        pinning = []  # one engine alone: its own default binding
    cores, warnings = split_cores([*fixed, *pinning], fixed, usable_cores())
    for d in on_cpu:
        d.cpus = cores.get(d.name, ())
    return warnings


def build_plan(cfg: KibanConfig, gpus: list[GpuInfo]) -> Plan:
    """The plan for every engine of *cfg* that has a ``launch`` section."""
    host = host_info()
    by_index = {g.index: g for g in gpus}
    devices = _devices(cfg, gpus, host)
    problems: list[str] = []
    drafts: list[_Draft] = []
    for engine in cfg.engines:
        if engine.launch is None or ENGINE_KINDS[engine.kind].kv is None:
            continue  # not launched, or launched from a command kiban cannot size (kind openai)
        try:
            drafts.append(_draft(engine, by_index, host))
        except PlanRefusal as refusal:
            problems.append(f"engine {engine.name}: {refusal}")
    per_device: dict[str, dict[str, int]] = {}
    for key, device in devices.items():
        placed = [d for d in drafts if key in d.devices]
        per_device[key] = _share_out(device, placed) if placed else {}
    for d in drafts:
        d.share = min(per_device[key][d.name] for key in d.devices)
        for key in d.devices:
            devices[key].shares[d.name] = d.share
    engines: list[EnginePlan] = []
    warnings: list[str] = _place_on_cores(drafts)
    for position, d in enumerate(drafts):
        device = devices[d.devices[0]]
        earlier = sum(device.shares[o.name] for o in drafts[:position] if device.key in o.devices)
        free_at_start = device.total_bytes - device.used_bytes - earlier
        deficit = min(0, *(devices[key].free_bytes for key in d.devices))
        others = [o.name for o in drafts if o is not d and set(o.devices) & set(d.devices)]
        plan, engine_problems = _finish(d, free_at_start, deficit, others)
        engines.append(plan)
        problems += engine_problems
        warnings += [f"engine {d.name}: {w}" for w in plan.warnings]
    for device in devices.values():
        if device.shares and device.free_bytes < 0:
            problems.append(
                f"{device.key} ({device.name}): the engines' shares total "
                f"{human(sum(device.shares.values()))} but {human(device.usable_bytes)} is usable "
                f"(after {human(device.used_bytes)} in use and a {human(device.reserve_bytes)} "
                f"reserve): over by {human(-device.free_bytes)}"
            )
    used_devices = [dv for dv in devices.values() if dv.shares or dv.key != "host"]
    return Plan(used_devices, engines, problems, warnings)
