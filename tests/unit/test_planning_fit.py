"""Plans from kiban.yaml: memory shares, fits and refusals, flags, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from kiban.cli import app
from kiban.config import ConfigError, parse_config
from kiban.planning.plan import plan_config
from kiban.planning.render import print_plan
from kiban.sizing import catalogue
from kiban.sizing.devices import gpu_from_type
from kiban.sizing.units import GiB, parse_size


def engine(name: str, kind: str, port: int, **launch) -> dict:
    return {"name": name, "kind": kind, "models": [name], "launch": {"port": port, **launch}}


def config(*engines: dict, **top) -> dict:
    routes = [{"model": e["name"], "engines": [e["name"]]} for e in engines]
    return {"engines": list(engines), "routes": routes, **top}


def plan_of(raw: dict, gpu: str = "rtx4090", count: int = 1):
    gpus = [gpu_from_type(i, catalogue.find_gpu(gpu), "test") for i in range(count)]
    return plan_config(parse_config(raw, env={}), gpus)


def test_requested_context_and_concurrency_get_exactly_their_kv() -> None:
    plan = plan_of(config(engine("q", "vllm", 1, model="qwen3-4b", context=8192, concurrency=4)))
    (e,) = plan.engines
    assert plan.ok and e.fits
    assert e.kv_cache_bytes == 4 * 8192 * 144 * 1024
    assert e.share_bytes == e.weights_bytes + e.overhead_bytes + e.kv_cache_bytes
    flags = dict(zip(e.flags[::2], e.flags[1::2], strict=True))
    assert flags["--kv-cache-memory-bytes"] == str(e.kv_cache_bytes)
    assert flags["--max-model-len"] == "8192" and flags["--max-num-seqs"] == "4"
    utilization = float(flags["--gpu-memory-utilization"])
    assert utilization * e.device_total_bytes <= e.share_bytes  # vLLM's free-memory check passes


def test_two_engines_share_one_gpu() -> None:
    """The issue's case: Qwen2.5 on vLLM and a VLM on lmdeploy on one 24 GB card."""
    raw = config(
        engine("qwen", "vllm", 1, model="qwen2.5-7b-awq", context=16384, concurrency=2),
        engine("vl", "lmdeploy", 2, model="qwen2.5-vl-3b", kv_cache_dtype="int8"),
    )
    plan = plan_of(raw)
    assert plan.ok, plan.problems
    qwen, vl = plan.engines
    device = plan.devices[0]
    assert device.shares == {"qwen": qwen.share_bytes, "vl": vl.share_bytes}
    assert 0 <= device.free_bytes < GiB // 1024  # the flexible engine takes what is left
    assert vl.free_at_start_bytes == device.total_bytes - qwen.share_bytes  # starts second
    flags = dict(zip(vl.flags[::2], vl.flags[1::2], strict=True))
    assert flags["--backend"] == "turbomind" and flags["--quant-policy"] == "8"
    ratio = float(flags["--cache-max-entry-count"])
    free_after_weights = vl.free_at_start_bytes - vl.weights_bytes
    assert ratio * free_after_weights <= vl.kv_cache_bytes * 1.01 + 512 * 1024**2
    assert vl.context == 128000 and vl.concurrency >= 1


def test_does_not_fit_says_by_how_much_and_what_would() -> None:
    raw = config(engine("q", "vllm", 1, model="qwen2.5-7b", context=32768, concurrency=8))
    plan = plan_of(raw)
    (e,) = plan.engines
    assert not e.fits and e.margin_bytes < 0
    (problem,) = [p for p in plan.problems if p.startswith("engine q")]
    assert "over-committed by" in problem and "beside" not in problem
    assert "would fit:" in problem and "kv_cache_dtype fp8" in problem
    assert "sequences at context 32768" in problem
    assert e.flags == [] and e.env == {}  # no flags that ask for memory the GPU lacks
    console = Console(width=200, record=True)
    print_plan(plan, console)
    assert "q      │ none: it does not fit" in console.export_text()


def test_weights_alone_too_big() -> None:
    plan = plan_of(config(engine("big", "vllm", 1, model="qwen2.5-32b")))
    assert not plan.ok
    assert "weights and overhead alone need" in plan.problems[0]
    assert "tensor parallel" in plan.problems[0]


def test_tensor_parallel_over_two_gpus_fits_what_one_cannot() -> None:
    raw = config(engine("big", "vllm", 1, model="qwen2.5-32b-awq", gpus=[0, 1], context=8192))
    plan = plan_of(raw, count=2)
    assert plan.ok, plan.problems
    (e,) = plan.engines
    assert e.tp == 2 and "--tensor-parallel-size" in e.flags


def test_cap_from_gpu_memory_gib() -> None:
    raw = config(engine("q", "vllm", 1, model="qwen3-1.7b", gpu_memory_gib=8))
    (e,) = plan_of(raw).engines
    assert e.share_bytes == 8 * GiB and e.fits
    assert e.kv_cache_bytes == 8 * GiB - e.weights_bytes - e.overhead_bytes


