"""KV-cache arithmetic against published figures and the engines' own layouts.

References: shared/research/kv-cache.md §2-3 (vLLM's quantized_kvcache.md L4 example,
vLLM issue 33263, lmdeploy block.h, ggml block sizes) and the engines' code
cited in src/kiban/engines/*.py.
"""

from __future__ import annotations

import gguf
import pytest

from kiban.engines import ENGINE_KINDS
from kiban.planning.models import load_spec
from kiban.sizing import catalogue
from kiban.sizing.devices import HostInfo, gpu_from_type
from kiban.sizing.kv import layer_bytes_per_token
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.sizing.units import GiB, KiB

HOST = HostInfo(32 * GiB, 30 * GiB, frozenset({"avx512f"}))
vllm, lmdeploy, llamacpp, sglang = (
    ENGINE_KINDS[k].kv for k in ("vllm", "lmdeploy", "llamacpp", "sglang")
)


def on(gpu_key: str, tp: int = 1, args: tuple[str, ...] = ()) -> PlanTarget:
    return PlanTarget("gpu", HOST, gpu_from_type(0, catalogue.find_gpu(gpu_key), "test"), tp, args)


def per_token(kind, model: str, dtype: str, target: PlanTarget | None = None) -> int:
    target = target or on("h100-80")
    spec = load_spec(model)
    k, v = kind.kv_formats(dtype, spec, target)
    return kind.kv_need(spec, k, v, target).bytes_per_token


# -- vLLM: the published token counts ------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "published"),
    [("auto", 83_488), ("fp8", 166_992)],
)
def test_vllm_qwen3_4b_on_l4_matches_vllm_docs(dtype: str, published: int) -> None:
    """vLLM quantized_kvcache.md: Qwen3-4B on an L4, 11.47 GiB of KV cache."""
    target = on("l4")
    spec = load_spec("Qwen/Qwen3-4B")
    k, v = vllm.kv_formats(dtype, spec, target)
    need = vllm.kv_need(spec, k, v, target)
    assert need.bytes_per_token == (144 if dtype == "auto" else 72) * KiB
    tokens = vllm.kv_capacity_tokens(need, int(11.47 * GiB), spec.max_context, target)
    assert tokens == pytest.approx(published, rel=0.001)
    # the log's GiB figure is rounded: the exact byte count gives the exact number
    exact = published * need.bytes_per_token
    assert vllm.kv_capacity_tokens(need, exact, spec.max_context, target) == published


def test_vllm_qwen3_1_7b_matches_issue_33263() -> None:
    """vLLM issue 33263: Qwen3-1.7B, 18.78 GiB -> 175,856 tokens."""
    target = on("h100-80")
    spec = load_spec("Qwen/Qwen3-1.7B")
    k, v = vllm.kv_formats("auto", spec, target)
    need = vllm.kv_need(spec, k, v, target)
    assert need.bytes_per_token == 112 * KiB
    tokens = vllm.kv_capacity_tokens(need, int(18.78 * GiB), spec.max_context, target)
    assert tokens == pytest.approx(175_856, rel=0.001)


def test_vllm_reports_whole_length_requests_not_blocks() -> None:
    """vLLM 0.32 logs int(num_blocks / cdiv(max_model_len, block) * max_model_len)."""
    target = PlanTarget("cpu", HOST)
    spec = load_spec("Qwen/Qwen2.5-0.5B-Instruct")
    k, v = vllm.kv_formats("auto", spec, target)
    need = vllm.kv_need(spec, k, v, target)
    num_blocks = GiB // (128 * need.bytes_per_token)
    assert vllm.kv_capacity_tokens(need, GiB, 1000, target) == int(num_blocks / 8 * 1000)
    assert vllm.kv_capacity_tokens(need, GiB, 1024, target) == num_blocks * 128


def test_vllm_per_token_head_int8_adds_fp32_scales() -> None:
    """triton_attn.py: (head_k + head_v) x 1 byte + 2 x 4-byte scales per head."""
    assert per_token(vllm, "qwen2.5-7b", "int8") == 28 * 4 * (128 + 128 + 8)
    assert per_token(vllm, "qwen2.5-7b", "int4") == 28 * 4 * (64 + 64 + 8)


# -- research note §3 table (KiB per token) -----------------------------------------


