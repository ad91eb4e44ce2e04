"""``plan_config(cfg)``: the entry point ``kiban plan`` and ``kiban up`` use.

The plan's records (:class:`~kiban.sizing.plan.Plan`, ``EnginePlan``, ``DevicePlan``)
live in the leaf :mod:`kiban.sizing.plan`, so engine modules can type against them
without importing the planner.
"""

from __future__ import annotations

from kiban.config import KibanConfig
from kiban.planning.fit import build_plan
from kiban.planning.inventory import resolve_gpus
from kiban.sizing.devices import GpuInfo
from kiban.sizing.plan import Plan


def plan_config(cfg: KibanConfig, gpus: list[GpuInfo] | None = None) -> Plan:
    """Plan every managed engine of *cfg* on *gpus* (NVML, then the ``gpus:`` key, when None)."""
    return build_plan(cfg, resolve_gpus(cfg) if gpus is None else gpus)
