"""lmdeploy's ``lmdeploy serve api_server``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiban.engines.base import EngineKind, choice_regex, openai_response_format
from kiban.structured.capability import (
    SILENTLY_SKIPPED,
    XGRAMMAR_FEATURES,
    XGRAMMAR_FORMATS,
    StructuredCapability,
)
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig

#: the lmdeploy release whose request model (lmdeploy/serve/openai/protocol.py) the
#: dialect below is checked against in tests
PINNED_VERSION = "0.18.0"


class LMDeploy(EngineKind):
    """lmdeploy errors come as ``{"object": "error", "message": ..., "code": ...}``;
    the base class maps that shape to the OpenAI one."""

    name = "lmdeploy"

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """xgrammar for both engines since v0.10.2; ``json_object`` since v0.11.0.

        ``ResponseFormat.type`` is text, json_object, json_schema or regex_schema
        (an lmdeploy extension): no choice (sent as a regex), no grammar. The
        schema goes to xgrammar's ``compile_json_schema`` with its defaults (any
        whitespace: no knob), without vLLM's pre-check, so only what xgrammar
        enforces is declared. v0.18 compiles the format before queueing the
        request (``ensure_response_format_compilable``) and answers an error;
        TurboMind before it logged the compile error and ran unconstrained.
        """
        kinds = frozenset({"json_schema", "json_object", "regex", "choice"})
        return StructuredCapability(
            enforced=kinds,
            expressible=kinds,
            features=XGRAMMAR_FEATURES,
            formats=XGRAMMAR_FORMATS,
            skipped=SILENTLY_SKIPPED,
            describes=f"lmdeploy {config.version or PINNED_VERSION} (xgrammar)",
        )

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        if constraint.kind == "regex":
            return {"response_format": {"type": "regex_schema", "regex_schema": constraint.pattern}}
        if constraint.kind == "choice":
            pattern = choice_regex(constraint.choices)
            return {"response_format": {"type": "regex_schema", "regex_schema": pattern}}
        return openai_response_format(constraint)
