"""The built-in catalogue (data/models.yaml, data/gpus.yaml): lookups by name.

Names match loosely: case, an ``org/`` prefix, ``-Instruct``/``-it``/``-Chat``
suffixes and ``_``/``.`` spellings are ignored, so ``qwen2.5-7b``,
``Qwen/Qwen2.5-7B-Instruct`` and ``minicpm-v-2.6`` all find their entry. A
quantization suffix (``-AWQ``, ``-GPTQ-Int4``, ``-GPTQ-Int8``, ``-FP8``, or a
GGUF type such as ``:Q4_K_M``) selects the same shapes with quantized weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

_SUFFIXES = ("-instruct", "-it", "-chat")
_QUANT_SUFFIXES = {
    "-awq": "awq-4bit",
    "-gptq-int4": "gptq-4bit",
    "-gptq-int8": "gptq-8bit",
    "-fp8": "fp8",
}
_GGUF_SUFFIX = re.compile(r"[:\-](f16|bf16|q8_0|q6_k|q5_k_m|q5_0|q4_k_m|q4_k_s|q4_0|q3_k_m|q2_k)$")


@dataclass(frozen=True)
class CatalogueModel:
    """One catalogue entry: its hub name, config.json excerpt, source and notes."""

    name: str
    config: dict[str, Any]
    source: str
    vision_params: int
    note: str | None
    quantization: str | None = None


@dataclass(frozen=True)
class GpuType:
    """A GPU model the planner knows: memory and CUDA compute capability."""

    key: str
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    approximate: bool


def _load(name: str) -> dict[str, Any]:
    data = resources.files("kiban.sizing").joinpath("data").joinpath(name)
    loaded: dict[str, Any] = yaml.safe_load(data.read_text(encoding="utf-8"))
    return loaded


def _key(name: str) -> str:
    key = name.lower().rsplit("/", 1)[-1].replace("_", ".")
    for suffix in _SUFFIXES:
        key = key.removesuffix(suffix)
    return key


@cache
def _models() -> dict[str, CatalogueModel]:
    out = {}
    for name, entry in _load("models.yaml")["models"].items():
        model = CatalogueModel(
            name=name,
            config=entry["config"],
            source=entry["source"],
            vision_params=int(entry.get("vision_params") or 0),
            note=entry.get("note"),
        )
        out[_key(name)] = model
    return out


def model_names() -> list[str]:
    """Hub names of every catalogue model, in catalogue order."""
    return [m.name for m in _models().values()]


def find_model(name: str) -> CatalogueModel | None:
    """The catalogue entry for *name* (with its quantization suffix applied), or None."""
    lowered = name.lower()
    quantization = None
    match = _GGUF_SUFFIX.search(lowered)
    if match:
        quantization = f"gguf:{match.group(1)}"
        lowered = lowered[: match.start()]
    lowered = lowered.removesuffix("-gguf")
    for suffix, quant in _QUANT_SUFFIXES.items():
        if lowered.endswith(suffix):
            quantization, lowered = quant, lowered.removesuffix(suffix)
    model = _models().get(_key(lowered))
    if model is None:
        return None
    if quantization is None:
        return model
    return CatalogueModel(
        model.name, model.config, model.source, model.vision_params, model.note, quantization
    )


@cache
def _gpus() -> dict[str, GpuType]:
    out = {}
    for key, entry in _load("gpus.yaml")["gpus"].items():
        major, minor = (int(x) for x in str(entry["compute_capability"]).split("."))
        out[key] = GpuType(
            key=key,
            name=entry["name"],
            memory_bytes=int(entry["memory_mib"]) * 1024**2,
            compute_capability=(major, minor),
            approximate=bool(entry.get("approximate", False)),
        )
    return out


def gpu_keys() -> list[str]:
    """Names accepted by ``find_gpu`` (``rtx4090``, ``h100-80``, ...)."""
    return list(_gpus())


def gpu_by_key(key: str) -> GpuType:
    """The GPU of catalogue key *key* (one of :func:`gpu_keys`); KeyError for another."""
    return _gpus()[key]


def find_gpu(name: str) -> GpuType | None:
    """A GPU by catalogue key or by its (NVML-style) name, ignoring case and spaces."""
    wanted = re.sub(r"[\s_]", "", name.lower()).removeprefix("nvidia").removeprefix("geforce")
    for gpu in _gpus().values():
        full = re.sub(r"[\s_]", "", gpu.name.lower()).removeprefix("nvidia").removeprefix("geforce")
        if wanted in {gpu.key, gpu.key.replace("-", ""), full}:
            return gpu
    for gpu in _gpus().values():  # "NVIDIA H100 80GB HBM3" from NVML, "rtx 4090", "a100"
        full = re.sub(r"[\s_]", "", gpu.name.lower())
        if wanted and (wanted in full or full.endswith(wanted)):
            return gpu
    return None
