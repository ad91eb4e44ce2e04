"""GGUF -> Hugging Face conversion on a small Llama GGUF written here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from kiban.models.gguf_to_hf import (
    GgufConversionError,
    unpermute_rope_rows,
    write_hf_model,
)
from kiban.models.tensor_names import gguf_name
from kiban.models.tiny import CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN, train_tokenizer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF, LAYERS, VOCAB = 128, 2, 1, 64, 256, 2, 512
SAMPLES = ["Hello, world! 1234 apples", "  def f(x):\n    return x", "naïve café — 東京"]


def llamacpp_row_order(n_heads: int, head_dim: int) -> np.ndarray:
    """GGUF row r holds HF row order[r]: per head, pairs (i, i + head_dim/2) side by side."""
    half = head_dim // 2
    heads, pairs = range(n_heads), range(half)
    return np.array([h * head_dim + k * half + j for h in heads for j in pairs for k in (0, 1)])


def hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    kv = KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FF, HIDDEN),
            p + "mlp.up_proj.weight": (FF, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FF),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_llama_gguf(path: Path, weights: dict[str, np.ndarray], *, arch: str = "llama") -> None:
    """A Llama GGUF as llama.cpp's converter lays it out: Q/K rows reordered, Q8_0 matrices."""
    tok = train_tokenizer(VOCAB)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {PAD_TOKEN, IM_START, IM_END}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    )
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.token_to_id(IM_START))
    writer.add_eos_token_id(tok.token_to_id(IM_END))
    writer.add_pad_token_id(tok.token_to_id(PAD_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in weights.items():
        if name.endswith("q_proj.weight"):
            array = array[llamacpp_row_order(HEADS, HEAD_DIM)]
        elif name.endswith("k_proj.weight"):
            array = array[llamacpp_row_order(KV_HEADS, HEAD_DIM)]
        if array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return hf_weights(np.random.default_rng(7))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, weights) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "small-llama.gguf"
    write_llama_gguf(path, weights)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, gguf_file: Path) -> Path:
    return write_hf_model(gguf_file, tmp_path_factory.mktemp("hf") / "m", dtype="float32")


def test_unpermute_inverts_llamacpp_row_order() -> None:
    rows = np.arange(HEADS * HEAD_DIM * 3, dtype=np.float32).reshape(HEADS * HEAD_DIM, 3)
    shuffled = rows[llamacpp_row_order(HEADS, HEAD_DIM)]
    assert not np.array_equal(shuffled, rows)
    assert np.array_equal(unpermute_rope_rows(shuffled, HEADS), rows)


def test_tensors_come_back_under_hf_names_in_hf_row_order(hf_dir: Path, weights) -> None:
    loaded = load_file(str(hf_dir / "model.safetensors"))
    assert set(loaded) == set(weights)  # no lm_head: tied embeddings
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, original in weights.items():
        assert loaded[name].dtype == np.float32
        # exactly what llama.cpp computes with: the Q8_0 values, not the originals
        expected = dequantize(quantize(original, q8), q8) if original.ndim == 2 else original
        assert np.array_equal(loaded[name], expected), name


def test_bfloat16_weights(gguf_file: Path, tmp_path: Path) -> None:
    out = write_hf_model(gguf_file, tmp_path / "bf16", dtype="bfloat16")
    header_len = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((out / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_config_from_metadata(hf_dir: Path) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (HIDDEN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (HEAD_DIM, FF, VOCAB)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 1024


def test_tokenizer_matches_the_one_the_gguf_was_made_from(hf_dir: Path) -> None:
    original = train_tokenizer(VOCAB)
    rebuilt = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in [*SAMPLES, f"{IM_START}user\nhi{IM_END}"]:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_config_carries_template_and_special_tokens(hf_dir: Path) -> None:
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (IM_START, IM_END, PAD_TOKEN)
    assert cfg["add_bos_token"] is False
    specials = {v["content"] for v in cfg["added_tokens_decoder"].values()}
    assert specials == {PAD_TOKEN, IM_START, IM_END}


def test_other_architecture_is_refused_by_name(tmp_path: Path, weights) -> None:
    path = tmp_path / "qwen.gguf"
    write_llama_gguf(path, weights, arch="qwen2")
    with pytest.raises(GgufConversionError, match="architecture 'qwen2'; only 'llama'"):
        write_hf_model(path, tmp_path / "out")
