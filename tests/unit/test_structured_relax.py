"""What kiban sends an engine that enforces part of a schema, and after a runaway."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.structured.capability import StructuredCapability
from kiban.structured.features import schema_features
from kiban.structured.relax import bound_runaways, relax, string_bound, token_budget
from kiban.structured.validator import CompiledSchema
from kiban.structured.verify import open_value

DATA = Path(__file__).resolve().parent.parent / "data"
ENGINES = {
    "vllm auto": ("vllm", {}),
    "vllm guidance": ("vllm", {"structured_backend": "guidance"}),
    "vllm xgrammar": ("vllm", {"structured_backend": "xgrammar"}),
    "llama.cpp": ("llamacpp", {}),
    "lmdeploy": ("lmdeploy", {}),
    "sglang": ("sglang", {}),
}


def rows(name: str) -> list[dict[str, Any]]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def capability(label: str) -> StructuredCapability:
    kind, options = ENGINES[label]
    engine = {"name": "e", "kind": kind, "url": "http://127.0.0.1:9", "models": ["m"]}
    cfg = parse_config(
        {"engines": [{**engine, "options": options}], "routes": [{"model": "m", "engines": ["e"]}]}
    )
    return ENGINE_KINDS[kind].dialect.structured_capability(cfg.engines[0])


def unenforced(schema: Any, cap: StructuredCapability) -> list[str]:
    return sorted(f for f in schema_features(schema) if not cap.supports(f))


@pytest.mark.parametrize("step", [0, 1, 2])
@pytest.mark.parametrize("label", sorted(ENGINES))
def test_a_relaxed_schema_accepts_every_valid_instance(label: str, step: int) -> None:
    """The JSON Schema Test Suite's valid instances (569 schemas, drafts 2020-12 and 7) stay
    valid under each engine's relaxed schema, which uses only what the engine enforces."""
    cap = capability(label).narrowed(step)
    for row in rows("schema_test_cases.jsonl.gz"):
        relaxed = relax(row["schema"], cap.supports)
        assert unenforced(relaxed, cap) == [], row["id"]
        validator = CompiledSchema(relaxed)
        for instance in row["valid"]:
            assert validator.is_valid(instance), (row["id"], relaxed, instance)


@pytest.mark.parametrize("label", sorted(ENGINES))
def test_real_world_schemas_relax_to_what_the_engine_enforces(label: str) -> None:
    cap = capability(label)
    schemas = rows("schema_corpus.jsonl.gz") + rows("jsonschemabench_sample.jsonl.gz")
    for row in schemas:
        relaxed = relax(row["schema"], cap.supports)
        assert unenforced(relaxed, cap) == [], row["id"]
        CompiledSchema(relaxed)  # still a schema
        if not unenforced(row["schema"], cap):
            assert relaxed == row["schema"]  # nothing taken out of what is enforced


def test_relaxing_keeps_the_structure() -> None:
    schema = {
        "type": "object",
        "properties": {
            "price": {"type": "number", "exclusiveMinimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "id": {"oneOf": [{"type": "string", "format": "uri"}, {"type": "integer"}]},
            "size": {"type": "integer", "minimum": 1, "multipleOf": 2},
        },
        "required": ["price", "id"],
        "additionalProperties": False,
    }
    assert relax(schema, capability("llama.cpp").supports) == {
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "size": {"type": "integer", "minimum": 1},
        },
        "required": ["price", "id"],
        "additionalProperties": False,
    }


def test_all_of_branches_are_merged_or_the_largest_kept() -> None:
    supports = capability("vllm xgrammar").supports  # allOf with one branch only
    merged = relax(
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        },
        supports,
    )
    assert merged == {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    # additionalProperties beside another branch's properties: merging would change it
    closed = {"properties": {"a": {}}, "additionalProperties": False}
    larger = {"properties": {"b": {}}, "required": ["b"], "maxProperties": 3}
    kept = relax({"allOf": [closed, larger]}, supports)
    assert kept == {"allOf": [larger]}


def test_pattern_properties_leave_with_the_additional_properties_they_exempt() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "patternProperties": {"^x-": {"type": "string"}},
        "additionalProperties": False,
    }
    relaxed = relax(schema, capability("vllm xgrammar").supports)
    assert relaxed == {"type": "object", "properties": {"name": {"type": "string"}}}
    assert CompiledSchema(relaxed).is_valid({"name": "n", "x-y": "z"})


