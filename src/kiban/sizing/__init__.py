"""Memory arithmetic the engines, the config and the planner share: a leaf package.

Units (``units``), model shapes (``specs``), KV-cache formats and bytes per token
(``kv``), per-engine overheads (``overhead``), the GPU and model catalogue
(``catalogue``, ``data/``), devices (``devices``), where an engine is planned
(``target``) and the plan's records (``plan``). It imports nothing else of kiban.
"""
