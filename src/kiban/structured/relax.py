"""The part of a JSON Schema an engine enforces, and string bounds after a runaway.

kiban sends each engine the largest part of a schema that engine enforces. What the
engine cannot enforce is taken out, so a decoder that would refuse it still compiles
the rest, and one that would skip it silently is not trusted with it. The structure
stays: types, properties, required, items, enums, ``$ref``. kiban then checks the
answer against the whole schema itself.

A relaxed schema accepts everything the original accepts: ``oneOf`` becomes ``anyOf``,
``prefixItems`` goes together with the ``items`` beside it, ``patternProperties``
together with the ``additionalProperties`` beside it, and ``allOf`` branches are merged
when they do not overlap, otherwise the branch with the most keywords is kept. So an
engine can still produce every valid answer.

After an answer ran away (cut off at ``max_tokens``), a retry bounds every string the
engine may bound with a ``maxLength`` worked out from the schema and the token budget,
closes objects to the properties they name, and after one cut off inside a number,
bounds the numbers (:func:`bound_runaways`). When a
client gives no ``max_tokens``, :func:`token_budget` estimates one from the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiban.structured.features import map_subschemas, node_features, subschemas

Supports = Callable[[str], bool]

_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_UNEVALUATED = ("unevaluatedProperties", "unevaluatedItems")
_PATTERN_PROPERTIES = (
    "patternProperties",
    "properties+patternProperties",
    "patternProperties-multi",
)
#: keywords that only describe: merging two allOf branches may keep either value
_ANNOTATIONS = frozenset(
    {"title", "description", "$comment", "examples", "default", "deprecated", "readOnly"}
)
#: keywords whose meaning depends on keywords beside them in the same object
_SIBLING_DEPENDENT = {
    "additionalProperties": ("properties", "patternProperties"),
    "unevaluatedProperties": ("properties", "patternProperties", "additionalProperties"),
    "items": ("prefixItems",),
    "additionalItems": ("items",),
    "unevaluatedItems": ("items", "prefixItems"),
    "then": ("if",),
    "else": ("if",),
    "minContains": ("contains",),
    "maxContains": ("contains",),
}


def relax(schema: Any, supports: Supports) -> Any:
    """*schema* without what ``supports(feature)`` says the engine does not enforce."""
    out = _relax(schema, supports)
    if out != schema:
        # unevaluated* see what every applicator evaluated, through $ref too: with any
        # of them changed, they could refuse what the original accepts
        out = _without(out, _UNEVALUATED)
    return out


def _relax(schema: Any, supports: Supports) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, lambda sub: _relax(sub, supports))
    for _ in range(64):  # one at a time: taking out a pattern ends string-length+pattern
        unsupported = sorted(f for f in node_features(out) if not supports(f))
        if not unsupported:
            break
        _take_out(out, unsupported[0], supports)
    return out


def _take_out(node: dict[str, Any], feature: str, supports: Supports) -> None:
    if feature == "oneOf":
        _one_of_as_any_of(node, supports)
    elif feature in ("allOf", "allOf-multi"):
        _merge_all_of(node, supports)
    elif feature == "string-length+pattern":
        _pop(node, "minLength", "maxLength")
    elif feature == "number-bounds":
        _pop(node, *_NUMERIC_BOUNDS)
    elif feature in ("properties+propertyNames", "propertyNames"):
        _pop(node, "propertyNames")
    elif feature in _PATTERN_PROPERTIES:
        # without them, additionalProperties would cover those names too: stricter
        _pop(node, "patternProperties", "additionalProperties")
    elif feature in ("pattern", "pattern-unanchored", "pattern-lookaround"):
        _pop(node, "pattern")
    elif feature.startswith("format"):
        _pop(node, "format")
    elif feature == "prefixItems":
        _pop(node, "prefixItems", "items")
    elif feature in ("items", "additionalItems"):
        _pop(node, "items", "additionalItems")
    elif feature in ("if", "then", "else"):
        _pop(node, "if", "then", "else")
    elif feature in ("contains", "minContains", "maxContains"):
        _pop(node, "contains", "minContains", "maxContains")
    elif feature in ("properties", "required"):
        _pop(node, "properties", "required", "additionalProperties", "unevaluatedProperties")
    else:
        node.pop(feature.removesuffix("-remote"), None)


def _without(schema: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, lambda sub: _without(sub, keys))
    _pop(out, *keys)
    return out


def _pop(node: dict[str, Any], *keys: str) -> None:
    for key in keys:
        node.pop(key, None)


def _one_of_as_any_of(node: dict[str, Any], supports: Supports) -> None:
    """``oneOf`` accepts a subset of what ``anyOf`` of the same branches accepts."""
    branches = node.pop("oneOf", None)
    if branches is None or not supports("anyOf"):
        return
    if "anyOf" not in node:
        node["anyOf"] = branches
    elif "allOf" not in node and supports("allOf"):
        node["allOf"] = [{"anyOf": branches}]


def _merge_all_of(node: dict[str, Any], supports: Supports) -> None:
    branches = node.pop("allOf", None)
    if not isinstance(branches, list) or not all(isinstance(b, dict) for b in branches):
        return
    merged = _merged([node, *branches])
    if merged is not None:
        node.clear()
        node.update(merged)
    elif supports("allOf") and branches:
        node["allOf"] = [max(branches, key=lambda b: len(node_features(b)))]


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One schema object meaning exactly what all of *parts* mean together, if simple to say."""
    parts = [p for p in parts if p]
    for index, part in enumerate(parts):
        others = set().union(*(p.keys() for i, p in enumerate(parts) if i != index))
        others -= _ANNOTATIONS
        if "$ref" in part and others:
            return None  # engines of draft 7 and before ignore the keywords beside a $ref
        for key, partners in _SIBLING_DEPENDENT.items():
            if key in part and others.intersection(partners):
                return None
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in out or out[key] == value or key in _ANNOTATIONS:
                out.setdefault(key, value)
            elif key == "required" and isinstance(value, list):
                out[key] = [*out[key], *(v for v in value if v not in out[key])]
            elif key == "properties" and isinstance(value, dict):
                if any(n in out[key] and out[key][n] != s for n, s in value.items()):
                    return None
                out[key] = {**out[key], **value}
            else:
                return None
    return out


