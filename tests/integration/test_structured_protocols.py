"""kiban's lmdeploy and SGLang dialects, checked by the engines' own request code.

Each translated body is validated by the engine's ``ChatCompletionRequest`` (pinned
release, installed without dependencies) and turned into the engine's grammar input
by the engine's own code: every field must be known (an unknown one is silently
ignored by both) and the constraint must arrive as the one the client asked for.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from kiban.config import parse_config
from kiban.deploy.envs import EngineEnv
from kiban.gateway.routing import Router
from kiban.gateway.structured import StructuredService
from tests.support.protocol_env import check_in_engine_env, protocol_env

pytestmark = pytest.mark.slow  # left out of `make check`

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


@pytest.fixture(scope="module")
def env() -> EngineEnv:
    return protocol_env()


def translated(kind: str, request: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(
        {
            "engines": [{"name": "e", "kind": kind, "url": "http://127.0.0.1:9", "models": ["m"]}],
            "routes": [{"model": "m", "engines": ["e"]}],
        }
    )
    route = Router(cfg).route_for("m")
    payload = {**BASE, **request}
    prepared = StructuredService(cfg.routes).prepare(payload, route)
    return orjson.loads(prepared.body_for(payload, route.targets[0]))


def check(env: EngineEnv, engine: str, request: dict[str, Any]) -> dict[str, Any]:
    body = translated(engine, request)
    report = json.loads(check_in_engine_env(env, engine, json.dumps(body)))
    assert report["unknown_fields"] == [], f"{engine} would ignore {report['unknown_fields']}"
    return report


OPENAI_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
}


@pytest.mark.parametrize(
    ("request_form", "kind", "source"),
    [
        (OPENAI_SCHEMA, "json_schema", SCHEMA),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
        (
            {"response_format": {"type": "json_object"}},
            "json_schema",
            {"type": "object", "additionalProperties": True},
        ),
        ({"guided_regex": "[0-9]{3}"}, "regex_schema", "[0-9]{3}"),
        ({"guided_choice": ["yes", "no.", "a|b"]}, "regex_schema", r"(yes|no\.|a\|b)"),
    ],
)
def test_lmdeploy_reads_the_constraint(
    env: EngineEnv, request_form: dict, kind: str, source: Any
) -> None:
    report = check(env, "lmdeploy", request_form)
    assert report["constraint"]["kind"] == kind
    got = report["constraint"]["source"]
    assert (json.loads(got) if kind == "json_schema" else got) == source


@pytest.mark.parametrize(
    ("request_form", "field", "value", "budget"),
    [
        # the budget kiban gives a request without max_tokens: from the schema (at least
        # 256), the longest choice + 16, else 1024 (kiban.gateway.structured.default_budget)
        (OPENAI_SCHEMA, "json_schema", SCHEMA, 256),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA, 256),
        ({"response_format": {"type": "json_object"}}, "json_schema", {"type": "object"}, 1024),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+", 1024),
        ({"guided_choice": ["yes", "no"]}, "regex", "(yes|no)", 19),
        ({"guided_grammar": 'root ::= "a" | "b"'}, "ebnf", 'root ::= "a" | "b"', 1024),
    ],
)
def test_sglang_reads_the_constraint(
    env: EngineEnv, request_form: dict, field: str, value: Any, budget: int
) -> None:
    report = check(env, "sglang", request_form)
    assert list(report["constraint"]) == [field]
    got = report["constraint"][field]
    assert (json.loads(got) if field == "json_schema" else got) == value
    assert report["max_new_tokens"] == budget  # kiban bounded a request that gave no max_tokens


def test_engine_check_catches_a_field_the_engine_ignores(env: EngineEnv) -> None:
    """The check itself can fail: a vLLM-only field is unknown to lmdeploy's request model."""
    body = {**BASE, "structured_outputs": {"json": SCHEMA}}
    report = json.loads(check_in_engine_env(env, "lmdeploy", json.dumps(body)))
    assert report["unknown_fields"] == ["structured_outputs"]
    assert report["constraint"] is None
