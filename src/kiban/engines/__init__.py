"""Engine kinds: one module per engine, registered by name."""

from kiban.engines.base import EngineKind
from kiban.engines.llamacpp import LlamaCpp
from kiban.engines.lmdeploy import LMDeploy
from kiban.engines.openai_compat import OpenAICompatible
from kiban.engines.sglang import SGLang
from kiban.engines.vllm import VLLM

ENGINE_KINDS: dict[str, EngineKind] = {
    kind.name: kind() for kind in (VLLM, LMDeploy, LlamaCpp, SGLang, OpenAICompatible)
}

__all__ = ["ENGINE_KINDS", "EngineKind"]
