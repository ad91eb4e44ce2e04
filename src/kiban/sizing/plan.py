"""The plan: per GPU and per managed engine, who gets what memory and what that buys.

The planner (``kiban.planning.plan.plan_config``) fills these in. Each
:class:`EnginePlan` carries the arithmetic (weights, KV bytes per token in the
engine's own layout, overhead, memory share, context x concurrency, fit and
margin) and, through its engine kind, the flags and environment that make the
engine allocate exactly that (``plan.flags`` / ``plan.env``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiban.sizing.kv import KvFormat, KvNeed
from kiban.sizing.specs import ModelSpec


@dataclass
class EnginePlan:
    """One managed engine's plan. Byte figures are per GPU (or of host memory on CPU)."""

    engine: str
    kind: str
    model: ModelSpec
    device: str
    gpus: tuple[int, ...]
    device_name: str
    device_total_bytes: int
    kv_format: KvFormat
    kv_format_v: KvFormat
    need: KvNeed
    weights_bytes: int
    overhead_bytes: int
    share_bytes: int
    kv_cache_bytes: int
    context: int
    concurrency: int
    kv_tokens: int
    required_bytes: int
    free_at_start_bytes: int
    fits: bool
    margin_bytes: int
    requested_context: int | None = None
    requested_concurrency: int | None = None
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: the user's launch.args, for engines whose flags depend on them (lmdeploy --backend)
    args: tuple[str, ...] = ()
    #: CPU engines: the cores its compute threads are bound to (empty: the engine decides)
    cpus: tuple[int, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def tp(self) -> int:
        """Tensor-parallel size: the number of GPUs the engine spans."""
        return max(1, len(self.gpus)) if self.on_gpu else 1

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token of context on one GPU (sliding layers counted in full)."""
        return self.need.bytes_per_token + self.need.sliding_bytes_per_token

    @property
    def fixed_bytes(self) -> int:
        """What the engine takes before its KV cache: weights and overhead."""
        return self.weights_bytes + self.overhead_bytes


@dataclass
class DevicePlan:
    """One GPU (or the host's memory for CPU engines) and the shares placed on it."""

    key: str
    name: str
    total_bytes: int
    used_bytes: int
    reserve_bytes: int
    source: str
    shares: dict[str, int] = field(default_factory=dict)

    @property
    def usable_bytes(self) -> int:
        """What the plan may share out: total less memory in use and the reserve."""
        return self.total_bytes - self.used_bytes - self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        """Usable memory left after every share (negative when over-committed)."""
        return self.usable_bytes - sum(self.shares.values())


@dataclass
class Plan:
    """Everything `kiban plan` reports; ``problems`` are refusals, ``warnings`` known traps."""

    devices: list[DevicePlan]
    engines: list[EnginePlan]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def engine(self, name: str) -> EnginePlan | None:
        return next((e for e in self.engines if e.engine == name), None)