@pytest.mark.parametrize(
    ("model", "kind", "dtype", "kib"),
    [
        ("qwen2.5-7b", vllm, "auto", 56.0),
        ("qwen2.5-vl-7b", vllm, "auto", 56.0),
        ("minicpm-v-2.6", vllm, "auto", 56.0),
        ("qwen2.5-7b", vllm, "fp8", 28.0),
        ("qwen2.5-7b", lmdeploy, "int8", 28.875),
        ("qwen2.5-7b", lmdeploy, "int4", 14.875),
        ("qwen2.5-7b", llamacpp, "q8_0", 29.75),
        ("qwen2.5-7b", llamacpp, "q4_0", 15.75),
        ("qwen2.5-14b", vllm, "auto", 192.0),
        ("qwen2.5-32b", vllm, "auto", 256.0),
        ("qwen2.5-32b", lmdeploy, "int8", 132.0),
        ("qwen2.5-32b", lmdeploy, "int4", 68.0),
        ("qwen2.5-32b", llamacpp, "q8_0", 136.0),
        ("minicpm-v-4.5", vllm, "auto", 144.0),
        ("minicpm-v-4.5", llamacpp, "q4_0", 40.5),
    ],
)
def test_research_table(model: str, kind, dtype: str, kib: float) -> None:
    assert per_token(kind, model, dtype) / KiB == pytest.approx(kib)


# -- lmdeploy and llama.cpp storage layouts -----------------------------------------


@pytest.mark.parametrize(("dtype", "expected"), [("int8", 132), ("int4", 68), ("auto", 256)])
def test_lmdeploy_bytes_per_head_and_token(dtype: str, expected: int) -> None:
    """block.h: head_dim x bits / 8 plus an fp16 scale and zero point (4 B) when quantized.

    For d=128 each of K and V takes 132 B (int8) or 68 B (int4) per token and head.
    """
    spec = load_spec("Qwen/Qwen2.5-32B-Instruct")
    k, v = lmdeploy.kv_formats(dtype, spec, on("rtx4090"))
    assert k.row_bytes(128, heads=1) == expected
    assert layer_bytes_per_token(spec, k, v) == 2 * expected * spec.num_kv_heads


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_llamacpp_block_sizes_are_ggml_s(name: str) -> None:
    spec = load_spec("qwen2.5-7b")
    k, _ = llamacpp.kv_formats(name, spec, on("rtx4090"))
    values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    assert (k.block_values, k.block_bytes) == (values, block_bytes)
    assert k.row_bytes(512) == 512 // values * block_bytes


def test_llamacpp_context_is_split_over_slots_and_padded() -> None:
    """llama-context.cpp: n_ctx and n_ctx_seq = n_ctx / n_seq_max are padded to 256."""
    target = on("rtx4090")
    spec = load_spec("qwen2.5-7b")
    k, v = llamacpp.kv_formats("q8_0", spec, target)
    need = llamacpp.kv_need(spec, k, v, target)
    assert llamacpp.kv_cache_bytes(need, 1000, 3, target) == 3 * 1024 * need.bytes_per_token


def test_llamacpp_keeps_token_embedding_on_the_host() -> None:
    spec = load_spec("qwen2.5-7b")
    assert llamacpp.weights_on_device(spec, on("rtx4090")) == (
        spec.weights_bytes - spec.embedding_bytes
    )
    assert llamacpp.weights_on_device(spec, PlanTarget("cpu", HOST)) == spec.weights_bytes


def test_mla_caches_one_latent_vector() -> None:
    """DeepSeek V3: (kv_lora_rank 512 + rope 64) values per layer, no separate V."""
    assert per_token(vllm, "deepseek-v3", "auto") == 61 * 576 * 2
    assert per_token(vllm, "deepseek-v3", "fp8") == 61 * 576


def test_sliding_window_layers_are_counted_apart() -> None:
    spec = load_spec("google/gemma-3-27b-it")
    target = on("h100-80")
    k, v = vllm.kv_formats("auto", spec, target)
    need = vllm.kv_need(spec, k, v, target)
    per_layer = 16 * 128 * 2 * 2
    assert need.bytes_per_token == per_layer * (62 - 52)
    assert (need.sliding_bytes_per_token, need.window) == (per_layer * 52, 1024)


def test_tensor_parallel_splits_kv_heads() -> None:
    spec = load_spec("qwen2.5-7b")
    k, v = vllm.kv_formats("auto", spec, on("h100-80"))
    one = vllm.kv_need(spec, k, v, on("h100-80")).bytes_per_token
    assert vllm.kv_need(spec, k, v, on("h100-80", tp=2)).bytes_per_token == one // 2
    # 4 KV heads on 8 GPUs: each rank keeps a replica of one head
    assert vllm.kv_need(spec, k, v, on("h100-80", tp=8)).bytes_per_token == one // 4


# -- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [(vllm, "fp8"), (vllm, "fp8_e5m2"), (sglang, "fp8_e4m3"), (vllm, "fp8_per_token_head")],
)
def test_fp8_kv_is_refused_before_ada(kind, dtype: str) -> None:
    for gpu in ("rtx3090", "a100-80", "a10"):
        with pytest.raises(PlanRefusal, match="FP8-capable GPU"):
            kind.kv_formats(dtype, load_spec("qwen3-8b"), on(gpu))
    kind.kv_formats(dtype, load_spec("qwen3-8b"), on("rtx4090"))
    kind.kv_formats(dtype, load_spec("qwen3-8b"), on("h100-80"))


