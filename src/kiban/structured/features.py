"""Which JSON Schema features a schema uses, as a set of names.

A feature is a constraint keyword (``"minLength"``, ``"uniqueItems"``) or a
named combination that some engines cannot enforce even though they handle
each part alone (``"string-length+pattern"``, ``"allOf-multi"``). Annotations
(``title``, ``description``, ``examples`` ...) and unknown keywords constrain
nothing and are not features. Engines declare the features they enforce; the
difference is what a request would leave unenforced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import orjson

#: keywords whose value is one subschema
_SUBSCHEMA = (
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
#: keywords whose value is a list of subschemas
_SUBSCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
#: keywords whose value maps names to subschemas
_SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

#: keywords that constrain an instance (JSON Schema draft 4 to 2020-12)
CONSTRAINT_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "items",
        "prefixItems",
        "additionalItems",
        "unevaluatedItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "if",
        "then",
        "else",
        "$ref",
        "$dynamicRef",
        "$recursiveRef",
    }
)
#: the ``format`` values JSON Schema defines, which kiban's validator asserts; any other
#: name (``int32``, ``byte`` ...) is an annotation that constrains nothing
ASSERTED_FORMATS = frozenset(
    {
        "date",
        "date-time",
        "time",
        "duration",
        "email",
        "idn-email",
        "hostname",
        "idn-hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "iri",
        "iri-reference",
        "uuid",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
        "regex",
    }
)
_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
#: look-ahead, look-behind, word boundaries and back-references: beyond what the grammar
#: compilers turn into a token mask
_LOOKAROUND = re.compile(r"\(\?<?[=!]|(?:^|[^\\])(?:\\\\)*\\(?:[1-9bB]|k<)")

#: combined features (beyond plain keyword names)
COMBINED_FEATURES = frozenset(
    {
        "string-length+pattern",  # minLength/maxLength beside pattern or format
        "number-bounds",  # numeric bounds on a schema that is not integer-only
        "allOf-multi",  # allOf with two or more branches
        "properties+propertyNames",
        "properties+patternProperties",
        "patternProperties-multi",
        "pattern-unanchored",  # a pattern not written as ^...$
        "pattern-lookaround",  # look-ahead/-behind, \\b, a back-reference in a pattern
        "$ref-remote",  # a $ref that does not start with '#'
    }
)
#: features that constrain nothing but that a decoder may refuse to compile ("Unknown
#: format: byte" from llguidance): taken out for every engine, never "unenforced"
ANNOTATION_FEATURES = frozenset({"format-unknown"})


def schema_features(schema: Any) -> frozenset[str]:
    """Every feature *schema* uses (keywords, ``format:<name>``, combinations)."""
    return canonical_schema_features(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))


@lru_cache(maxsize=2048)
def canonical_schema_features(canonical: bytes) -> frozenset[str]:
    """:func:`schema_features` of a schema given as its sorted-keys JSON (cached)."""
    found: set[str] = set()
    _visit(orjson.loads(canonical), found)
    return frozenset(found)


def node_features(node: dict[str, Any]) -> set[str]:
    """The features one schema object uses itself (not those of its subschemas)."""
    found = set(node.keys() & CONSTRAINT_KEYWORDS)
    _combinations(node, found)
    return found


def subschemas(node: dict[str, Any]) -> Iterator[Any]:
    """The direct subschemas of one schema object (values that are not schemas included)."""
    for key in _SUBSCHEMA:
        if key in node:
            yield node[key]
    for key in _SUBSCHEMA_LIST:
        value = node.get(key)
        if isinstance(value, list):
            yield from value
    items = node.get("items")
    if isinstance(items, list):  # draft 4-2019 tuple form
        yield from items
    for key in _SUBSCHEMA_MAP:
        value = node.get(key)
        if isinstance(value, dict):
            yield from value.values()
    deps = node.get("dependencies")
    if isinstance(deps, dict):
        yield from deps.values()


def map_subschemas(node: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of *node* with *fn* applied to each direct subschema (what `subschemas` yields)."""
    out = dict(node)
    for key in _SUBSCHEMA:
        if key in out and not isinstance(out[key], list):
            out[key] = fn(out[key])
    for key in (*_SUBSCHEMA_LIST, "items"):
        if isinstance(out.get(key), list):
            out[key] = [fn(item) for item in out[key]]
    for key in (*_SUBSCHEMA_MAP, "dependencies"):
        if isinstance(out.get(key), dict):
            out[key] = {
                name: item if isinstance(item, list) else fn(item)
                for name, item in out[key].items()
            }
    return out


def _visit(node: Any, found: set[str]) -> None:
    if not isinstance(node, dict):
        return
    found |= node_features(node)
    for sub in subschemas(node):
        _visit(sub, found)


def _combinations(node: dict[str, Any], found: set[str]) -> None:
    fmt = node.get("format")
    if fmt in ASSERTED_FORMATS:
        found.add(f"format:{fmt}")
    elif fmt is not None:
        found.add("format-unknown")
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        found.add("string-length+pattern")
    if any(k in node for k in _NUMERIC_BOUNDS) and node.get("type") != "integer":
        found.add("number-bounds")
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        found.add("allOf-multi")
    if "properties" in node and "propertyNames" in node:
        found.add("properties+propertyNames")
    pattern_props = node.get("patternProperties")
    if isinstance(pattern_props, dict):
        if "properties" in node:
            found.add("properties+patternProperties")
        if len(pattern_props) > 1:
            found.add("patternProperties-multi")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        if not (pattern.startswith("^") and pattern.endswith("$")):
            found.add("pattern-unanchored")
        if _LOOKAROUND.search(pattern):
            found.add("pattern-lookaround")
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.add("$ref-remote")
