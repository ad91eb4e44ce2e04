"""Engine kinds: one module per engine, registered by name.

A new engine is one module that builds an :class:`EngineKind` named ``KIND``
and one line in :data:`_MODULES`.
"""

from kiban.engines import llamacpp, lmdeploy, openai_compat, sglang, vllm
from kiban.engines.kind import EngineKind

_MODULES = (
    vllm,
    lmdeploy,
    llamacpp,
    sglang,
    openai_compat,
)

ENGINE_KINDS: dict[str, EngineKind] = {module.KIND.name: module.KIND for module in _MODULES}

__all__ = ["ENGINE_KINDS", "EngineKind"]