def test_lmdeploy_fp8_is_pytorch_only_and_needs_ada() -> None:
    with pytest.raises(PlanRefusal, match="TurboMind"):
        lmdeploy.kv_formats("fp8", load_spec("qwen3-8b"), on("h100-80"))
    with pytest.raises(PlanRefusal, match="FP8-capable"):
        lmdeploy.kv_formats("fp8", load_spec("gemma-2-9b-it"), on("a100-80"))
    k, _ = lmdeploy.kv_formats("fp8", load_spec("gemma-2-9b-it"), on("h100-80"))
    assert k.name == "16"


def test_llamacpp_quantized_v_needs_flash_attention() -> None:
    spec = load_spec("qwen2.5-7b")
    for args in (("-fa", "off"), ("--flash-attn", "0"), ("--flash-attn=off",)):
        with pytest.raises(PlanRefusal, match="requires Flash Attention"):
            llamacpp.kv_formats("q8_0", spec, on("rtx4090", args=args))
    k, v = llamacpp.kv_formats("q8_0/f16", spec, on("rtx4090", args=("-fa", "off")))
    assert (k.name, v.name) == ("q8_0", "f16")  # a quantized K alone works without FA


def test_llamacpp_has_no_fp8() -> None:
    with pytest.raises(PlanRefusal, match="no fp8"):
        llamacpp.kv_formats("fp8", load_spec("qwen2.5-7b"), on("h100-80"))


def test_minicpm_v_on_lmdeploy() -> None:
    """TurboMind dropped MiniCPMV in 0.14; lmdeploy supports MiniCPM-V 2.5/2.6 only."""
    target = on("rtx4090")
    v26 = load_spec("openbmb/MiniCPM-V-2_6")
    with pytest.raises(PlanRefusal, match=r"left lmdeploy's TurboMind in 0\.14"):
        lmdeploy.kv_formats("int8", v26, target)
    lmdeploy.kv_formats("auto", v26, target)  # runs, unquantized, on the PyTorch engine
    with pytest.raises(PlanRefusal, match=r"Only support v2\.5 and v2\.6"):
        lmdeploy.kv_formats("auto", load_spec("openbmb/MiniCPM-V-4_5"), target)


def test_turbomind_kv_quantization_needs_head_dim_128() -> None:
    with pytest.raises(PlanRefusal, match="head_dim 128"):
        lmdeploy.kv_formats("int8", load_spec("Qwen/Qwen2.5-0.5B-Instruct"), on("rtx4090"))


def test_vllm_cpu_refusals() -> None:
    cpu = PlanTarget("cpu", HOST)
    old_cpu = PlanTarget("cpu", HostInfo(GiB, GiB, frozenset({"avx2"})))
    spec = load_spec("qwen2.5-7b")
    with pytest.raises(PlanRefusal, match="AVX-512 or AMX"):
        vllm.kv_formats("fp8", spec, old_cpu)
    with pytest.raises(PlanRefusal, match="CPU backend takes no"):
        vllm.kv_formats("int8", spec, cpu)
    assert vllm.kv_formats("fp8_e5m2", spec, cpu)[0].name == "fp8_e5m2"


@pytest.mark.parametrize(
    ("kind", "dtype", "model"),
    [
        (vllm, "int4", "qwen2.5-7b"),
        (lmdeploy, "int4", "qwen2.5-7b"),
        (llamacpp, "q4_0", "qwen2.5-7b"),
        (llamacpp, "q4_0", "minicpm-v-2.6"),
    ],
)
def test_int4_kv_on_qwen2_family_warns(kind, dtype: str, model: str) -> None:
    spec = load_spec(model)
    target = on("rtx4090")
    k, v = kind.kv_formats(dtype, spec, target)
    assert any("Qwen" in w and "bias" in w for w in kind.planning_warnings(spec, k, v, target))
    k8, v8 = kind.kv_formats("int8", spec, target)
    assert not any("bias" in w for w in kind.planning_warnings(spec, k8, v8, target))


def test_vllm_auto_downcasts_float32_checkpoints() -> None:
    """vllm/config/model.py _resolve_auto_dtype: float32 -> bf16 (sm80+, x86) or fp16 (older)."""
    from dataclasses import replace

    spec = replace(load_spec("qwen2.5-7b"), dtype="float32")
    assert vllm.kv_formats("auto", spec, on("h100-80"))[0].bits == 16
    assert vllm.kv_formats("auto", spec, PlanTarget("cpu", HOST))[0].bits == 16
    assert vllm.kv_formats("auto", spec, on("t4"))[0].label == "float16"
    kept = on("h100-80", args=("--dtype", "float32"))
    assert vllm.kv_formats("auto", spec, kept)[0].bits == 32