# -- after a runaway -----------------------------------------------------------------------

_NUMBER_BOUND = 10**15
#: keywords that say which values a schema allows beyond one type's keywords
_TYPED_BY = frozenset(
    {"type", "enum", "const", "$ref", "$dynamicRef", "$recursiveRef"}
    | {"anyOf", "oneOf", "allOf", "not", "if"}
)
_OBJECT_KEYWORDS = frozenset(
    {
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
    }
)
_ARRAY_KEYWORDS = frozenset(
    {
        "items",
        "prefixItems",
        "additionalItems",
        "unevaluatedItems",
        "contains",
        "minItems",
        "maxItems",
        "uniqueItems",
    }
)
#: keywords that already say what other properties an object may have
_OPEN_ENDED = frozenset(
    {"additionalProperties", "patternProperties", "unevaluatedProperties", "propertyNames"}
    | {"allOf", "anyOf", "oneOf", "if", "$ref", "dependentSchemas", "dependencies"}
)
#: items an array is expected to hold, when the schema does not bound it
_ITEMS_GUESS = 4
#: share of the token budget the strings of an answer may take
_STRING_SHARE = 0.5


def string_bound(schema: Any, max_tokens: int) -> int:
    """A ``maxLength`` for every string such that all of them fit in half of *max_tokens*.

    A character is at most one token, so strings of this length cannot take the
    answer past its budget however the model tokenises them. Strings inside arrays
    count once per expected item; at least 8 characters.
    """
    weight = _string_weight(schema, 1.0, 0)
    return max(8, int(max_tokens * _STRING_SHARE / max(weight, 1.0)))