def test_after_a_runaway_strings_objects_and_open_values_are_bounded() -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "code": {"type": "string", "pattern": "^[A-Z]+$"},
            "short": {"type": "string", "maxLength": 5},
            "any": {},
            "count": {"type": "number"},
            "kind": {"enum": ["a", "b"]},
        },
        "required": ["title"],
    }
    bounded = bound_runaways(schema, 40, capability("llama.cpp").supports, integers=False)
    props = bounded["properties"]
    assert props["title"] == {"type": "string", "maxLength": 40}
    assert props["code"] == {"type": "string", "pattern": "^[A-Z]+$"}  # llama.cpp: not both
    assert props["short"] == {"type": "string", "maxLength": 5}
    assert props["any"] == {"type": ["string", "integer", "boolean", "null"], "maxLength": 40}
    assert props["count"] == {"type": "number"}
    assert props["kind"] == {"enum": ["a", "b"]}
    assert bounded["additionalProperties"] is False
    guidance = bound_runaways(schema, 40, capability("vllm guidance").supports, integers=True)
    assert guidance["properties"]["code"]["maxLength"] == 40
    assert guidance["properties"]["count"] == {
        "type": "integer",
        "minimum": -(10**15),
        "maximum": 10**15,
    }
    valid = {"title": "t", "code": "AB", "short": "s", "any": 1, "count": 3, "kind": "a"}
    for tightened in (bounded, guidance):
        assert CompiledSchema(tightened).is_valid(valid)
        assert CompiledSchema(schema).is_valid(valid)


def test_only_schemas_that_alone_decide_their_value_are_bounded() -> None:
    def bound(schema: dict) -> dict:
        return bound_runaways(schema, 10, lambda f: True, integers=True)

    required_elsewhere = {"type": "object", "properties": {"a": {}}, "required": ["b"]}
    assert "additionalProperties" not in bound(required_elsewhere)
    combined = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert bound(combined)["allOf"] == combined["allOf"]
    # a branch beside the properties it must allow (JSONSchemaBench Github_medium/o683)
    beside = {
        "type": "object",
        "properties": {"acres": {"type": "number"}},
        "required": ["acres"],
        "anyOf": [{"properties": {"price": {"type": "number"}}}],
    }
    assert bound(beside)["anyOf"] == beside["anyOf"]
    assert "additionalProperties" not in bound(beside)
    # alternatives that are the whole value are bounded, also through a $ref (pydantic)
    optional = {
        "type": "object",
        "properties": {"item": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]}},
        "$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    item = bound(optional)["$defs"]["Item"]
    assert item["additionalProperties"] is False
    assert item["properties"]["name"] == {"type": "string", "maxLength": 10}
    # a definition also used beside other keywords stays as it is
    shared = {**optional, "properties": {"item": {"$ref": "#/$defs/Item", "required": ["name"]}}}
    assert bound(shared)["$defs"] == optional["$defs"]


def test_string_bound_fits_the_budget() -> None:
    one = {"type": "object", "properties": {"text": {"type": "string"}}}
    assert string_bound(one, 512) == 256
    listed = {"type": "array", "items": {"type": "string"}}  # 4 items expected
    assert string_bound(listed, 512) == 64
    assert string_bound({"type": "integer"}, 512) == 256
    assert string_bound(one, 4) == 8  # never below 8 characters


def test_token_budget_grows_with_the_schema() -> None:
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    assert token_budget(small) == 256  # the floor
    wide = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string"} for i in range(12)},
    }
    assert 1000 < token_budget(wide) < 1600
    nested = {"type": "array", "items": wide}
    assert token_budget(nested) == 4096  # the ceiling
    recursive = {
        "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
        "$ref": "#/$defs/n",
    }
    assert token_budget(recursive) == 4096


@pytest.mark.parametrize(
    ("text", "inside"),
    [
        ('{"a": "unfinished', "string"),
        ('{"a": "esc\\"aped', "string"),
        ('{"a": 12.5e', "number"),
        ('{"a": "done", ', None),
        ('{"a": "back\\\\"', None),
    ],
)
def test_where_unfinished_json_was_cut_off(text: str, inside: str | None) -> None:
    assert open_value(text) == inside
