"""Weight sizes estimated from config.json shapes, for models that are not on disk.

Exact sizes come from the weight files (:mod:`kiban.planning.weights`); this
module counts the parameters of the standard decoder blocks instead: embeddings,
attention (GQA with optional q/k/v biases and q/k norms, or DeepSeek MLA), dense
or mixture-of-experts MLPs (DeepSeek V2/V3 and Qwen3-MoE layouts), norms and an
untied LM head. A vision tower is not described by config.json in a uniform
way, so catalogue entries give its parameter count (``vision_params``).

Quantized checkpoints: the decoder's linear layers are quantized and embeddings,
norms and the LM head stay in 16 bits (true of the AWQ/GPTQ/FP8 releases of the
catalogue's families). Group-quantized formats add a 16-bit scale and a zero
point per group of ``group_size`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiban.planning.hf_config import ModelConfigError, text_config

#: bits per weight of GGUF files by ``general.file_type`` name, averaged over a
#: 7B model's tensors as llama.cpp's ``llama-quantize --help`` table lists them
#: (approximate: the mix of tensor types differs by model; local files are exact).
GGUF_BITS_PER_WEIGHT = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 5.69,
    "q5_0": 5.5,
    "q4_k_m": 4.89,
    "q4_k_s": 4.58,
    "q4_0": 4.5,
    "q3_k_m": 3.91,
    "q2_k": 3.35,
}


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part: decoder linear layers (quantizable) and the rest."""

    linear: int
    embedding: int
    lm_head: int
    other: int

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.other


def _attention(cfg: dict[str, Any], hidden: int, heads: int) -> tuple[int, int]:
    """(linear, other) parameters of one attention block."""
    if cfg.get("kv_lora_rank"):
        rope = int(cfg.get("qk_rope_head_dim") or 64)
        nope = int(cfg.get("qk_nope_head_dim") or 128)
        v_dim = int(cfg.get("v_head_dim") or 128)
        kv_rank = int(cfg["kv_lora_rank"])
        q_rank = cfg.get("q_lora_rank")
        q_in = q_rank or hidden
        q = q_in * heads * (nope + rope) + (hidden * q_rank if q_rank else 0)
        linear = q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v_dim)
        linear += heads * v_dim * hidden
        return linear, kv_rank + (q_rank or 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    linear = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    other = 0
    if cfg.get("attention_bias") or cfg.get("model_type", "").startswith("qwen2"):
        other += q_out + 2 * kv_out
    if cfg.get("model_type", "").startswith(("qwen3", "gemma3")):
        other += 2 * head_dim  # q_norm, k_norm
    return linear, other


def _mlp_params(cfg: dict[str, Any], hidden: int, layer: int) -> int:
    """Linear parameters of layer *layer*'s MLP (dense or mixture of experts)."""
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or 0
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    if not experts or layer < first_dense:
        return 3 * hidden * int(cfg.get("intermediate_size") or 4 * hidden)
    moe_inter = int(_first(cfg, "moe_intermediate_size", "intermediate_size"))
    shared = int(cfg.get("n_shared_experts") or 0)
    return (experts + shared) * 3 * hidden * moe_inter + experts * hidden  # + router


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    """The first of *keys* set in *cfg*; ModelConfigError names them when none is."""
    for key in keys:
        if cfg.get(key):
            return cfg[key]
    raise ModelConfigError(f"config.json has no {' / '.join(keys)}")


def count_parameters(config: dict[str, Any]) -> ParamCount:
    """Parameters of the language model described by *config* (vision tower excluded)."""
    cfg = text_config(config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    vocab = int(cfg.get("vocab_size") or _first(config, "vocab_size"))
    norms_per_layer = 4 if cfg.get("model_type", "").startswith("gemma") else 2
    linear = other = 0
    for layer in range(layers):
        attn_linear, attn_other = _attention(cfg, hidden, heads)
        linear += attn_linear + _mlp_params(cfg, hidden, layer)
        other += attn_other + norms_per_layer * hidden
    tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return ParamCount(
        linear=linear,
        embedding=vocab * hidden,
        lm_head=0 if tied else vocab * hidden,
        other=other + hidden,
    )


def quantized_bytes_per_weight(quantization: str | None, dtype_bytes: int) -> float:
    """Average bytes of one decoder linear weight under *quantization*."""
    if not quantization:
        return float(dtype_bytes)
    q = quantization.lower()
    if q.startswith("gguf:"):
        return GGUF_BITS_PER_WEIGHT[q.removeprefix("gguf:")] / 8
    if q.startswith("fp8") or "fp8" in q:
        return 1.0
    bits = 8 if "8bit" in q or "int8" in q else 4
    group = 128
    return bits / 8 + (2 + bits / 8) / group  # data + fp16 scale + packed zero per group


def estimate_weight_bytes(
    config: dict[str, Any], quantization: str | None, dtype_bytes: int, vision_params: int = 0
) -> tuple[int, int, int]:
    """(total, vision, embedding) bytes of the checkpoint estimated from its shapes."""
    params = count_parameters(config)
    per_linear = quantized_bytes_per_weight(quantization, dtype_bytes)
    gguf = quantization is not None and quantization.startswith("gguf:")
    rest_bytes = per_linear if gguf else dtype_bytes  # GGUF quantizes embeddings too
    embedding = int(params.embedding * rest_bytes)
    total = int(params.linear * per_linear) + embedding
    total += int(params.lm_head * rest_bytes) + params.other * dtype_bytes
    vision = vision_params * dtype_bytes
    return total + vision, vision, embedding
