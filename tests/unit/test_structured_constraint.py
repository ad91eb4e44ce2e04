"""Every client form of structured output normalises to one Constraint."""

from __future__ import annotations

import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel

from kiban.api_errors import APIError
from kiban.structured.constraint import constraint_from_request, has_structured_fields

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class Person(BaseModel):
    name: str
    age: int


def test_openai_json_schema() -> None:
    c = constraint_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    )
    assert c is not None and c.kind == "json_schema" and c.schema == SCHEMA and c.name == "x"
    assert c.source == "response_format.json_schema.schema"


def test_what_the_openai_sdk_parse_sends() -> None:
    """The exact response_format that client.chat.completions.parse(response_format=Model) sends."""
    rf = type_to_response_format_param(Person)
    c = constraint_from_request({"response_format": rf})
    assert c is not None and c.kind == "json_schema" and c.name == "Person"
    assert set(c.schema["required"]) == {"name", "age"}
    assert c.schema["additionalProperties"] is False


def test_json_object_and_text() -> None:
    c = constraint_from_request({"response_format": {"type": "json_object"}})
    assert c.kind == "json_object"
    assert constraint_from_request({"response_format": {"type": "text"}}) is None
    assert constraint_from_request({"messages": []}) is None


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"guided_json": SCHEMA}, "json_schema"),
        ({"guided_json": '{"type": "integer"}'}, "json_schema"),
        ({"guided_regex": r"\d+"}, "regex"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar"),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema"),
        ({"structured_outputs": {"regex": "a+"}}, "regex"),
        ({"structured_outputs": {"choice": ["a"]}}, "choice"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar"),
        ({"structured_outputs": {"json_object": True}}, "json_object"),
        ({"json_schema": SCHEMA}, "json_schema"),
        ({"regex": "a+"}, "regex"),
        ({"ebnf": 'root ::= "a"'}, "grammar"),
    ],
)
def test_vllm_llamacpp_sglang_forms(payload: dict, kind: str) -> None:
    assert has_structured_fields(payload)
    c = constraint_from_request(payload)
    assert c is not None and c.kind == kind


def test_same_schema_same_key_whatever_the_form() -> None:
    a = constraint_from_request({"guided_json": SCHEMA})
    b = constraint_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}}
    )
    assert a.key == b.key


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type", "must be one of"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "required",
        ),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
        (
            {"structured_outputs": {"structural_tag": "{}"}},
            "structured_outputs.structural_tag",
            "not supported",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "only one",
        ),
    ],
)
def test_malformed_forms_name_the_field(payload: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as err:
        constraint_from_request(payload)
    assert err.value.status == 400
    assert err.value.param == param
    assert words in err.value.message
