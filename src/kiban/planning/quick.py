"""Quick answers about one model: KV bytes per token per engine and dtype, and what fits.

``kiban plan model NAME_OR_PATH`` uses these. Capacities run the full planner
(one engine alone on a GPU of each reference size), so they match ``kiban plan``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.planning.fit import build_plan
from kiban.sizing import catalogue
from kiban.sizing.devices import GpuInfo, gpu_from_type, host_info
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget

#: the reference cards of `kiban plan model`: 16, 24, 32, 80 and 141 GB
REFERENCE_GPUS = ("rtx4080", "rtx4090", "rtx5090", "h100-80", "h200")


def capacity_columns() -> list[tuple[str, str]]:
    """(engine kind, KV dtype) columns of the capacity table, as each kind declares them."""
    return [
        (kind.name, dtype)
        for kind in ENGINE_KINDS.values()
        if kind.kv is not None
        for dtype in kind.kv.capacity_dtypes
    ]


@dataclass(frozen=True)
class KvRow:
    """KV bytes per token of one engine and dtype (or why the engine refuses it)."""

    kind: str
    kv_dtype: str
    label: str
    bytes_per_token: int | None
    refusal: str | None


def kv_rows(spec: ModelSpec, gpu: GpuInfo | None = None) -> list[KvRow]:
    """Every plannable engine's KV dtypes for *spec* on *gpu* (an H100 when None)."""
    gpu = gpu or gpu_from_type(0, catalogue.gpu_by_key("h100-80"), "catalogue")
    target = PlanTarget("gpu", host_info(), gpu)
    rows = []
    for kind in ENGINE_KINDS.values():
        if kind.kv is None:
            continue
        for dtype in kind.kv.kv_dtypes:
            try:
                k, v = kind.kv.kv_formats(dtype, spec, target)
            except PlanRefusal as refusal:
                rows.append(KvRow(kind.name, dtype, "", None, refusal.reason))
                continue
            need = kind.kv.kv_need(spec, k, v, target)
            total = need.bytes_per_token + need.sliding_bytes_per_token
            rows.append(KvRow(kind.name, dtype, k.label, total, None))
    return rows


def capacity(reference: str, gpu_key: str, kind: str, kv_dtype: str) -> tuple[int, int, str]:
    """(context, KV tokens, problem) of *reference* alone on one *gpu_key* GPU."""
    raw = {
        "gpus": [{"index": 0, "type": gpu_key}],
        "engines": [
            {
                "name": "e",
                "kind": kind,
                "models": ["m"],
                "launch": {"model": reference, "port": 9, "kv_cache_dtype": kv_dtype},
            }
        ],
        "routes": [{"model": "m", "engines": ["e"]}],
    }
    cfg = parse_config(raw, env={})
    gpu = gpu_from_type(0, catalogue.gpu_by_key(gpu_key), "catalogue")
    plan = build_plan(cfg, [gpu])
    if not plan.engines:
        return 0, 0, plan.problems[0] if plan.problems else "not planned"
    engine = plan.engines[0]
    if not engine.fits:
        return 0, 0, plan.problems[0] if plan.problems else "does not fit"
    return engine.context, engine.kv_tokens, ""
