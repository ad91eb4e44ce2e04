"""The VRAM planner: fit models and KV caches on devices, render the plan, the quick table.

``kiban.planning.plan.plan_config(cfg)`` plans every managed engine of a kiban.yaml.
The arithmetic it uses (units, model specs, KV layouts, overheads, the GPU catalogue,
the plan's records) is the leaf package :mod:`kiban.sizing`; engine facts live in
``kiban.engines.<kind>`` under ``# -- planning --``.
"""
