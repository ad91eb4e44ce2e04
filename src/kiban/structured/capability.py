"""What an engine can enforce: constraint kinds and JSON Schema features.

Each engine module declares a :class:`StructuredCapability` for its version
and backend. ``expressible`` kinds can be sent in the engine's dialect at all;
``enforced`` kinds are also enforced by its guided decoding. For JSON Schema,
``features`` lists what the decoder enforces (None: everything it accepts,
because it refuses the rest itself with an error, as llguidance does), and
``skipped`` what it accepts without enforcing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiban.structured.constraint import Constraint
from kiban.structured.features import canonical_schema_features

ALL_KINDS = frozenset({"json_schema", "json_object", "regex", "choice", "grammar"})

#: features every grammar-based JSON Schema compiler enforces
CORE_FEATURES = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "anyOf",
        "$ref",
    }
)


@dataclass(frozen=True)
class StructuredCapability:
    """One engine's structured-output abilities, for its configured version and backend."""

    enforced: frozenset[str] = frozenset()
    expressible: frozenset[str] = frozenset()
    features: frozenset[str] | None = CORE_FEATURES
    formats: frozenset[str] | None = frozenset()  # None: any format name
    skipped: frozenset[str] = frozenset()  # features the decoder accepts but does not enforce
    describes: str = ""  # which engine/version/backend this states, for messages

    def can_enforce(self, constraint: Constraint) -> bool:
        return not self.unenforced(constraint)

    def unenforced(self, constraint: Constraint) -> list[str]:
        """What this engine would leave unenforced ([] when it enforces all of it)."""
        if constraint.kind not in self.enforced:
            return [f"constraint type {constraint.kind}"]
        if constraint.kind != "json_schema":
            return []
        missing = []
        features = canonical_schema_features(constraint.key.removeprefix(b"schema:"))
        for feature in sorted(features):
            if feature.startswith("format:"):
                if self.formats is not None and feature[7:] not in self.formats:
                    missing.append(feature)
            elif feature in self.skipped or (
                feature != "format" and self.features is not None and feature not in self.features
            ):
                missing.append(feature)
        return missing


#: JSON Schema features xgrammar (0.2.x) enforces, probed with
#: ``Grammar.from_json_schema`` + an accept test per keyword on xgrammar 0.2.8, minus
#: what vLLM's ``has_xgrammar_unsupported_json_features`` lists as unsupported
#: (multipleOf, uniqueItems, contains, length beside pattern/format, propertyNames or
#: patternProperties beside properties, several patternProperties, allOf with several
#: branches). Silently ignored by xgrammar, so never declared: not, if/then/else,
#: dependentRequired, dependentSchemas; minProperties fails to compile. oneOf is
#: compiled as anyOf (an instance matching two branches passes), so not declared.
XGRAMMAR_FEATURES = CORE_FEATURES | frozenset(
    {
        "allOf",
        "prefixItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "pattern-unanchored",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "number-bounds",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
    }
)
#: ``format`` values xgrammar turns into grammar (vLLM's STRING_SUPPORTED_FORMATS)
XGRAMMAR_FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
#: what no engine here enforces, and a schema-accepting decoder may silently skip
SILENTLY_SKIPPED = frozenset(
    {"not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies"}
)
