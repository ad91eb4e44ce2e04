"""llama.cpp's native ``llama-server``."""

from kiban.engines.base import EngineKind


class LlamaCpp(EngineKind):
    """llama-server answers /health with 503 while the model loads, 200 when ready."""

    name = "llamacpp"
