"""Deterministic tiny Qwen2 models for development and tests.

Nothing is downloaded and neither torch nor transformers is needed: weights come
from numpy's seeded generator, the tokenizer is a byte-level BPE trained with
`tokenizers` on text that ships with the OS and with Python itself.

`build_tiny_model` writes a Hugging Face directory (vLLM, lmdeploy, SGLang load it);
`build_tiny_gguf` writes the same architecture as one GGUF file (llama.cpp).
Both read their shapes from one `TinySpec`.

The weights are random, so the text is meaningless; routing, streaming, metrics,
KV-cache sizing and guided decoding do not depend on meaning.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiban.models.tensor_names import gguf_name

if TYPE_CHECKING:
    from gguf import GGUFWriter
    from tokenizers import Tokenizer

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text that exists on every Debian machine with Python 3.11: licence texts and
# a fixed list of pure-Python stdlib modules. Missing files are skipped.
_LICENSE_DIR = Path("/usr/share/common-licenses")
_STDLIB_FILES = (
    "argparse.py",
    "functools.py",
    "json/decoder.py",
    "json/encoder.py",
    "string.py",
    "textwrap.py",
    "typing.py",
)
_CORPUS_LIMIT = 1_500_000  # characters; keeps training under a few seconds


@dataclass(frozen=True)
class TinySpec:
    """Shapes of the tiny Qwen2 model shared by the HF and GGUF builders."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        """Per-head width; vLLM's CPU attention needs at least 32 (64 is safe)."""
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections (grouped-query attention)."""
        return self.head_dim * self.num_kv_heads

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor names mapped to their (out, in) shapes, in a fixed order."""
        h, kv, ff, v = self.hidden_size, self.kv_dim, self.intermediate_size, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (ff, h),
                p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff),
            }
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
        return shapes


def random_weights(spec: TinySpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights: normal(0, std) matrices and biases, ones for norms.

    float32 arrays whose values are exactly representable in bfloat16, so the HF
    file (bf16, what vLLM CPU runs) and the GGUF file (f32) hold the same numbers.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in spec.hf_shapes().items():
        if "norm" in name:
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            values = (rng.standard_normal(shape) * spec.init_std).astype(np.float32)
            weights[name] = bf16_to_f32(f32_to_bf16(values))
    return weights


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def save_bf16_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write float32 arrays as a BF16 safetensors file (numpy has no bfloat16 dtype)."""
    header: dict[str, dict[str, Any]] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        blob = f32_to_bf16(tensors[name]).astype("<u2").tobytes()
        span = [offset, offset + len(blob)]
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": span}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with Path(path).open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.writelines(blobs)


def load_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a BF16 safetensors file back as float32 arrays (for tests and checks)."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    body = data[8 + size :]
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        bits = np.frombuffer(body[begin:end], dtype="<u2").reshape(info["shape"])
        out[name] = bf16_to_f32(bits)
    return out


# ---------------------------------------------------------------- tokenizer


def corpus_files() -> list[Path]:
    """The training texts, sorted so that every run reads them in one order."""
    files = sorted(p for p in _LICENSE_DIR.glob("*") if p.is_file())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += [stdlib / rel for rel in _STDLIB_FILES if (stdlib / rel).is_file()]
    return files


def _corpus_lines() -> Iterator[str]:
    budget = _CORPUS_LIMIT
    for path in corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")[:budget]
        budget -= len(text)
        yield from text.splitlines(keepends=True)
        if budget <= 0:
            return


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def _tokenizer_config(spec: TinySpec, tok: Tokenizer) -> dict[str, Any]:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------- HF directory


def _hf_config(spec: TinySpec, tok: Tokenizer) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_layers,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "sliding_window": None,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": spec.init_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": tok.token_to_id(PAD_TOKEN),
        "eos_token_id": tok.token_to_id(IM_END),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_model(dest: Path, *, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write a HF-format Qwen2ForCausalLM directory at `dest`; same seed, same bytes."""
    spec = spec or TinySpec()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", _tokenizer_config(spec, tok))
    _write_json(dest / "config.json", _hf_config(spec, tok))
    pad, eos = tok.token_to_id(PAD_TOKEN), tok.token_to_id(IM_END)
    generation = {"bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}
    _write_json(dest / "generation_config.json", generation)
    save_bf16_safetensors(random_weights(spec, seed), dest / "model.safetensors")
    return dest


# ---------------------------------------------------------------- GGUF file


def _vocab_lists(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types, and the BPE merges."""
    from gguf import TokenType

    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    types = [int(TokenType.CONTROL if t in SPECIAL_TOKENS else TokenType.NORMAL) for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def _add_gguf_metadata(writer: GGUFWriter, spec: TinySpec, tok: Tokenizer) -> None:
    writer.add_name("kiban-tiny-qwen2")
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_file_type(0)  # all F32 (values are bf16-exact, see random_weights)
    tokens, types, merges = _vocab_lists(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # HF ByteLevel(use_regex=True) is the GPT-2 split
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(PAD_TOKEN))
    writer.add_eos_token_id(tokens.index(IM_END))
    writer.add_pad_token_id(tokens.index(PAD_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def build_tiny_gguf(dest_file: Path, *, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write the tiny Qwen2 as one F32 GGUF file (arch "qwen2") for llama.cpp."""
    import gguf

    spec = spec or TinySpec()
    dest_file = Path(dest_file)
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    writer = gguf.GGUFWriter(str(dest_file), "qwen2")
    _add_gguf_metadata(writer, spec, tok)
    for name, array in random_weights(spec, seed).items():
        writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest_file
