"""SGLang's ``sglang.launch_server``."""

from kiban.engines.base import EngineKind


class SGLang(EngineKind):
    """SGLang serves the OpenAI routes and GET /health."""

    name = "sglang"
