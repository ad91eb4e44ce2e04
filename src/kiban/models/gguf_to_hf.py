"""A Hugging Face folder (what vLLM and transformers load) from a Llama GGUF file.

Only the `gguf`, `tokenizers` and `safetensors` packages are used, no torch:

- tensors are dequantized with ``gguf.quants.dequantize`` (Q4_1, Q8_0, F16, ...);
  the Q and K projections get llama.cpp's RoPE row permutation undone
  (`unpermute_rope_rows`), so the HF attention sees the rows in its own order;
- ``config.json`` (``LlamaForCausalLM``) comes from the ``llama.*`` metadata;
  without an ``output.weight`` tensor the embeddings are tied, as llama.cpp does;
- ``tokenizer.json`` is rebuilt from the GGUF vocabulary and merges, with the
  pre-tokenizer llama.cpp uses for the file's ``tokenizer.ggml.pre``; control
  tokens become special added tokens;
- ``tokenizer_config.json`` carries the GGUF chat template and special tokens.

Weights are written as float32 (the dequantized values exactly) or bfloat16.
Only what a plain Llama GGUF holds is supported; anything else (another
architecture, RoPE scaling, an unknown pre-tokenizer) is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kiban.errors import KibanError
from kiban.models.tensor_names import hf_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer

Dtype = Literal["float32", "bfloat16"]
DTYPES: tuple[Dtype, ...] = ("float32", "bfloat16")

_MISSING = object()


def _digits_then_bytelevel() -> PreTokenizer:
    """llama.cpp's "smollm" split: every digit alone, then the GPT-2 regex."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _bytelevel() -> PreTokenizer:
    """The GPT-2 regex split with byte-level symbols."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


#: ``tokenizer.ggml.pre`` -> the HF pre-tokenizer that splits text as llama.cpp does
#: (llama.cpp ``src/llama-vocab.cpp``: SMOLLM is ``\p{N}`` then the GPT-2 regex)
PRE_TOKENIZERS: dict[str, Callable[[], PreTokenizer]] = {
    "smollm": _digits_then_bytelevel,
    "gpt-2": _bytelevel,
}


class GgufConversionError(KibanError, ValueError):
    """The GGUF file holds something this converter does not translate; says what."""


@dataclass(frozen=True)
class GgufModel:
    """An opened GGUF file: its metadata by key and its tensors by name."""

    path: Path
    reader: Any  # gguf.GGUFReader

    @classmethod
    def open(cls, path: Path) -> GgufModel:
        """Memory-map *path* with ``gguf.GGUFReader``."""
        import gguf

        return cls(Path(path), gguf.GGUFReader(str(path)))

    def meta(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value (str, number, list); GgufConversionError if missing."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GgufConversionError(f"{self.path.name}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def arch(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value under the architecture's prefix, e.g. ``llama.block_count``."""
        return self.meta(f"{self.meta('general.architecture')}.{key}", default)


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``LlamaModel.permute`` in convert_hf_to_gguf).

    HF Llama rotates dimension ``i`` of a head together with ``i + head_dim/2``;
    llama.cpp rotates adjacent pairs ``(2i, 2i+1)``, so the converter interleaves
    the two halves of each head's rows. This puts them back.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_config(model: GgufModel, dtype: Dtype) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` from the GGUF metadata."""
    if (arch := model.meta("general.architecture")) != "llama":
        raise GgufConversionError(f"{model.path.name}: architecture {arch!r}; only 'llama'")
    if (scaling := model.arch("rope.scaling.type", None)) not in (None, "none"):
        raise GgufConversionError(f"{model.path.name}: RoPE scaling {scaling!r} not supported")
    hidden = int(model.arch("embedding_length"))
    heads = int(model.arch("attention.head_count"))
    head_dim = int(model.arch("rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise GgufConversionError(f"{model.path.name}: head_dim {head_dim} x {heads} != {hidden}")
    tensors = {t.name for t in model.reader.tensors}
    vocab = len(model.meta("tokenizer.ggml.tokens"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model.arch("vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(model.arch("feed_forward_length")),
        "num_hidden_layers": int(model.arch("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.arch("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(model.arch("context_length")),
        "rms_norm_eps": _f32(model.arch("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(model.arch("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
        "bos_token_id": int(model.meta("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(model.meta("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(model.meta("tokenizer.ggml.padding_token_id", None)),
        "use_cache": True,
    }


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def hf_tensors(model: GgufModel, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its HF name, Q/K rows in HF order."""
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for tensor in model.reader.tensors:
        name = hf_name(tensor.name)
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rope_rows(values, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rope_rows(values, kv_heads)
        out[name] = np.ascontiguousarray(values)
    return out


def build_tokenizer(model: GgufModel) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's for this GGUF (byte-level BPE)."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if (kind := model.meta("tokenizer.ggml.model")) != "gpt2":
        raise GgufConversionError(f"{model.path.name}: tokenizer {kind!r}; only byte-level BPE")
    pre = model.meta("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise GgufConversionError(f"{model.path.name}: pre-tokenizer {pre!r}; known: {known}")
    tokens: list[str] = model.meta("tokenizer.ggml.tokens")
    types: list[int] = model.meta("tokenizer.ggml.token_type")
    vocab = {text: idx for idx, text in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GgufConversionError(f"{model.path.name}: the vocabulary repeats tokens")
    merges = [tuple(m.split(" ", 1)) for m in model.meta("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == int(TokenType.CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def tokenizer_config(model: GgufModel, tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS behaviour and the chat template."""
    tokens: list[str] = model.meta("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = model.meta(f"tokenizer.ggml.{key}", None)
        return None if idx is None else tokens[int(idx)]

    added = {
        str(idx): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for idx, t in sorted(tok.get_added_tokens_decoder().items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [v["content"] for v in added.values()],
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(model.meta("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(model.meta("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model.arch("context_length")),
        "chat_template": model.meta("tokenizer.chat_template"),
    }


def write_hf_model(gguf_path: Path, dest: Path, *, dtype: Dtype = "bfloat16") -> Path:
    """Write config, tokenizer, chat template and safetensors for *gguf_path* into *dest*."""
    if dtype not in DTYPES:
        raise GgufConversionError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    model = GgufModel.open(gguf_path)
    config = llama_config(model, dtype)
    tok = build_tokenizer(model)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", tokenizer_config(model, tok))
    _write_json(dest / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(dest / "generation_config.json", generation)
    tensors = hf_tensors(model, config)
    if dtype == "bfloat16":
        from kiban.models.tiny import save_bf16_safetensors

        save_bf16_safetensors(tensors, dest / "model.safetensors")
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
