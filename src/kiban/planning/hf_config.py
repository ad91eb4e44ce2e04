"""Read a Hugging Face ``config.json`` (a local model's or a catalogue excerpt) into shapes.

Handles the layouts seen in practice: plain decoder configs; VLMs that nest the
language model under ``text_config`` (Qwen2.5-VL new format, Gemma 3, Llava) or
``llm_config`` (InternVL) or ``language_config`` (DeepSeek-VL); VLMs whose top
level *is* the language model (MiniCPM-V, Qwen2.5-VL old format); sliding-window
layer patterns (Mistral, Qwen2 ``use_sliding_window``, Gemma 2 and 3,
``layer_types``); DeepSeek's MLA (``kv_lora_rank``); ``quantization_config``.
"""

from __future__ import annotations

from typing import Any

from kiban.errors import KibanError
from kiban.sizing.specs import MlaShape

_TEXT_KEYS = ("text_config", "llm_config", "language_config")
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


class ModelConfigError(KibanError, ValueError):
    """config.json lacks what the planner needs; the message names the missing key."""


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of *config* (the config itself for plain LLMs)."""
    for key in _TEXT_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict) and ("num_hidden_layers" in sub or "hidden_size" in sub):
            return sub
    return config


def is_vision_model(config: dict[str, Any]) -> bool:
    """Whether the checkpoint carries a vision tower."""
    return any(k in config for k in ("vision_config", "vision_tower", "visual"))


def _required(cfg: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int):
            return value
    raise ModelConfigError(f"config.json has no {' / '.join(keys)}")


def _sliding_layers(cfg: dict[str, Any], layers: int, window: int | None) -> int:
    """How many layers attend only to the last ``window`` tokens."""
    if not window:
        return 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return sum(1 for t in types if t == "sliding_attention")
    model_type = cfg.get("model_type", "")
    if model_type.startswith("gemma3"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        return layers - layers // pattern
    if model_type == "gemma2":
        return (layers + 1) // 2  # even layers slide (HF Gemma2DecoderLayer)
    if "use_sliding_window" in cfg:
        if not cfg.get("use_sliding_window"):
            return 0
        return max(0, layers - int(cfg.get("max_window_layers") or 0))
    return layers  # Mistral v0.1 style: every layer slides


def _dtype(cfg: dict[str, Any], outer: dict[str, Any]) -> str:
    for source in (cfg, outer):
        value = source.get("torch_dtype") or source.get("dtype")
        if isinstance(value, str):
            return value.removeprefix("torch.")
    return "bfloat16"


def quantization_of(config: dict[str, Any]) -> str | None:
    """``awq-4bit``, ``gptq-8bit``, ``fp8``, ... from ``quantization_config`` (None if absent)."""
    q = config.get("quantization_config") or text_config(config).get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or q.get("format") or "quantized").lower()
    bits = q.get("bits") or q.get("w_bit")
    return f"{method}-{bits}bit" if bits else method


def shape_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~kiban.sizing.specs.ModelSpec` fields that come from config.json."""
    cfg = text_config(config)
    layers = _required(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _required(cfg, "num_attention_heads", "n_head")
    hidden = _required(cfg, "hidden_size", "n_embd", "d_model")
    kv_heads = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    v_head_dim = cfg.get("v_head_dim") or head_dim
    mla = None
    if cfg.get("kv_lora_rank"):
        mla = MlaShape(int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim") or 64))
        head_dim = int(cfg.get("qk_nope_head_dim") or 128) + mla.qk_rope_head_dim
        kv_heads = heads
    contexts = [cfg[k] for k in _CONTEXT_KEYS if isinstance(cfg.get(k), int)]
    if not contexts:
        raise ModelConfigError("config.json has no max_position_embeddings")
    window = cfg.get("sliding_window") if isinstance(cfg.get("sliding_window"), int) else None
    sliding = _sliding_layers(cfg, layers, window)
    if window is not None and window >= min(contexts):
        window, sliding = None, 0
    architectures = config.get("architectures") or cfg.get("architectures") or ["unknown"]
    version = config.get("version")
    return {
        "architecture": architectures[0],
        "model_type": str(config.get("model_type") or cfg.get("model_type") or "unknown"),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "v_head_dim": int(v_head_dim),
        "hidden_size": hidden,
        "intermediate_size": int(cfg.get("intermediate_size") or 4 * hidden),
        "vocab_size": int(cfg.get("vocab_size") or config.get("vocab_size") or 32000),
        "max_context": contexts[0],
        "dtype": _dtype(cfg, config),
        "sliding_window": window if sliding else None,
        "sliding_layers": sliding,
        "mla": mla,
        "quantization": quantization_of(config),
        "version": None if version is None else str(version),
    }
