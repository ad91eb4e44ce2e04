"""SGLang's ``sglang.launch_server``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiban.engines.base import EngineKind, choice_regex, openai_response_format
from kiban.structured.capability import (
    ALL_KINDS,
    SILENTLY_SKIPPED,
    XGRAMMAR_FEATURES,
    XGRAMMAR_FORMATS,
    StructuredCapability,
)
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig

#: the SGLang release whose ChatCompletionRequest
#: (sglang/srt/entrypoints/openai/protocol.py) the dialect is checked against in tests
PINNED_VERSION = "0.5.23"


class SGLang(EngineKind):
    """SGLang serves the OpenAI routes and GET /health."""

    name = "sglang"

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """The default grammar backend is xgrammar; its whitespace knob is ignored (#8250)."""
        return StructuredCapability(
            enforced=ALL_KINDS,
            expressible=ALL_KINDS,
            features=XGRAMMAR_FEATURES,
            formats=XGRAMMAR_FORMATS,
            skipped=SILENTLY_SKIPPED,
            describes=f"sglang {config.version or PINNED_VERSION} (xgrammar)",
        )

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """``response_format`` for JSON, top-level ``regex`` / ``ebnf`` otherwise.

        ``strict`` is always true: with ``strict: false`` SGLang leaves the
        schema to the chat template when the renderer handles response_format
        (``to_sampling_params``), i.e. unconstrained.
        """
        if constraint.kind == "regex":
            return {"regex": constraint.pattern}
        if constraint.kind == "choice":
            return {"regex": choice_regex(constraint.choices)}
        if constraint.kind == "grammar":
            return {"ebnf": constraint.grammar}
        return openai_response_format(constraint)
