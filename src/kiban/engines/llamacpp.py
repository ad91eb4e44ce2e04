"""llama.cpp's native ``llama-server``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiban.engines.base import EngineKind, choice_gbnf
from kiban.structured.capability import CORE_FEATURES, SILENTLY_SKIPPED, StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig

#: what common/json-schema-to-grammar.cpp turns into grammar (llama.cpp as vendored
#: in llama-cpp-python 0.3.36). Patterns must be ^...$-anchored, else "accepting any
#: string" with only a warning; numeric bounds on integers only; string length not
#: beside pattern/format; additionalProperties defaults to false (stricter, still valid);
#: oneOf is generated as anyOf (seen letting a value matching two branches through).
LLAMACPP_FEATURES = CORE_FEATURES | frozenset(
    {
        "allOf",
        "allOf-multi",
        "prefixItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
LLAMACPP_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
#: common/chat.cpp, when the generated text does not parse as the chat format, e.g.
#: guided JSON cut off at max_tokens (answered as HTTP 500)
_UNPARSED_OUTPUT = "The model produced output that does not match the expected"


class LlamaCpp(EngineKind):
    """llama-server answers /health with 503 while the model loads, 200 when ready."""

    name = "llamacpp"

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """JSON Schema and GBNF grammars; no regex field. Whitespace is bounded by the
        converter itself (``space ::= | " " | "\\n" [ \\t]{0,20}``)."""
        kinds = frozenset({"json_schema", "json_object", "choice", "grammar"})
        return StructuredCapability(
            enforced=kinds,
            expressible=kinds,
            features=LLAMACPP_FEATURES,
            formats=LLAMACPP_FORMATS,
            skipped=SILENTLY_SKIPPED,
            describes=f"llama.cpp {config.version or 'server'}",
        )

    def structured_output_error(self, status: int, message: str) -> OutputFailure | None:
        if status == 500 and message.startswith(_UNPARSED_OUTPUT):
            return OutputFailure(
                "invalid_json",
                f"llama.cpp could not parse the model's output ({message}); guided JSON cut off "
                "at max_tokens looks like this",
            )
        return None

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """Top-level ``json_schema`` or ``grammar`` (tools/server/server-common.cpp).

        Not the README's ``response_format: {"type": "json_schema", "schema": ...}``:
        the server does not read that shape and generates unconstrained.
        """
        if constraint.kind == "json_schema":
            return {"json_schema": constraint.schema}
        if constraint.kind == "json_object":
            return {"json_schema": {"type": "object"}}
        if constraint.kind == "choice":
            return {"grammar": choice_gbnf(constraint.choices)}
        return {"grammar": constraint.grammar}
