"""How an engine lays out its KV cache and memory: the facts ``kiban plan`` sizes it by.

Defaults describe a simple engine (any byte count, one-token blocks, no
overhead); engine modules override them with their own facts, each citing the
engine's code. An engine kind kiban cannot plan has no :class:`KvLayout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kiban.sizing.kv import KvFormat, KvNeed, blocks, kv_need
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanTarget

if TYPE_CHECKING:
    from kiban.sizing.plan import EnginePlan


class KvLayout:
    """KV formats, bytes per token, cache and overhead sizes, and the flags a plan becomes."""

    #: KV dtype names the engine's flag takes, as shown in refusals and `kiban plan model`
    kv_dtypes: ClassVar[tuple[str, ...]] = ()
    #: the dtypes `kiban plan model` shows a capacity column for
    capacity_dtypes: ClassVar[tuple[str, ...]] = ()
    #: True when the engine allocates its cache from a token count (llama.cpp -c), not a
    #: byte budget: the plan then records exactly what that count takes
    kv_sized_by_tokens: ClassVar[bool] = False
    #: True when the engine, on the CPU, binds its compute threads to fixed cores by itself
    #: (the same cores for every server): kiban then gives each such engine cores of its own
    pins_cpu_threads: ClassVar[bool] = False

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        """(K, V) storage for *kv_dtype* (kiban's generic name or the engine's own).

        Raises :class:`~kiban.sizing.target.PlanRefusal` naming the reason when
        the engine cannot use that dtype for this model or device.
        """
        raise NotImplementedError

    def kv_need(self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget) -> KvNeed:
        """KV bytes per token on one GPU as this engine lays the cache out."""
        return kv_need(spec, k, v, target.tp)

    def weights_on_device(self, spec: ModelSpec, target: PlanTarget) -> int:
        """Weight bytes on each of the engine's GPUs (all of them in host memory on CPU)."""
        return -(-spec.weights_bytes // target.tp)

    def kv_allocation_unit(self, target: PlanTarget) -> int:
        """Granularity in bytes of the KV size the engine can be told (1: any byte count)."""
        return 1

    def kv_block_tokens(self, target: PlanTarget) -> int:
        """Tokens per cache block (the unit the engine allocates sequences in)."""
        return 1

    def kv_cache_bytes(
        self, need: KvNeed, context: int, concurrency: int, target: PlanTarget
    ) -> int:
        """Cache bytes (one GPU) the engine needs to hold *concurrency* sequences of *context*."""
        block = self.kv_block_tokens(target)
        per_sequence = blocks(context, block) * block * need.bytes_per_token
        sliding = blocks(min(context, need.window), block) * block * need.sliding_bytes_per_token
        return concurrency * (per_sequence + sliding)

    def kv_capacity_tokens(
        self, need: KvNeed, kv_bytes: int, context: int, target: PlanTarget
    ) -> int:
        """Tokens a cache of *kv_bytes* holds, counted the way the engine reports it."""
        block = self.kv_block_tokens(target)
        return kv_bytes // (block * need.bytes_per_token) * block

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        """Memory (one GPU) beyond weights and KV cache: CUDA context, activations, graphs."""
        return 0

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        """Known traps of this engine with this model, KV dtype and device."""
        return []

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        """Command-line flags that make the engine allocate what *plan* says."""
        return []

    def plan_env(self, plan: EnginePlan) -> dict[str, str]:
        """Environment variables the plan needs (e.g. vLLM CPU's KV cache size)."""
        return {}
