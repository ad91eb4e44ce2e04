"""``plan_config(cfg)``: the entry point ``kiban plan`` and ``kiban up`` use; the console's view.

The plan's records (:class:`~kiban.sizing.plan.Plan`, ``EnginePlan``, ``DevicePlan``)
live in the leaf :mod:`kiban.sizing.plan`, so engine modules can type against them
without importing the planner.
"""

from __future__ import annotations

from typing import Any

from kiban.config import KibanConfig
from kiban.planning.fit import build_plan
from kiban.planning.inventory import resolve_gpus
from kiban.planning.render import plan_dict
from kiban.sizing.devices import GpuInfo
from kiban.sizing.plan import Plan


def plan_config(cfg: KibanConfig, gpus: list[GpuInfo] | None = None) -> Plan:
    """Plan every managed engine of *cfg* on *gpus* (NVML, then the ``gpus:`` key, when None)."""
    return build_plan(cfg, resolve_gpus(cfg) if gpus is None else gpus)


def plan_view(cfg: KibanConfig) -> dict[str, Any]:
    """``kiban plan --json`` of *cfg*, or why there is none: the console's plan panel."""
    if not any(e.launch is not None for e in cfg.engines):
        return {"engines": [], "devices": [], "note": "no engine has a launch section to plan"}
    try:
        return plan_dict(plan_config(cfg, None))
    except Exception as exc:  # the console shows why, the gateway goes on
        return {"engines": [], "devices": [], "error": f"{type(exc).__name__}: {exc}"}
