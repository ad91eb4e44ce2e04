"""KV-cache arithmetic shared by every engine: storage formats and bytes per token.

The base formula is ``2 x layers x kv_heads x head_dim x bytes_per_value``; what
differs between engines is how a quantized value is stored (an engine module
builds :class:`KvFormat` objects for its own dtypes) and how the cache is cut
into blocks (the engine's ``kv_cache_bytes`` / ``kv_capacity``).

Formats:
* plain types (bf16, fp16, fp32, vLLM's per-tensor fp8): ``bits/8`` bytes a value;
* ggml block types (llama.cpp q8_0, q4_0, ...): ``block_bytes`` per
  ``block_values`` values (q8_0: 34 B per 32; q4_0: 18 B per 32);
* per-(token, head) parameters (lmdeploy int8/int4: an fp16 scale and zero
  point for K and for V): ``head_token_bytes`` added for each head of K and of V.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiban.sizing.specs import ModelSpec


@dataclass(frozen=True)
class KvFormat:
    """How one engine stores one cached value type (K or V)."""

    name: str
    label: str
    bits: float
    block_values: int = 1
    block_bytes: int = 0
    head_token_bytes: int = 0
    quantized: bool = False

    def row_bytes(self, values: int, heads: int = 1) -> int:
        """Bytes of *values* cached values of one token (over *heads* heads)."""
        if self.block_values > 1:
            if values % self.block_values:
                raise ValueError(
                    f"{self.name} stores blocks of {self.block_values} values; "
                    f"a row of {values} does not divide"
                )
            data = values // self.block_values * self.block_bytes
        else:
            data = int(values * self.bits) // 8
        return data + heads * self.head_token_bytes


def plain(name: str, bits: int, label: str | None = None, quantized: bool = False) -> KvFormat:
    """A format storing each value in *bits* bits with no scales (or scalar scales)."""
    return KvFormat(name, label or f"{name} ({bits}-bit)", bits, quantized=quantized)


def dtype_format(spec: ModelSpec, name: str = "auto") -> KvFormat:
    """The model's own dtype, what every engine's ``auto`` means."""
    bits = spec.dtype_bytes * 8
    return plain(name, bits, f"{spec.dtype} (model dtype)")


@dataclass(frozen=True)
class KvNeed:
    """KV bytes on one GPU: per token of full-attention layers, per sequence of sliding ones.

    ``sliding_bytes_per_token`` times the window is what each sequence keeps for
    sliding-window layers at most.
    """

    bytes_per_token: int
    sliding_bytes_per_token: int = 0
    window: int = 0

    def sequence_bytes(self, context: int) -> int:
        """Bytes one sequence of *context* tokens needs, without block rounding."""
        sliding = self.sliding_bytes_per_token * min(context, self.window)
        return self.bytes_per_token * context + sliding


def layer_bytes_per_token(spec: ModelSpec, k: KvFormat, v: KvFormat, tp: int = 1) -> int:
    """Bytes one layer caches per token on one of *tp* GPUs (K and V, with their scales)."""
    k_values, v_values = spec.kv_elements_per_token(tp=tp)
    heads = 1 if spec.mla else max(1, -(-spec.num_kv_heads // tp))
    total = k.row_bytes(k_values, heads)
    if v_values:
        total += v.row_bytes(v_values, heads)
    return total


def kv_need(spec: ModelSpec, k: KvFormat, v: KvFormat, tp: int = 1) -> KvNeed:
    """Per-token bytes of the full layers, and of the sliding ones over their window."""
    per_layer = layer_bytes_per_token(spec, k, v, tp)
    return KvNeed(
        bytes_per_token=per_layer * spec.full_layers,
        sliding_bytes_per_token=per_layer * spec.sliding_layers,
        window=spec.sliding_window or 0,
    )


def blocks(tokens: int, block: int) -> int:
    """Blocks of *block* tokens that hold *tokens* tokens."""
    return -(-tokens // block)