def _string_weight(node: Any, factor: float, depth: int) -> float:
    if not isinstance(node, dict) or depth > 32:
        return 0.0
    weight = factor if _is_string(node) and "enum" not in node and "const" not in node else 0.0
    items = node.get("items")
    if isinstance(items, dict):
        bound = node.get("maxItems")
        count = min(bound, _ITEMS_GUESS) if isinstance(bound, int) else _ITEMS_GUESS
        weight += _string_weight(items, factor * count, depth + 1)
    for sub in subschemas(node):
        if sub is not items:
            weight += _string_weight(sub, factor, depth + 1)
    return min(weight, 1e6)


def bound_runaways(schema: Any, max_length: int, supports: Supports, integers: bool) -> Any:
    """*schema* with what can run away bounded where the engine can bound it.

    - each string: ``maxLength`` at most *max_length*;
    - each object that names its properties and requires no others: no other
      properties (a model may otherwise add properties with names and values that
      never end);
    - each schema without a type: an object or an array when its keywords are about
      one, else (``{}``, ``true``, string keywords only) a string, integer, boolean or
      null, bounded as above;
    - with *integers* (after digits that never ended): each number without bounds of
      its own an integer within ±10^15 (a double holds integers exactly to 2^53;
      grammars allow fractions and exponents of any length).

    Only schemas that alone decide their value are bounded (a property's, an item's,
    a branch of an ``anyOf`` that is nothing else): one that shares its value with
    other keywords (an ``allOf`` branch, an ``anyOf`` beside ``properties``, a
    definition used so) could otherwise exclude every answer. Each answer the
    bounded schema accepts, the original accepts too.
    """
    defs_free = _refs_free(schema, True)
    return _bound(schema, True, _Bounds(max_length, supports, integers, defs_free))


class _Bounds:
    __slots__ = ("defs_free", "integers", "max_length", "supports")

    def __init__(self, max_length: int, supports: Supports, integers: bool, defs_free: bool):
        self.max_length, self.supports = max_length, supports
        self.integers, self.defs_free = integers, defs_free


#: subschemas that constrain another value than their parent's (a property, an item)
_OWN_VALUE = frozenset(
    {
        "properties",
        "patternProperties",
        "additionalProperties",
        "unevaluatedProperties",
        "items",
        "prefixItems",
        "additionalItems",
        "unevaluatedItems",
        "contains",
        "propertyNames",
    }
)
_ALTERNATIVES = ("anyOf", "oneOf")
#: keywords beside an anyOf that leave its branches alone deciding the value
_BESIDE_ALTERNATIVES = frozenset(
    {*_ALTERNATIVES, "$defs", "definitions", "$schema", "$id", "$comment", "title"}
    | {"description", "examples", "default"}
)


def _child_positions(node: dict[str, Any], free: bool, defs_free: bool) -> dict[str, bool]:
    """Whether each subschema keyword of *node* leads to schemas that alone decide a value."""
    alone = free and _BESIDE_ALTERNATIVES.issuperset(node)
    positions = {key: free for key in _OWN_VALUE}  # another branch may say more of it
    positions |= {key: alone for key in _ALTERNATIVES}
    positions |= {"$defs": defs_free, "definitions": defs_free}
    return positions


def _refs_free(node: Any, free: bool) -> bool:
    """Whether every ``$ref`` stands alone where it is (then definitions decide values)."""
    if not isinstance(node, dict):
        return True
    if "$ref" in node and not (free and _BESIDE_ALTERNATIVES.issuperset(node.keys() - {"$ref"})):
        return False
    positions = _child_positions(node, free, True)
    for key, value in node.items():
        for sub in _children(key, value):
            if not _refs_free(sub, positions.get(key, False)):
                return False
    return True


def _children(key: str, value: Any) -> list[Any]:
    if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        return list(value.values()) if isinstance(value, dict) else []
    if isinstance(value, list):
        return value if key in ("allOf", "anyOf", "oneOf", "prefixItems", "items") else []
    if key in _OWN_VALUE or key in ("not", "if", "then", "else"):
        return [value]
    return []


