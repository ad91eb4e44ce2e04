"""The code paths for several GPUs, on this machine (no GPU; NVML answered as two H100s).

The multi-GPU device kinds are not lent (issue 10): these check what kiban
does with two GPUs without them — which engines start together, which GPUs
each engine sees, what the plan gives each GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiban import gpus
from kiban.config import parse_config
from kiban.deploy.launch import device_env
from kiban.deploy.supervisor import Supervisor, _gpu_need
from kiban.planning.plan import plan_config
from tests.support.fake_nvml import FakeGpu, fake_nvml

UUIDS = ("GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-1111-1111-1111-111111111111")


@pytest.fixture
def two_h100(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpu]:
    cards = [FakeGpu(uuid=u, processes=[]) for u in UUIDS]
    monkeypatch.setattr(gpus, "pynvml", fake_nvml(cards))
    gpus._init.cache_clear()
    yield cards
    gpus._init.cache_clear()


def _config(tmp_path: Path):
    def engine(name: str, kind: str, gpu_list: list[int], port: int, **launch: object) -> dict:
        return {
            "name": name,
            "kind": kind,
            "models": [name],
            "launch": {
                "model": "Qwen/Qwen2.5-7B-Instruct",
                "gpus": gpu_list,
                "port": port,
                "context": 8192,
                "concurrency": 8,
                **launch,
            },
        }

    raw = {
        "engines": [
            engine("tp", "vllm", [0, 1], 8101, gpu_memory_gib=30),
            engine("llama0", "llamacpp", [0], 8102),
            engine("llama1", "llamacpp", [1], 8103),
            engine("lm1", "lmdeploy", [1], 8104, gpu_memory_gib=20),
        ],
        "routes": [{"model": n, "engines": [n]} for n in ("tp", "llama0", "llama1", "lm1")],
    }  # fmt: skip
    path = tmp_path / "kiban.yaml"
    path.write_text("{}")
    return parse_config(raw, {}), path


def test_engines_sharing_a_gpu_start_one_after_another(tmp_path: Path, two_h100) -> None:
    cfg, path = _config(tmp_path)
    supervisor = Supervisor(cfg, path, say=lambda _m: None)
    for engine in supervisor.engines:
        supervisor._manage_engine(engine, command=None)  # type: ignore[arg-type]
    waves = [[m.record.name for m in wave] for wave in supervisor._waves()]
    # tp holds both GPUs, so each single-GPU engine waits for it; lm1 waits for llama1 (GPU 1)
    assert waves == [["tp"], ["llama0", "llama1"], ["lm1"]]


def test_each_engine_sees_exactly_its_gpus_by_uuid(tmp_path: Path, two_h100) -> None:
    cfg, _ = _config(tmp_path)
    env = {e.name: device_env(e)["CUDA_VISIBLE_DEVICES"] for e in cfg.engines}
    assert env == {"tp": ",".join(UUIDS), "llama0": UUIDS[0], "llama1": UUIDS[1],
                   "lm1": UUIDS[1]}  # fmt: skip


def test_plan_shares_both_gpus_and_sets_tensor_parallel(tmp_path: Path, two_h100) -> None:
    cfg, _ = _config(tmp_path)
    plan = plan_config(cfg)
    assert plan.ok, plan.problems
    tp = plan.engine("tp")
    assert tp.gpus == (0, 1) and "--tensor-parallel-size" in tp.flags
    assert tp.flags[tp.flags.index("--tensor-parallel-size") + 1] == "2"
    need = _gpu_need(plan)
    assert set(need) == {0, 1}
    # every GPU is given to the engines on it, and no more than the card has
    assert all(0 < need[i] <= two_h100[i].mem_total for i in (0, 1))
    assert plan.engine("llama0").gpus == (0,) and plan.engine("lm1").gpus == (1,)


def test_llamacpp_over_two_gpus_splits_layers_evenly(tmp_path: Path, two_h100) -> None:
    raw = {
        "engines": [
            {"name": "split", "kind": "llamacpp", "models": ["m"],
             "launch": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": [0, 1], "port": 8101,
                        "context": 8192, "concurrency": 4}},
            {"name": "one", "kind": "llamacpp", "models": ["m"],
             "launch": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": [0], "port": 8102,
                        "context": 8192, "concurrency": 4}},
        ],
        "routes": [{"model": "m", "engines": ["split", "one"]}],
    }  # fmt: skip
    plan = plan_config(parse_config(raw, {}))
    assert plan.ok, plan.problems
    flags = plan.engine("split").flags
    assert flags[flags.index("--split-mode") + 1] == "layer"
    assert flags[flags.index("--tensor-split") + 1] == "1,1"
    assert "--split-mode" not in plan.engine("one").flags
    # half of the KV cache on each GPU: the same cells, half the KV heads' bytes per GPU
    assert plan.engine("split").kv_cache_bytes * 2 == plan.engine("one").kv_cache_bytes
