"""Engine dialects, capability declarations, refusal messages and config errors."""

from __future__ import annotations

import orjson
import pytest

from kiban.config import ConfigError, parse_config
from kiban.engines import ENGINE_KINDS
from kiban.gateway.errors import APIError
from kiban.gateway.routing import Router
from kiban.structured.features import schema_features
from kiban.structured.request import StructuredService

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def config(*engines: dict, structured: dict | None = None):
    route = {"model": "m", "engines": [e["name"] for e in engines]}
    if structured is not None:
        route["structured"] = structured
    return parse_config(
        {
            "engines": [{"url": "http://127.0.0.1:9", "models": ["m"], **e} for e in engines],
            "routes": [route],
        }
    )


def body_for(kind: str, payload: dict, **engine) -> dict:
    cfg = config({"name": "e", "kind": kind, **engine})
    router = Router(cfg)
    route = router.route_for("m")
    req = StructuredService(cfg.routes).prepare(payload, route)
    return orjson.loads(req.body_for(payload, route.targets[0]))


def test_features() -> None:
    schema = {
        "type": "object",
        "title": "ignored",
        "properties": {
            "s": {"type": "string", "pattern": "a", "maxLength": 3, "format": "email"},
            "n": {"type": "number", "minimum": 0},
            "i": {"type": "integer", "minimum": 0},
            "x": {"not": {"const": 1}},
        },
        "$defs": {"d": {"type": "array", "uniqueItems": True}},
    }
    f = schema_features(schema)
    assert {"pattern", "maxLength", "format:email", "string-length+pattern"} <= f
    assert {"number-bounds", "minimum", "not", "const", "uniqueItems"} <= f
    assert "pattern-unanchored" in f and "title" not in f


def test_vllm_current_and_previous_api() -> None:
    payload = {"model": "m", "guided_json": SCHEMA, "guided_whitespace_pattern": " "}
    current = body_for("vllm", payload)
    assert current["structured_outputs"] == {"json": SCHEMA}
    assert not any(k.startswith("guided_") for k in current)
    assert current["max_tokens"] == 1024  # bounded when the client gave none
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    old = body_for("vllm", {"model": "m", "response_format": rf, "max_tokens": 7}, version="0.8.5")
    assert old["guided_json"] == SCHEMA and "response_format" not in old
    assert old["max_tokens"] == 7
    choice = body_for("vllm", {"model": "m", "structured_outputs": {"choice": ["a", "b"]}})
    assert choice["structured_outputs"] == {"choice": ["a", "b"]}


def test_vllm_launch_args_limit_whitespace() -> None:
    vllm = ENGINE_KINDS["vllm"]
    cfg = config({"name": "e", "kind": "vllm", "options": {"structured_backend": "guidance"}})
    args = vllm.structured_launch_args(cfg.engines[0])
    assert args[0] == "--structured-outputs-config"
    assert orjson.loads(args[1]) == {"backend": "guidance", "disable_any_whitespace": True}
    old = config(
        {
            "name": "e",
            "kind": "vllm",
            "version": "0.9.2",
            "options": {"structured_backend": "xgrammar"},
        }
    ).engines[0]
    assert vllm.structured_launch_args(old) == [
        "--guided-decoding-backend",
        "xgrammar",
        "--guided-decoding-disable-any-whitespace",
    ]
    assert vllm.structured_launch_args(config({"name": "e", "kind": "vllm"}).engines[0]) == []


def test_llamacpp_uses_top_level_fields() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    body = body_for("llamacpp", {"model": "m", "response_format": rf})
    assert body["json_schema"] == SCHEMA and "response_format" not in body
    choice = body_for("llamacpp", {"model": "m", "guided_choice": ['say "hi"', "no"]})
    assert choice["grammar"] == 'root ::= "say \\"hi\\"" | "no"'


def test_lmdeploy_and_sglang_regex_forms() -> None:
    lm = body_for("lmdeploy", {"model": "m", "guided_choice": ["a.b", "c"]})
    assert lm["response_format"] == {"type": "regex_schema", "regex_schema": r"(a\.b|c)"}
    sg = body_for("sglang", {"model": "m", "guided_grammar": 'root ::= "a"'})
    assert sg["ebnf"] == 'root ::= "a"' and "guided_grammar" not in sg
    sg = body_for("sglang", {"model": "m", "guided_json": SCHEMA})
    assert sg["response_format"]["json_schema"]["strict"] is True


def refuse(kind: str, payload: dict, **route) -> APIError:
    cfg = config({"name": "e", "kind": kind}, structured=route or None)
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare(payload, r)
    with pytest.raises(APIError) as err:
        req.targets(r, r.targets)
    return err.value


