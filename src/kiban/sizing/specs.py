"""What the planner knows about a model: its attention shape and its weight bytes.

A :class:`ModelSpec` comes from config.json (a local model or the built-in
catalogue, which stores config.json excerpts) plus the weight sizes, which are
exact when read from safetensors headers or GGUF tensor infos
(:mod:`kiban.planning.weights`) and estimated from the shapes otherwise
(:mod:`kiban.planning.params`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4}


@dataclass(frozen=True)
class MlaShape:
    """DeepSeek multi-head latent attention: the cache holds one latent vector per token."""

    kv_lora_rank: int
    qk_rope_head_dim: int

    @property
    def latent_dim(self) -> int:
        """Elements cached per token per layer (compressed KV plus the RoPE key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and sizes of one model, as the planner needs them.

    ``weights_bytes`` counts every tensor the engine loads (language model and
    vision tower); ``vision_bytes`` is the vision part of it and
    ``embedding_bytes`` the input embedding table (llama.cpp keeps it on the CPU).
    ``weights_exact`` tells whether the sizes were read from the weight files.
    """

    name: str
    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    dtype: str = "bfloat16"
    sliding_window: int | None = None
    sliding_layers: int = 0
    mla: MlaShape | None = None
    weights_bytes: int = 0
    vision_bytes: int = 0
    embedding_bytes: int = 0
    weights_exact: bool = False
    quantization: str | None = None
    version: str | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one element in the model's own dtype (what ``auto`` KV uses)."""
        return _DTYPE_BYTES.get(self.dtype, 2)

    @property
    def family(self) -> str:
        """The model family for known traps: ``qwen2`` covers Qwen2, Qwen2.5 and their VLMs."""
        t = self.model_type
        if t in {"qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_moe"}:
            return "qwen2"
        if t in {"minicpmv"}:
            return "minicpmv"
        return t

    @property
    def full_layers(self) -> int:
        """Layers that attend over the whole context."""
        return self.num_layers - self.sliding_layers

    def kv_elements_per_token(self, *, tp: int = 1) -> tuple[int, int]:
        """(K, V) elements cached per token and per layer on one of *tp* GPUs.

        KV heads are split across tensor-parallel ranks and replicated when
        there are fewer heads than ranks (vLLM, SGLang and lmdeploy all do so).
        MLA models cache one latent vector and no separate V.
        """
        if self.mla is not None:
            return self.mla.latent_dim, 0
        heads = max(1, -(-self.num_kv_heads // tp))
        return heads * self.head_dim, heads * self.v_head_dim
