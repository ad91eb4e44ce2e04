"""Tensor names of Llama-family models: Hugging Face (transformers, vLLM) <-> GGUF (llama.cpp).

One table serves both directions: `kiban.models.tiny` writes GGUF from HF names,
`kiban.models.gguf_to_hf` reads a GGUF file back into HF names. The names are
llama.cpp's (``gguf.constants.TENSOR_NAMES``) for the Llama and Qwen2 layouts.
"""

from __future__ import annotations

import re

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = {gguf: hf for hf, gguf in _LAYER_NAMES.items()}
_HF_TOP = {gguf: hf for hf, gguf in _TOP_NAMES.items()}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str:
    """Translate an HF tensor name into llama.cpp's GGUF name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def hf_name(gguf_tensor: str) -> str:
    """Translate a GGUF tensor name into the HF name; KeyError names an unknown one."""
    if gguf_tensor in _HF_TOP:
        return _HF_TOP[gguf_tensor]
    match = _GGUF_BLOCK.fullmatch(gguf_tensor)
    if match is None or match.group(2) not in _HF_LAYER:
        raise KeyError(f"no Hugging Face name known for GGUF tensor {gguf_tensor!r}")
    return f"model.layers.{match.group(1)}.{_HF_LAYER[match.group(2)]}"