def test_refusal_names_the_feature_and_engine() -> None:
    schema = {"type": "object", "properties": {"x": {"not": {"type": "null"}}}}
    err = refuse("vllm", {"guided_json": schema})
    assert err.status == 400 and err.code == "structured_output_unsupported"
    assert "cannot enforce not" in err.message and "vllm" in err.message
    assert err.param == "guided_json"
    err = refuse("llamacpp", {"guided_regex": "a+"})
    assert "constraint type regex" in err.message
    err = refuse("llamacpp", {"guided_json": {"type": "number", "minimum": 1}})
    assert "number-bounds" in err.message
    err = refuse("lmdeploy", {"guided_json": {"type": "array", "uniqueItems": True}})
    assert "uniqueItems" in err.message
    err = refuse("openai", {"guided_json": SCHEMA})
    assert "no enforcement assumed" in err.message
    assert "structured.unenforced: validate" in err.message


def test_validate_policy_uses_engines_that_only_accept() -> None:
    cfg = config({"name": "e", "kind": "openai"}, structured={"unenforced": "validate"})
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": SCHEMA}, r)
    assert [t.upstream.name for t in req.targets(r, r.targets)] == ["e"]
    # a regex cannot even be expressed to a generic server
    req = StructuredService(cfg.routes).prepare({"guided_regex": "a"}, r)
    with pytest.raises(APIError):
        req.targets(r, r.targets)


def test_retry_plan() -> None:
    cfg = config(
        {"name": "a", "kind": "vllm"}, {"name": "b", "kind": "vllm"}, structured={"retries": 2}
    )
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": SCHEMA}, r)
    assert [t.upstream.name for t in req.plan(r.targets, 3)] == ["a", "b", "a"]
    cfg = config(
        {"name": "a", "kind": "vllm"},
        {"name": "b", "kind": "vllm"},
        structured={"retries": 1, "retry_on": "same"},
    )
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": SCHEMA}, r)
    assert [t.upstream.name for t in req.plan(r.targets, 3)] == ["a", "a", "b"]


def test_extractor_route() -> None:
    cfg = config({"name": "e", "kind": "vllm"}, structured={"schema": SCHEMA, "name": "thing"})
    r = Router(cfg).route_for("m")
    service = StructuredService(cfg.routes)
    req = service.prepare({"messages": []}, r)
    assert req.constraint.schema == SCHEMA and req.constraint.name == "thing"
    assert service.prepare({"guided_json": SCHEMA}, r).constraint.key == req.constraint.key
    with pytest.raises(APIError, match="fixed schema"):
        service.prepare({"guided_json": {"type": "string"}}, r)


def test_invalid_client_schema_is_a_400() -> None:
    cfg = config({"name": "e", "kind": "vllm"})
    r = Router(cfg).route_for("m")
    with pytest.raises(APIError) as err:
        StructuredService(cfg.routes).prepare({"guided_json": {"type": 5}}, r)
    assert err.value.status == 400 and err.value.code == "invalid_json_schema"


@pytest.mark.parametrize(
    ("engine", "route", "expected"),
    [
        ({"version": "latest"}, None, "engines[0].version: expected a release number"),
        (
            {"options": {"structured_backend": "outlines"}},
            None,
            "engines[0].options.structured_backend: expected one of auto, xgrammar, guidance "
            "(got 'outlines')",
        ),
        ({"options": {"speed": "max"}}, None, "engines[0].options.speed: unknown option"),
        ({}, {"schema": {"type": 3}}, "routes[0].structured.schema: not a valid JSON Schema"),
        ({}, {"unenforced": "hope"}, "routes[0].structured.unenforced: expected one of"),
    ],
)
def test_config_errors_name_the_key(engine: dict, route: dict | None, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config({"name": "e", "kind": "vllm", **engine}, structured=route)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_llamacpp_unparsable_output_error_is_an_output_failure() -> None:
    llama = ENGINE_KINDS["llamacpp"]
    message = "The model produced output that does not match the expected peg-native format"
    failure = llama.structured_output_error(500, message)
    assert failure is not None and failure.kind == "invalid_json"
    assert llama.structured_output_error(500, "out of memory") is None
    assert ENGINE_KINDS["vllm"].structured_output_error(500, message) is None


def test_managed_vllm_is_launched_with_the_structured_backend(tmp_path) -> None:
    from kiban.deploy.launch import engine_command

    cfg = parse_config(
        {
            "engines": [
                {
                    "name": "v",
                    "kind": "vllm",
                    "models": ["m"],
                    "options": {"structured_backend": "xgrammar"},
                    "launch": {"model": "/models/m", "port": 18000, "device": "cpu"},
                }
            ],
            "routes": [{"model": "m", "engines": ["v"]}],
        }
    )
    argv = engine_command(cfg.engines[0], tmp_path).argv
    at = argv.index("--structured-outputs-config")
    assert orjson.loads(argv[at + 1]) == {"backend": "xgrammar", "disable_any_whitespace": True}
