"""The tiny model builders: determinism, shapes, tokenizer, GGUF read-back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from kiban.models.tiny import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    TinySpec,
    build_tiny_gguf,
    build_tiny_model,
    load_bf16_safetensors,
    random_weights,
)

SPEC = TinySpec()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


def test_files_present(built: Path) -> None:
    names = {p.name for p in built.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_same_seed_same_bytes(built: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(built)


def test_other_seed_other_weights_same_tokenizer(built: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b = _digests(built), _digests(other)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_config_matches_spec(built: Path) -> None:
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"] == 64
    assert cfg["vocab_size"] == SPEC.vocab_size


def test_safetensors_readable_by_safetensors(built: Path) -> None:
    with safe_open(str(built / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        names = list(f.keys())  # safe_open is not iterable
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    assert shapes == SPEC.hf_shapes()


def test_tensor_names_and_shapes(built: Path) -> None:
    tensors = load_bf16_safetensors(built / "model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == SPEC.hf_shapes()
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert np.all(tensors["model.norm.weight"] == 1.0)
    assert 0.015 < float(tensors["model.embed_tokens.weight"].std()) < 0.025
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)
    assert tensors["model.layers.1.self_attn.q_proj.bias"].shape == (256,)
    assert tensors["lm_head.weight"].shape == (SPEC.vocab_size, 256)


def test_tokenizer_round_trip(built: Path) -> None:
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    assert tok.get_vocab_size() == SPEC.vocab_size
    text = "Hello, wörld! def f(x):\n    return x + 1  # ünïcode ✓ 日本"
    ids = tok.encode(text).ids
    assert max(ids) < SPEC.vocab_size
    assert tok.decode(ids) == text


def test_special_tokens_and_eos(built: Path) -> None:
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    tcfg = json.loads((built / "tokenizer_config.json").read_text())
    gen = json.loads((built / "generation_config.json").read_text())
    eos_id = tok.token_to_id(IM_END)
    assert tcfg["eos_token"] == IM_END and gen["eos_token_id"] == eos_id
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}").ids
    assert ids[0] == tok.token_to_id(IM_START) and ids[-1] == eos_id


def test_chat_template_renders(built: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    tcfg = json.loads((built / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# llama.cpp's qwen2 loader (src/llama-model.cpp, LLM_ARCH_QWEN2), shapes in ggml order
# (ne[0] = input width): token_embd {n_embd, n_vocab}, attn_q {n_embd, n_embd},
# attn_k/v {n_embd, n_embd_gqa}, biases, attn_output, ffn_gate/up {n_embd, n_ff},
# ffn_down {n_ff, n_embd}; output optional (falls back to token_embd).
def _llama_cpp_expected(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    h, kv, ff, v = spec.hidden_size, spec.kv_dim, spec.intermediate_size, spec.vocab_size
    shapes = {"token_embd.weight": (h, v), "output_norm.weight": (h,), "output.weight": (h, v)}
    for i in range(spec.num_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (h,),
            f"blk.{i}.attn_q.weight": (h, h),
            f"blk.{i}.attn_k.weight": (h, kv),
            f"blk.{i}.attn_v.weight": (h, kv),
            f"blk.{i}.attn_q.bias": (h,),
            f"blk.{i}.attn_k.bias": (kv,),
            f"blk.{i}.attn_v.bias": (kv,),
            f"blk.{i}.attn_output.weight": (h, h),
            f"blk.{i}.ffn_norm.weight": (h,),
            f"blk.{i}.ffn_gate.weight": (h, ff),
            f"blk.{i}.ffn_up.weight": (h, ff),
            f"blk.{i}.ffn_down.weight": (ff, h),
        }
    return shapes


def _field(reader, key: str):
    return reader.get_field(key).contents()


def test_gguf_tensors_match_llama_cpp_loader(gguf_file: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(gguf_file)
    got = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert got == _llama_cpp_expected(SPEC)
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)


def test_gguf_metadata(gguf_file: Path, built: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.block_count") == SPEC.num_layers
    assert _field(reader, "qwen2.embedding_length") == SPEC.hidden_size
    assert _field(reader, "qwen2.attention.head_count") == SPEC.num_heads
    assert _field(reader, "qwen2.attention.head_count_kv") == SPEC.num_kv_heads
    assert _field(reader, "qwen2.context_length") == SPEC.max_position_embeddings
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok = Tokenizer.from_file(str(built / "tokenizer.json"))
    assert len(tokens) == SPEC.vocab_size
    assert tokens.index(IM_END) == tok.token_to_id(IM_END)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.token_to_id(IM_END)
    hf_merges = json.loads((built / "tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(hf_merges)


def test_gguf_holds_the_same_weights(gguf_file: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    by_name = {t.name: np.asarray(t.data) for t in reader.tensors}
    weights = random_weights(SPEC, seed=0)
    q = by_name["blk.1.attn_q.weight"]
    assert np.array_equal(
        q.reshape(weights["model.layers.1.self_attn.q_proj.weight"].shape),
        weights["model.layers.1.self_attn.q_proj.weight"],
    )


def test_gguf_same_seed_same_bytes(gguf_file: Path, tmp_path: Path) -> None:
    again = build_tiny_gguf(tmp_path / "again.gguf", seed=0)
    assert again.read_bytes() == gguf_file.read_bytes()