def test_refusal_is_a_problem_naming_the_engine() -> None:
    raw = config(engine("old", "vllm", 1, model="qwen3-4b", kv_cache_dtype="fp8"))
    plan = plan_of(raw, gpu="rtx3090")
    assert plan.problems[0].startswith("engine old: fp8 KV cache needs an FP8-capable GPU")
    assert "use auto or int8_per_token_head" in plan.problems[0]


def test_unknown_gpu_index_says_how_to_describe_it() -> None:
    raw = config(engine("q", "vllm", 1, model="qwen3-4b", gpus=[3]))
    plan = plan_of(raw)
    assert "GPU 3 unknown" in plan.problems[0] and "gpus:" in plan.problems[0]


def test_llamacpp_flags_are_explicit() -> None:
    raw = config(
        engine("l", "llamacpp", 1, model="qwen2.5-7b:q4_k_m", context=8000, concurrency=3,
               kv_cache_dtype="q8_0"),
    )  # fmt: skip
    (e,) = plan_of(raw).engines
    assert e.flags == [
        "-c", "24576", "-np", "3", "-ngl", "999", "-fa", "on",
        "-ctk", "q8_0", "-ctv", "q8_0", "--fit", "off",
    ]  # fmt: skip
    assert e.kv_cache_bytes == 3 * 8192 * 28 * 2 * 544


def test_cpu_engine_plans_host_memory() -> None:
    raw = config(
        engine("c", "vllm", 1, model="qwen2.5-0.5b", device="cpu", context=4096, concurrency=2)
    )
    (e,) = plan_of(raw).engines
    assert e.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "--kv-cache-memory-bytes" not in e.flags


def test_cpu_engines_that_pin_threads_get_cores_of_their_own(monkeypatch) -> None:
    """vLLM binds every CPU server to the same cores by itself: kiban splits the host's."""
    monkeypatch.setattr("kiban.planning.fit.usable_cores", lambda: (0, 1, 2, 3, 4))
    small = {"model": "qwen2.5-0.5b", "device": "cpu", "context": 2048, "concurrency": 1}
    a, b, c = plan_of(
        config(
            engine("a", "vllm", 1, **small),
            engine("b", "vllm", 2, **small),
            engine("c", "llamacpp", 3, **small),
        )
    ).engines
    assert (a.cpus, b.cpus, c.cpus) == ((0, 1, 2), (3, 4), ())
    assert a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"
    assert b.env["VLLM_CPU_OMP_THREADS_BIND"] == "3-4"
    assert "--cpu-mask" not in c.flags  # llama.cpp leaves its threads to the OS
    (alone,) = plan_of(config(engine("a", "vllm", 1, **small))).engines
    assert alone.cpus == () and "VLLM_CPU_OMP_THREADS_BIND" not in alone.env


def test_launch_cpus_places_an_engine_and_the_others_split_the_rest(monkeypatch) -> None:
    monkeypatch.setattr("kiban.planning.fit.usable_cores", lambda: (0, 1, 2, 3))
    small = {"model": "qwen2.5-0.5b", "device": "cpu", "context": 2048, "concurrency": 1}
    raw = config(engine("a", "vllm", 1, **small), engine("c", "llamacpp", 3, **small, cpus="0,2"))
    plan = plan_of(raw)
    a, c = plan.engines
    assert a.cpus == (1, 3) and a.env["VLLM_CPU_OMP_THREADS_BIND"] == "1,3"
    assert c.flags[-6:] == ["--threads", "2", "--cpu-mask", "5", "--cpu-strict", "1"]
    three = config(*(engine(n, "vllm", i, **small) for i, n in enumerate("xyz", 1)))
    monkeypatch.setattr("kiban.planning.fit.usable_cores", lambda: (0, 1))
    crowded = plan_of(three)
    assert [e.cpus for e in crowded.engines] == [(0,), (1,), (0,)]
    assert any("share 2 core(s) (0-1)" in w for w in crowded.warnings)


def test_launch_cpus_that_are_not_a_core_list_name_key_and_value() -> None:
    bad = config(engine("a", "llamacpp", 1, model="m", device="cpu", cpus="0-x"))
    with pytest.raises(ConfigError, match=r"launch\.cpus.*'0-x' is not a core number"):
        parse_config(bad, env={})


def test_gpus_inventory_in_config() -> None:
    raw = config(
        engine("q", "vllm", 1, model="qwen3-4b"),
        gpus=[{"index": 0, "memory": "16GiB", "compute_capability": "8.9"}],
    )
    plan = plan_config(parse_config(raw, env={}))
    assert plan.devices[0].total_bytes == 16 * GiB
    with pytest.raises(ConfigError, match=r"gpus\[1\]\.index: GPU 0 is already described"):
        two = [{"index": 0, "type": "l4"}, {"index": 0, "type": "t4"}]
        parse_config(config(engine("q", "vllm", 1, model="m"), gpus=two), env={})


