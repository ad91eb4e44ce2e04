"""kiban.yaml files for the container renderings: the README's example and one with every kind."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kiban.config import KibanConfig, load_config
from kiban.deploy.containers import load_raw
from kiban.planning.inventory import gpus_from_options
from kiban.planning.plan import plan_config
from kiban.sizing.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
#: the environment the configurations below reference
ENV = {"KIBAN_API_KEY": "client-key", "ENGINE_SECRET": "s3cret"}


def readme_configs() -> list[str]:
    """Every complete kiban.yaml (engines and routes) in the README's yaml blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    return [b for b in blocks if {"engines", "routes"} <= set(yaml.safe_load(b) or {})]


#: every engine kind: vLLM over two GPUs, SGLang and lmdeploy sharing a third, llama.cpp on
#: the CPU from a local file, an OpenAI-compatible server on this machine; ``$`` in args,
#: ``${VAR}`` in launch.env, an API key file
FULL = """
gateway:
  host: 0.0.0.0
  port: 8080
  api_keys: {env: [KIBAN_API_KEY], file: ./keys.txt}
gpus:
  - {index: 0, type: h100-80}
  - {index: 1, type: h100-80}
  - {index: 2, type: h100-80}
engines:
  - name: qwen-vllm
    kind: vllm
    models: [qwen2.5-7b]
    launch:
      model: Qwen/Qwen2.5-7B-Instruct
      gpus: [0, 1]
      port: 8101
      context: 32768
      concurrency: 16
      kv_cache_dtype: fp8
      args: [--enable-prefix-caching, --chat-template, "{{ $x }} $(date)"]
      env: {HF_HUB_OFFLINE: "0", ENGINE_TOKEN: "tok-${ENGINE_SECRET}", PLAIN: "a$b"}
  - name: Qwen_SGLang
    kind: sglang
    models: [qwen-sglang]
    launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [2], port: 30000, context: 8192,
             concurrency: 8}
  - name: qwen-lmdeploy
    kind: lmdeploy
    models: [qwen-lmdeploy]
    launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [2], port: 23333, context: 8192,
             concurrency: 8, kv_cache_dtype: int8}
  - name: llama-cpu
    kind: llamacpp
    models: [tiny]
    launch: {model: ./tiny.gguf, device: cpu, port: 8102, context: 2048, concurrency: 2}
  - name: remote
    kind: openai
    url: http://127.0.0.1:9000
    models: [remote]
    api_key: ${REMOTE_KEY:-none}
routes:
  - model: qwen
    engines: [qwen-vllm, Qwen_SGLang, qwen-lmdeploy]
  - model: tiny
    engines: [llama-cpu]
  - model: remote
    engines: [remote]
"""


def write_config(folder: Path, text: str, gguf: Path | None = None) -> Path:
    """kiban.yaml in *folder*, with the files it names (key file, the tiny GGUF)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keys.txt").write_text("file-key\n")
    if gguf is not None:
        (folder / "tiny.gguf").write_bytes(gguf.read_bytes())
    path = folder / "kiban.yaml"
    path.write_text(text)
    return path


def load(path: Path, gpu_type: str | None = None) -> tuple[KibanConfig, dict[str, Any], Plan]:
    """The configuration, the file as written, and its plan (on *gpu_type* when given)."""
    cfg = load_config(path, env=ENV)
    gpus = gpus_from_options(gpu_type, None, 1) if gpu_type else None
    return cfg, load_raw(path), plan_config(cfg, gpus)


def planned_tail(cfg: KibanConfig, plan: Plan, engine: str) -> list[str]:
    """What must end an engine's command line: the plan's flags, then launch.args."""
    launch = cfg.engine(engine).launch
    assert launch is not None
    ep = plan.engine(engine)
    return [*(ep.flags if ep is not None else []), *launch.args]
