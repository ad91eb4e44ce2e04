"""Verification failures are typed and say where (JSON pointer)."""

from __future__ import annotations

import orjson
import pytest

from kiban.structured.constraint import constraint_from_request
from kiban.structured.validator import CompiledSchema, SchemaError, json_pointer
from kiban.structured.verify import verify_content

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "a/b": {"type": "object", "properties": {"c~d": {"type": "integer", "minimum": 0}}},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name"],
    "additionalProperties": False,
}
C = constraint_from_request({"guided_json": SCHEMA})
V = CompiledSchema(SCHEMA)


def check(content: str | None, finish: str | None = "stop"):
    return verify_content(C, V, content, finish)


def test_valid() -> None:
    assert check('{"name": "Ann", "tags": ["x"], "email": "ann@example.com"}') is None


@pytest.mark.parametrize(
    ("doc", "pointer"),
    [
        ({"tags": []}, ""),
        ({"name": "A", "tags": ["x", 3]}, "/tags/1"),
        ({"name": "A", "a/b": {"c~d": -1}}, "/a~1b/c~0d"),
        ({"name": ""}, "/name"),
        ({"name": "A", "email": "not-an-email"}, "/email"),
    ],
)
def test_schema_violation_has_pointer(doc: dict, pointer: str) -> None:
    failure = check(orjson.dumps(doc).decode())
    assert failure is not None and failure.kind == "schema_violation"
    assert failure.pointer == pointer
    assert f"at {pointer or '(root)'}" in failure.message
    assert failure.code == "structured_output_schema_violation"


def test_extra_property_fails_at_root() -> None:
    failure = check('{"name": "A", "zzz": 1}')
    assert failure.kind == "schema_violation" and failure.pointer == ""
    assert "zzz" in failure.message


def test_invalid_json_not_truncated() -> None:
    failure = check('{"name": "A",}')
    assert failure.kind == "invalid_json"


def test_truncated_at_length_is_never_repaired() -> None:
    failure = check('{"name": "A", "tags": ["x"', "length")
    assert failure.kind == "truncated" and "max_tokens" in failure.message


def test_whitespace_runaway() -> None:
    failure = check('{"name": "A",' + " \n" * 200, "length")
    assert failure.kind == "whitespace_runaway"
    assert "whitespace" in failure.message


def test_valid_json_at_length_is_fine() -> None:
    assert check('{"name": "A"}', "length") is None


def test_no_content() -> None:
    assert check(None).kind == "no_content"
    assert check("", "length").kind == "truncated"


def test_json_object() -> None:
    c = constraint_from_request({"response_format": {"type": "json_object"}})
    assert verify_content(c, None, '{"a": 1}', "stop") is None
    assert verify_content(c, None, "[1]", "stop").kind == "not_an_object"


def test_choice_and_regex() -> None:
    choice = constraint_from_request({"guided_choice": ["yes", "no"]})
    assert verify_content(choice, None, "yes", "stop") is None
    assert verify_content(choice, None, "maybe", "stop").kind == "not_a_choice"
    regex = constraint_from_request({"guided_regex": r"\d{3}"})
    assert verify_content(regex, None, "123", "stop") is None
    assert verify_content(regex, None, "12a", "stop").kind == "regex_mismatch"


def test_grammar_only_checks_truncation() -> None:
    grammar = constraint_from_request({"guided_grammar": 'root ::= "a"'})
    assert verify_content(grammar, None, "a", "stop") is None
    assert verify_content(grammar, None, "a", "length").kind == "truncated"


def test_invalid_schema_and_offline_refs() -> None:
    with pytest.raises(SchemaError):
        CompiledSchema({"type": "nonsense"})
    with pytest.raises(SchemaError, match=r"example\.com"):
        CompiledSchema({"$ref": "https://example.com/schema.json"})


def test_json_pointer_escaping() -> None:
    assert json_pointer(["a/b", "c~d", 0]) == "/a~1b/c~0d/0"
    assert json_pointer([]) == ""