def test_parse_size() -> None:
    assert parse_size("24GiB") == parse_size("24G") == 24 * GiB
    assert parse_size("24GB") == 24 * 10**9 and parse_size(1024) == 1024
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("lots")


# -- CLI ---------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    raw = config(
        engine("qwen", "vllm", 1, model="qwen2.5-7b-awq", context=16384, concurrency=2),
        engine("small", "llamacpp", 2, model="qwen3-1.7b", kv_cache_dtype="q8_0"),
    )
    path = tmp_path / "kiban.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_json(config_file: Path) -> None:
    result = CliRunner().invoke(app, ["plan", "-c", str(config_file), "--gpu", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and [e["engine"] for e in data["engines"]] == ["qwen", "small"]
    assert data["engines"][0]["kv_bytes_per_token"] == 28 * 4 * 128 * 2 * 2


def test_cli_asks_whether_a_request_fits(config_file: Path) -> None:
    args = ["plan", "-c", str(config_file), "--gpu-memory", "24GiB", "--json"]
    fits = CliRunner().invoke(app, [*args, "--engine", "qwen", "--context", "32768"])
    assert fits.exit_code == 0
    too_much = CliRunner().invoke(
        app, [*args, "--engine", "qwen", "--context", "32768", "--concurrency", "64"]
    )
    assert too_much.exit_code == 1
    problems = json.loads(too_much.output)["problems"]
    assert any(p.startswith("engine qwen:") and "over-committed" in p for p in problems)


def test_cli_table_and_bad_gpu(config_file: Path) -> None:
    result = CliRunner().invoke(app, ["plan", "-c", str(config_file), "--gpu", "rtx4090"])
    assert result.exit_code == 0 and "--kv-cache-memory-bytes" in result.output
    bad = CliRunner().invoke(app, ["plan", "-c", str(config_file), "--gpu", "voodoo5"])
    assert bad.exit_code == 2 and "unknown GPU type 'voodoo5'" in bad.output


def test_cli_model_quick_answers() -> None:
    result = CliRunner().invoke(app, ["plan", "model", "qwen2.5-7b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    kv = {(r["kind"], r["kv_dtype"]): r["bytes_per_token"] for r in data["kv"]}
    assert kv[("vllm", "auto")] == 56 * 1024 and kv[("llamacpp", "q4_0")] == 28 * 2 * 288
    assert set(data["capacity"]) == {"rtx4080", "rtx4090", "rtx5090", "h100-80", "h200"}
    small = data["capacity"]["rtx4080"]["vllm:auto"]  # 15.2 GB of bf16 weights on 16 GB
    assert small["problem"] or small["context"] < 32768
    assert data["capacity"]["h100-80"]["vllm:auto"]["kv_tokens"] > 1_000_000


def test_sglang_flags_cap_the_pool_at_the_planned_tokens() -> None:
    raw = config(engine("s", "sglang", 1, model="qwen3-8b", context=16384, concurrency=4))
    (e,) = plan_of(raw, gpu="h100-80").engines
    flags = dict(zip(e.flags[::2], e.flags[1::2], strict=True))
    assert flags["--max-total-tokens"] == str(e.kv_tokens) == str(4 * 16384)
    static = (e.weights_bytes + e.kv_cache_bytes) / (e.free_at_start_bytes - 512 * 1024**2)
    assert static <= float(flags["--mem-fraction-static"]) < static + 0.001
    assert flags["--context-length"] == "16384" and flags["--max-running-requests"] == "4"


def test_lmdeploy_backend_from_launch_args_decides_the_plan() -> None:
    """Qwen2.5 runs on TurboMind by default; ``--backend pytorch`` in launch.args (where
    TurboMind is not installed) makes the plan reserve the PyTorch engine's runtime buffers
    and say ``--backend pytorch``, with a smaller cache fraction for the same KV bytes."""
    launch = {"model": "Qwen/Qwen2.5-7B-Instruct", "context": 8192, "concurrency": 16,
              "kv_cache_dtype": "int8"}  # fmt: skip
    default = plan_of(config(engine("lm", "lmdeploy", 1, **launch)), gpu="h100-80").engines[0]
    pytorch = plan_of(
        config(engine("lm", "lmdeploy", 1, **launch, args=["--backend", "pytorch"])),
        gpu="h100-80",
    ).engines[0]
    flags = dict(zip(default.flags[::2], default.flags[1::2], strict=True))
    torch_flags = dict(zip(pytorch.flags[::2], pytorch.flags[1::2], strict=True))
    assert flags["--backend"] == "turbomind" and torch_flags["--backend"] == "pytorch"
    assert pytorch.kv_cache_bytes == default.kv_cache_bytes
    assert pytorch.overhead_bytes > default.overhead_bytes  # the runtime reserve
    assert float(torch_flags["--cache-max-entry-count"]) > float(flags["--cache-max-entry-count"])
