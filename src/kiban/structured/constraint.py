"""Every way a client asks for structured output, normalised into one :class:`Constraint`.

Accepted request forms (exactly one per request):

- OpenAI ``response_format``: ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}`` (what ``client.chat.completions.parse(response_format=Model)`` sends),
  ``{"type": "json_object"}``, ``{"type": "text"}`` (no constraint);
- vLLM ``structured_outputs``: one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``; and vLLM's earlier ``guided_json``, ``guided_regex``,
  ``guided_choice``, ``guided_grammar``;
- the top-level fields of llama.cpp (``json_schema``, ``grammar``) and SGLang
  (``regex``, ``ebnf``).

Each engine module then writes the constraint back in its own dialect, so a
field one engine would silently ignore never reaches it untranslated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from kiban import api_errors as errors
from kiban.api_errors import APIError

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

#: request fields that carry (or tune) a constraint; removed before translation
STRUCTURED_KEYS = frozenset(
    {
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "guided_decoding_backend",
        "json_schema",
        "regex",
        "ebnf",
        "grammar",
    }
)
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True, slots=True)
class Constraint:
    """One structured-output constraint, independent of the request form it came in."""

    kind: ConstraintKind
    source: str  # the request field it came from, for error messages ("response_format")
    schema: Any = None  # json_schema: the JSON Schema (a dict, or a boolean schema)
    name: str = "response"  # json_schema: the name OpenAI's form carries
    pattern: str | None = None  # regex
    choices: tuple[str, ...] = ()  # choice
    grammar: str | None = None  # grammar text, in the engine's own grammar language
    #: canonical identity for caches; for json_schema ``b"schema:"`` + sorted-keys JSON
    key: bytes = field(default=b"", compare=False)

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object")


def has_structured_fields(payload: dict[str, Any]) -> bool:
    """Cheap test for the hot path: does the request carry any structured field at all?"""
    return not STRUCTURED_KEYS.isdisjoint(payload)


def constraint_from_request(payload: dict[str, Any]) -> Constraint | None:
    """The one constraint a request asks for, or None (``response_format`` text or nothing).

    Raises a 400 :class:`APIError` naming the field when a form is malformed or
    when several constraints are given.
    """
    found: list[Constraint] = []
    rf = payload.get("response_format")
    if rf is not None:
        c = _from_response_format(rf)
        if c is not None:
            found.append(c)
    so = payload.get("structured_outputs")
    if so is not None:
        found.append(_from_structured_outputs(so))
    for name, kind in (
        ("guided_json", "json_schema"),
        ("json_schema", "json_schema"),
        ("guided_regex", "regex"),
        ("regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
        ("grammar", "grammar"),
        ("ebnf", "grammar"),
    ):
        value = payload.get(name)
        if value is not None:
            found.append(_simple(kind, value, name))
    if len(found) > 1:
        raise errors.multiple_constraints([c.source for c in found], found[1].source)
    return found[0] if found else None


def json_schema_constraint(
    schema: Any, name: str = "response", source: str = "route"
) -> Constraint:
    """A json_schema constraint built from a schema kiban holds (an ``extractor`` route)."""
    return _json(schema, name, source)


def _from_response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", "response_format", key=b"json_object")
    if kind == "json_schema":
        wrapper = rf.get("json_schema")
        if not isinstance(wrapper, dict):
            raise _bad(
                "response_format.json_schema",
                "is required for type 'json_schema': an object with 'name' and 'schema'",
            )
        if "schema" not in wrapper:
            raise _bad("response_format.json_schema.schema", "is required")
        name = wrapper.get("name")
        return _json(
            wrapper["schema"],
            name if isinstance(name, str) and name else "response",
            "response_format.json_schema.schema",
        )
    raise _bad(
        "response_format.type",
        f"must be one of text, json_object, json_schema (got {kind!r})",
    )


def _from_structured_outputs(so: Any) -> Constraint:
    if not isinstance(so, dict):
        raise _bad("structured_outputs", "must be an object")
    present = [k for k in _SO_KINDS if so.get(k) is not None]
    if len(present) != 1:
        raise _bad(
            "structured_outputs",
            f"must set exactly one of {', '.join(_SO_KINDS)} (got {', '.join(present) or 'none'})",
        )
    kind = present[0]
    where = f"structured_outputs.{kind}"
    if kind == "structural_tag":
        raise errors.unsupported_constraint(where)
    if kind == "json_object":
        if so[kind] is not True:
            raise _bad(where, "must be true when set")
        return Constraint("json_object", where, key=b"json_object")
    mapped = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
    return _simple(mapped[kind], so[kind], where)


def _simple(kind: str, value: Any, where: str) -> Constraint:
    if kind == "json_schema":
        return _json(value, "response", where)
    if kind == "regex":
        if not isinstance(value, str):
            raise _bad(where, "must be a string (a regular expression)")
        return Constraint("regex", where, pattern=value, key=b"regex:" + value.encode())
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise _bad(where, "must be a non-empty list of strings")
        choices = tuple(value)
        return Constraint("choice", where, choices=choices, key=b"choice:" + orjson.dumps(choices))
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, "must be a non-empty grammar string")
    return Constraint("grammar", where, grammar=value, key=b"grammar:" + value.encode())


def _json(schema: Any, name: str, where: str) -> Constraint:
    if isinstance(schema, str):  # guided_json and llama.cpp accept the schema as a JSON string
        try:
            schema = orjson.loads(schema)
        except orjson.JSONDecodeError as err:
            raise _bad(where, f"is a string that is not valid JSON: {err}") from None
    if not isinstance(schema, (dict, bool)):
        raise _bad(where, "must be a JSON Schema (an object)")
    try:
        key = b"schema:" + orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError as err:  # orjson serialises 254 levels of nesting at most
        raise _bad(where, f"cannot be used: {err} (nested too deeply)") from None
    return Constraint("json_schema", where, schema=schema, name=name, key=key)


def _bad(param: str, problem: str) -> APIError:
    return errors.invalid_response_format(param, problem)