def _bound(node: Any, free: bool, bounds: _Bounds) -> Any:
    if node is True and free:
        node = {}
    if not isinstance(node, dict):
        return node
    positions = _child_positions(node, free, bounds.defs_free)
    out = dict(node)
    for key, value in node.items():
        at = positions.get(key, False)
        if key in ("properties", "patternProperties", "$defs", "definitions"):
            if isinstance(value, dict):
                out[key] = {name: _bound(sub, at, bounds) for name, sub in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") or (
            key == "items" and isinstance(value, list)
        ):
            if isinstance(value, list):
                out[key] = [_bound(sub, at, bounds) for sub in value]
        elif key in _OWN_VALUE or key in ("not", "if", "then", "else"):
            out[key] = _bound(value, at, bounds)
    if free and "enum" not in out and "const" not in out:
        _bound_value(out, bounds)
    return out


def _bound_value(node: dict[str, Any], bounds: _Bounds) -> None:
    supports = bounds.supports
    if not _TYPED_BY.intersection(node):
        _give_type(node, supports)
    if _is_string(node):
        _bound_length(node, bounds.max_length, supports)
    unbounded = not any(k in node for k in (*_NUMERIC_BOUNDS, "multipleOf"))
    kind = node.get("type")
    if bounds.integers and unbounded and kind in ("number", "integer") and supports("minimum"):
        node.update(type="integer", minimum=-_NUMBER_BOUND, maximum=_NUMBER_BOUND)
    properties = node.get("properties")
    if isinstance(properties, dict) and not _OPEN_ENDED.intersection(node):
        required = node.get("required", [])
        if isinstance(required, list) and all(name in properties for name in required):
            node["additionalProperties"] = False


def _give_type(node: dict[str, Any], supports: Supports) -> None:
    """A type for a schema without one: the type its keywords are about, else a scalar."""
    objects, arrays = bool(_OBJECT_KEYWORDS.intersection(node)), bool(_ARRAY_KEYWORDS & node.keys())
    if objects != arrays:
        node["type"] = "object" if objects else "array"
    elif not objects:
        node["type"] = ["string", "integer", "boolean", "null"]
        if supports("number-bounds"):
            node.update(minimum=-_NUMBER_BOUND, maximum=_NUMBER_BOUND)


def _bound_length(node: dict[str, Any], max_length: int, supports: Supports) -> None:
    if not supports("maxLength"):
        return
    if ("pattern" in node or "format" in node) and not supports("string-length+pattern"):
        return
    current = node.get("maxLength")
    minimum = node.get("minLength", 0)
    if isinstance(minimum, int) and (not isinstance(current, int) or current > max_length):
        node["maxLength"] = max(max_length, minimum)


def _is_string(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


# -- without max_tokens ----------------------------------------------------------------------

#: tokens assumed for a string the schema does not bound
_STRING_GUESS = 48


def token_budget(schema: Any, low: int = 256, high: int = 4096) -> int:
    """``max_tokens`` for a request that gave none: twice the tokens a typical answer
    takes (every property present, arrays of a few items, unbounded strings of about
    40 words), within [*low*, *high*]."""
    estimate = _tokens(schema, schema, 0)
    return int(min(max(2 * estimate + 32, low), high))


def _tokens(node: Any, root: Any, depth: int) -> float:
    if not isinstance(node, dict) or depth > 12:
        return 4.0
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        return _tokens(_resolve(root, ref), root, depth + 1)
    for key in ("anyOf", "oneOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            return max(_tokens(b, root, depth + 1) for b in branches)
    if "enum" in node or "const" in node:
        values = node.get("enum") or [node.get("const")]
        return max(len(str(v)) for v in values) / 3 + 2
    kind = node.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    properties = node.get("properties")
    if kind == "object" or isinstance(properties, dict):
        props = properties if isinstance(properties, dict) else {}
        return 2 + sum(len(name) / 3 + 2 + _tokens(s, root, depth + 1) for name, s in props.items())
    if kind == "array" or "items" in node:
        bound = node.get("maxItems")
        count = min(bound, _ITEMS_GUESS) if isinstance(bound, int) else _ITEMS_GUESS
        return 2 + count * (1 + _tokens(node.get("items"), root, depth + 1))
    if kind == "string":
        bound = node.get("maxLength")
        return 2 + (min(bound, 4 * _STRING_GUESS) / 4 if isinstance(bound, int) else _STRING_GUESS)
    return 4.0


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref.lstrip("#").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
