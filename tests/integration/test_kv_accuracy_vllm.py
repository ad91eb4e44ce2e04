"""The planner's KV capacity against what a real vLLM (CPU build) reports at start.

Each case plans one CPU engine from a kiban.yaml-shaped config, starts vLLM
with exactly the plan's flags and environment (as `kiban up` does), and
compares the plan's token count with vLLM's "CPU KV cache size: N tokens".
The cases vary the model shape (layers, KV heads; head_dim stays 64, which
vLLM's CPU attention needs), the KV dtype (model bf16, fp8 e4m3, fp8 e5m2,
float32 through the model's dtype), the context and the cache size.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.models.tiny import TinySpec, build_tiny_model
from kiban.planning.plan import plan_config
from kiban.sizing.devices import host_info

pytestmark = pytest.mark.engine

SHAPES = {
    "2L-2kv": TinySpec(),
    "3L-4kv": TinySpec(hidden_size=512, num_heads=8, num_kv_heads=4, num_layers=3),
}


@dataclass(frozen=True)
class Case:
    shape: str
    kv_dtype: str
    context: int
    concurrency: int
    model_dtype: str = "bfloat16"
    args: tuple[str, ...] = ()


CASES = [
    Case("2L-2kv", "auto", 1000, 8),
    Case("2L-2kv", "fp8_e4m3", 2048, 16),
    Case("3L-4kv", "fp8_e5m2", 1000, 4),
    # a float32 checkpoint: vLLM's "auto" downcasts it to bfloat16, KV included
    Case("3L-4kv", "auto", 1500, 100, model_dtype="float32"),
    # ... unless --dtype float32 keeps it (and a 4-byte KV cache)
    Case("3L-4kv", "auto", 1500, 50, model_dtype="float32", args=("--dtype", "float32")),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each shape once in bf16, and float32 copies where a case asks for them."""
    root = tmp_path_factory.mktemp("kv-models")
    out = {}
    for name, spec in SHAPES.items():
        out[(name, "bfloat16")] = build_tiny_model(root / name, seed=1, spec=spec)
    for case in CASES:
        key = (case.shape, case.model_dtype)
        if key not in out:
            dest = shutil.copytree(out[(case.shape, "bfloat16")], root / f"{case.shape}-{key[1]}")
            config = json.loads((dest / "config.json").read_text())
            config["torch_dtype"] = case.model_dtype
            (dest / "config.json").write_text(json.dumps(config))
            out[key] = dest
    return out


def _plan(model_dir: Path, case: Case):
    plan = _plan_result(model_dir, case)
    assert plan.ok, plan.problems
    return plan.engines[0]


def _plan_result(model_dir: Path, case: Case):
    raw = {
        "engines": [
            {
                "name": "tiny",
                "kind": "vllm",
                "models": ["tiny"],
                "launch": {
                    "model": str(model_dir),
                    "device": "cpu",
                    "port": 9,
                    "context": case.context,
                    "concurrency": case.concurrency,
                    "kv_cache_dtype": case.kv_dtype,
                    "args": list(case.args),
                },
            }
        ],
        "routes": [{"model": "tiny", "engines": ["tiny"]}],
    }
    return plan_config(parse_config(raw, env={}), gpus=[])


def _case_id(case: Case) -> str:
    return "-".join([case.shape, case.model_dtype, case.kv_dtype, *case.args])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kv_capacity_matches_vllm_cpu(case: Case, models, vllm_engine_factory) -> None:
    if case.kv_dtype.startswith("fp8") and not host_info().has_avx512_or_amx:
        # vLLM's CPU attention takes fp8 KV only with AVX-512 or AMX (cpu_attn.py): on this
        # CPU the plan must refuse it and say what to use instead
        refused = _plan_result(models[(case.shape, case.model_dtype)], case)
        assert not refused.ok
        assert "needs x86 with AVX-512 or AMX" in str(refused.problems)
        assert "auto" in str(refused.problems)
        return
    plan = _plan(models[(case.shape, case.model_dtype)], case)
    kv_gib = int(plan.env["VLLM_CPU_KVCACHE_SPACE"])
    engine = vllm_engine_factory(
        models[(case.shape, case.model_dtype)],
        "tiny",
        kv_cache_gib=kv_gib,
        max_model_len=plan.context,
        # what `kiban up` runs: the plan's flags, then launch.args
        extra_args=(*plan.flags, *case.args, "--enforce-eager"),
    )
    try:
        log = engine.log_tail(10**7)
    finally:
        engine.stop()
    report = ENGINE_KINDS["vllm"].startup_log.report(log)
    print(
        f"{case}: planned {plan.kv_tokens:,} tokens in {kv_gib} GiB "
        f"({plan.kv_bytes_per_token} B/token); vLLM reported {report.kv_cache_tokens:,}"
    )
    assert report.device == "cpu"
    assert report.kv_cache_bytes == kv_gib * 1024**3
    assert report.kv_cache_tokens == pytest.approx(plan.kv_tokens, rel=0.02)
    assert plan.kv_tokens >= case.context * case.concurrency  # what was asked for fits
