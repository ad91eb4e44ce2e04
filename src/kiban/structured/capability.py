"""What an engine can enforce: constraint kinds and JSON Schema features.

Each engine module declares a :class:`StructuredCapability` for its version
and backend. ``expressible`` kinds can be sent in the engine's dialect at all;
``enforced`` kinds are also enforced by its guided decoding. For JSON Schema,
``features`` lists what the decoder enforces, ``formats`` the ``format`` values
it turns into grammar, and ``skipped`` what it accepts without enforcing. What
an engine does not enforce, kiban relaxes out of the schema it sends there
(:mod:`kiban.structured.relax`) and checks itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiban.structured.constraint import Constraint
from kiban.structured.features import ANNOTATION_FEATURES, canonical_schema_features

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

#: features a decoder compiles through regular expressions, or may refuse for the
#: branches' sake (``oneOf``): the first to leave when an engine refuses a schema
REGEX_FEATURES = frozenset(
    {
        "oneOf",
        "pattern",
        "pattern-unanchored",
        "string-length+pattern",
        "patternProperties",
        "properties+patternProperties",
        "patternProperties-multi",
        "propertyNames",
        "properties+propertyNames",
    }
)


@dataclass(frozen=True)
class StructuredCapability:
    """One engine's structured-output abilities, for its configured version and backend."""

    enforced: frozenset[str] = frozenset()
    expressible: frozenset[str] = frozenset()
    features: frozenset[str] = CORE_FEATURES
    formats: frozenset[str] = frozenset()
    skipped: frozenset[str] = frozenset()  # features the decoder accepts but does not enforce
    describes: str = ""  # which engine/version/backend this states, for messages

    def can_enforce(self, constraint: Constraint) -> bool:
        return not self.unenforced(constraint)

    def supports(self, feature: str) -> bool:
        """Whether the decoder enforces one JSON Schema feature (a name from features.py)."""
        if feature.startswith("format:"):
            return feature[7:] in self.formats
        if feature in self.skipped:
            return False
        return feature == "format" or feature in self.features

    def narrowed(self, step: int) -> StructuredCapability:
        """What to rely on after the engine refused a schema *step* times: first no
        regular expressions, ``format`` or ``oneOf`` (what decoders most often fail to
        compile), then the core structure only."""
        if step <= 0:
            return self
        features = self.features - REGEX_FEATURES if step == 1 else self.features & CORE_FEATURES
        return replace(self, features=features, formats=frozenset())

    def unenforced(self, constraint: Constraint) -> list[str]:
        """What this engine would leave unenforced ([] when it enforces all of it)."""
        if constraint.kind not in self.enforced:
            return [f"constraint type {constraint.kind}"]
        if constraint.kind != "json_schema":
            return []
        features = canonical_schema_features(constraint.key.removeprefix(b"schema:"))
        features -= ANNOTATION_FEATURES
        return [feature for feature in sorted(features) if not self.supports(feature)]


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

#: what llguidance (1.7.6, the one vLLM 0.32 installs) compiles from a JSON Schema, probed
#: with ``LLMatcher.grammar_from_json_schema`` + ``validate_grammar`` per keyword. It raises
#: "Unimplemented keys" for propertyNames, dependentRequired, dependentSchemas,
#: dependencies, unevaluatedProperties/Items, uniqueItems (even false), contains,
#: min/maxContains, not, if/then/else and $dynamicRef; no look-around in patterns. oneOf
#: compiles only when it can prove the branches disjoint ("oneOf constraints are not
#: supported" otherwise): declared, and relaxed to anyOf when the engine refuses it.
GUIDANCE_FEATURES = CORE_FEATURES | frozenset(
    {
        "oneOf",
        "allOf",
        "allOf-multi",
        "prefixItems",
        "additionalItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "pattern-unanchored",
        "string-length+pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "number-bounds",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "properties+patternProperties",
        "patternProperties-multi",
    }
)
#: ``format`` values llguidance 1.7.6 turns into grammar (others: "Unknown format")
GUIDANCE_FORMATS = frozenset(
    {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri"}
)


def xgrammar(describes: str, kinds: frozenset[str] = ALL_KINDS) -> StructuredCapability:
    """What an engine enforces through xgrammar (vLLM's xgrammar backend, SGLang, lmdeploy):
    *kinds* of constraint, xgrammar's keywords and formats, less what it skips silently."""
    return StructuredCapability(
        enforced=kinds,
        expressible=kinds,
        features=XGRAMMAR_FEATURES,
        formats=XGRAMMAR_FORMATS,
        skipped=SILENTLY_SKIPPED,
        describes=describes,
    )
