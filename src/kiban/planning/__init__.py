"""VRAM planning: model specs, KV-cache arithmetic, memory shares and engine flags.

``plan_config(cfg)`` plans every managed engine of a kiban.yaml; each
``EnginePlan`` carries its arithmetic and the ``flags``/``env`` that make the
engine allocate what the plan says (engine facts live in ``kiban.engines.<kind>``
under ``# -- planning --``).
"""

from kiban.planning.plan import DevicePlan, EnginePlan, Plan, plan_config

__all__ = ["DevicePlan", "EnginePlan", "Plan", "plan_config"]
