"""lmdeploy's ``lmdeploy serve api_server``."""

from kiban.engines.base import EngineKind


class LMDeploy(EngineKind):
    """lmdeploy errors come as ``{"object": "error", "message": ..., "code": ...}``;
    the base class maps that shape to the OpenAI one."""

    name = "lmdeploy"
