"""Model specs: config.json layouts, exact weight bytes from headers, the catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiban.models.tiny import TinySpec, build_tiny_gguf, build_tiny_model, save_bf16_safetensors
from kiban.planning.hf_config import ModelConfigError, shape_fields
from kiban.planning.models import UnknownModelError, load_spec
from kiban.planning.params import count_parameters
from kiban.planning.weights import WeightsError, read_safetensors
from kiban.sizing import catalogue

SPEC = TinySpec(num_layers=3, num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("spec") / "tiny", seed=3, spec=SPEC)


def _tensor_bytes(spec: TinySpec, bytes_per_value: int) -> int:
    total = 0
    for shape in spec.hf_shapes().values():
        n = 1
        for dim in shape:
            n *= dim
        total += n * bytes_per_value
    return total


def test_hf_directory_is_read_exactly(tiny_dir: Path) -> None:
    spec = load_spec(str(tiny_dir))
    assert spec.weights_exact
    assert spec.weights_bytes == _tensor_bytes(SPEC, 2)  # bf16
    assert spec.embedding_bytes == SPEC.vocab_size * SPEC.hidden_size * 2
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 1, 64)
    assert spec.max_context == SPEC.max_position_embeddings
    # the estimate from shapes agrees with the files for this plain Qwen2 layout
    config = json.loads((tiny_dir / "config.json").read_text())
    assert count_parameters(config).total * 2 == spec.weights_bytes


def test_sharded_checkpoint_sums_its_index(tmp_path: Path) -> None:
    import numpy as np

    save_bf16_safetensors({"model.embed_tokens.weight": np.zeros((8, 4), "f4")}, tmp_path / "a")
    save_bf16_safetensors({"visual.blocks.0.w": np.zeros((3, 4), "f4")}, tmp_path / "b")
    (tmp_path / "model-00001.safetensors").write_bytes((tmp_path / "a").read_bytes())
    (tmp_path / "model-00002.safetensors").write_bytes((tmp_path / "b").read_bytes())
    index = {"weight_map": {"x": "model-00001.safetensors", "y": "model-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    totals = read_safetensors(tmp_path)
    assert (totals.total, totals.embedding, totals.vision, totals.files) == (88, 64, 24, 2)


def test_bad_safetensors_header_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        read_safetensors(tmp_path)


def test_safetensors_header_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    header = b"[1, 2]"
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(WeightsError, match="not a JSON object"):
        read_safetensors(tmp_path)


def test_gguf_tensor_infos(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "tiny.gguf", spec=SPEC)
    spec = load_spec(str(path))
    assert spec.weights_exact
    assert spec.weights_bytes == _tensor_bytes(SPEC, 4)  # the tiny GGUF is F32
    assert spec.embedding_bytes == SPEC.vocab_size * SPEC.hidden_size * 4
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (
        3,
        1,
        64,
        SPEC.vocab_size,
    )


def test_vlm_nested_text_config_and_vision() -> None:
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "vision_config": {"hidden_size": 1152},
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "max_position_embeddings": 131072,
            "sliding_window": 1024,
            "sliding_window_pattern": 6,
        },
    }
    fields = shape_fields(config)
    assert (fields["num_layers"], fields["num_kv_heads"], fields["head_dim"]) == (34, 4, 256)
    assert (fields["sliding_layers"], fields["sliding_window"]) == (34 - 5, 1024)
    internvl = {"architectures": ["InternVLChatModel"], "llm_config": config["text_config"]}
    assert shape_fields(internvl)["num_layers"] == 34


@pytest.mark.parametrize(
    ("extra", "sliding"),
    [
        ({"model_type": "gemma2", "sliding_window": 4096}, 5),
        ({"model_type": "mistral", "sliding_window": 4096}, 10),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, 0),
        (
            {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True,
             "max_window_layers": 8},
            2,
        ),
        ({"sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"] * 5}, 5),
        ({"model_type": "mistral", "sliding_window": 65536}, 0),  # window >= context
    ],
)  # fmt: skip
def test_sliding_window_layer_counts(extra: dict, sliding: int) -> None:
    base = {
        "hidden_size": 512,
        "num_hidden_layers": 10,
        "num_attention_heads": 8,
        "max_position_embeddings": 32768,
    }
    assert shape_fields(base | extra)["sliding_layers"] == sliding


def test_mla_and_quantization_config() -> None:
    spec = load_spec("deepseek-v3")
    assert spec.mla is not None and spec.mla.latent_dim == 576
    assert spec.quantization == "fp8"
    awq = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "max_position_embeddings": 8,
        "quantization_config": {"quant_method": "awq", "bits": 4},
    }
    assert shape_fields(awq)["quantization"] == "awq-4bit"


def test_missing_keys_are_named() -> None:
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        shape_fields({"hidden_size": 8})


@pytest.mark.parametrize(
    ("drop", "named"),
    [("vocab_size", "vocab_size"), ("intermediate_size", "moe_intermediate_size / intermediate")],
)
def test_parameter_count_names_a_missing_size(drop: str, named: str) -> None:
    config = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 1000,
        "intermediate_size": 128,
        "num_experts": 4,
    }
    del config[drop]
    with pytest.raises(ModelConfigError, match=named):
        count_parameters(config)


def test_qwen25_7b_parameter_count_is_exact() -> None:
    """HF's model.safetensors.index.json lists total_size 15,231,233,024 bytes (bf16)."""
    entry = catalogue.find_model("Qwen/Qwen2.5-7B-Instruct")
    assert count_parameters(entry.config).total == 15_231_233_024 // 2


@pytest.mark.parametrize(
    ("name", "found", "quantization"),
    [
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", None),
        ("Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen/Qwen2.5-7B-Instruct", "awq-4bit"),
        ("Qwen2.5-7B-Instruct-GGUF:Q4_K_M", "Qwen/Qwen2.5-7B-Instruct", "gguf:q4_k_m"),
        ("minicpm-v-2.6", "openbmb/MiniCPM-V-2_6", None),
        ("META-LLAMA/llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", None),
    ],
)
def test_catalogue_lookup(name: str, found: str, quantization: str | None) -> None:
    entry = catalogue.find_model(name)
    assert (entry.name, entry.quantization) == (found, quantization)


def test_quantized_weights_are_smaller() -> None:
    full = load_spec("qwen2.5-7b").weights_bytes
    awq = load_spec("qwen2.5-7b-awq").weights_bytes
    q4 = load_spec("qwen2.5-7b:q4_k_m").weights_bytes
    assert 0.3 < awq / full < 0.4 and 0.25 < q4 / full < 0.35


def test_unknown_model_says_what_is_accepted() -> None:
    with pytest.raises(UnknownModelError, match="not in kiban's catalogue"):
        load_spec("no-such-model-7b")


def test_every_catalogue_entry_loads_with_a_source() -> None:
    for name in catalogue.model_names():
        spec = load_spec(name)
        assert spec.source.startswith("catalogue: ") and spec.weights_bytes > 0, name


def test_gpu_catalogue() -> None:
    assert catalogue.find_gpu("NVIDIA H100 80GB HBM3").key == "h100-80"
    assert catalogue.find_gpu("rtx 4090").compute_capability == (8, 9)
    assert catalogue.find_gpu("RTX3090").compute_capability == (8, 6)
    assert catalogue.find_gpu("tpu") is None
