"""Engine dialects, capability declarations, refusal messages and config errors."""

from __future__ import annotations

import orjson
import pytest

from kiban.api_errors import APIError
from kiban.config import ConfigError, parse_config
from kiban.engines import ENGINE_KINDS
from kiban.engines.vllm import structured_backend
from kiban.gateway.routing import Router
from kiban.gateway.structured import StructuredService
from kiban.structured.features import schema_features
from kiban.structured.relax import token_budget
from kiban.structured.verify import OutputFailure

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
    assert current["max_tokens"] == token_budget(SCHEMA)  # bounded when the client gave none
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    old = body_for("vllm", {"model": "m", "response_format": rf, "max_tokens": 7}, version="0.8.5")
    assert old["guided_json"] == SCHEMA and "response_format" not in old
    assert old["max_tokens"] == 7
    choice = body_for("vllm", {"model": "m", "structured_outputs": {"choice": ["a", "b"]}})
    assert choice["structured_outputs"] == {"choice": ["a", "b"]}


def test_vllm_launch_args_limit_whitespace() -> None:
    vllm = ENGINE_KINDS["vllm"]
    cfg = config({"name": "e", "kind": "vllm", "options": {"structured_backend": "guidance"}})
    args = vllm.launch().structured_args(cfg.engines[0])
    assert args == [
        "--structured-outputs-config.backend",
        "guidance",
        "--structured-outputs-config.disable_any_whitespace",
        "true",
    ]
    old = config(
        {
            "name": "e",
            "kind": "vllm",
            "version": "0.9.2",
            "options": {"structured_backend": "xgrammar"},
        }
    ).engines[0]
    assert vllm.launch().structured_args(old) == [
        "--guided-decoding-backend",
        "xgrammar",
        "--guided-decoding-disable-any-whitespace",
    ]
    assert vllm.launch().structured_args(config({"name": "e", "kind": "vllm"}).engines[0]) == []


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


def test_refuse_policy_names_the_feature_and_engine() -> None:
    schema = {"type": "object", "properties": {"x": {"not": {"type": "null"}}}}
    err = refuse("vllm", {"guided_json": schema}, unenforced="refuse")
    assert err.status == 400 and err.code == "structured_output_unsupported"
    assert "cannot enforce not" in err.message and "vllm" in err.message
    assert err.param == "guided_json"
    number = {"guided_json": {"type": "number", "minimum": 1}}
    assert "number-bounds" in refuse("llamacpp", number, unenforced="refuse").message
    unique = {"guided_json": {"type": "array", "uniqueItems": True}}
    assert "uniqueItems" in refuse("lmdeploy", unique, unenforced="refuse").message
    err = refuse("openai", {"guided_json": SCHEMA}, unenforced="refuse")
    assert "no enforcement assumed" in err.message
    assert "structured.unenforced: validate" in err.message


def test_what_no_engine_can_express_is_refused_by_default() -> None:
    err = refuse("llamacpp", {"guided_regex": "a+"})
    assert err.code == "structured_output_unsupported"
    assert "constraint type regex" in err.message
    # kiban cannot check a grammar, so an engine that does not enforce one never gets it
    err = refuse("openai", {"guided_grammar": 'root ::= "a"'})
    assert "constraint type grammar" in err.message


def test_validate_policy_uses_engines_that_only_accept() -> None:
    cfg = config({"name": "e", "kind": "openai"})
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": SCHEMA}, r)
    assert [t.engine.name for t in req.targets(r, r.targets)] == ["e"]
    req.body_for({"guided_json": SCHEMA}, r.targets[0])
    assert req.how == "validated"
    # a regex cannot even be expressed to a generic server
    req = StructuredService(cfg.routes).prepare({"guided_regex": "a"}, r)
    with pytest.raises(APIError):
        req.targets(r, r.targets)


def test_engines_are_ranked_by_what_they_enforce() -> None:
    cfg = config(
        {"name": "generic", "kind": "openai"},
        {"name": "llama", "kind": "llamacpp"},
        {"name": "vllm", "kind": "vllm", "options": {"structured_backend": "guidance"}},
    )
    r = Router(cfg).route_for("m")
    schema = {"type": "object", "properties": {"n": {"type": "number", "minimum": 0}}}
    req = StructuredService(cfg.routes).prepare({"guided_json": schema}, r)
    assert [t.engine.name for t in req.targets(r, r.targets)] == ["vllm", "llama", "generic"]


def test_partial_enforcement_sends_the_relaxed_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "number", "minimum": 0},
            "tag": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        },
        "required": ["n"],
    }
    cfg = config({"name": "e", "kind": "llamacpp"})
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": schema}, r)
    body = orjson.loads(req.body_for({"guided_json": schema}, r.targets[0]))
    assert body["json_schema"] == {
        "type": "object",
        "properties": {
            "n": {"type": "number"},
            "tag": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        },
        "required": ["n"],
    }
    assert req.how == "validated"
    plain = StructuredService(cfg.routes).prepare({"guided_json": SCHEMA}, r)
    assert orjson.loads(plain.body_for({}, r.targets[0]))["json_schema"] == SCHEMA
    assert plain.how == "enforced"


def failed(kind: str, runaway: str | None = None) -> OutputFailure:
    return OutputFailure(kind, "", runaway=runaway)


def plan_of(*engines: dict, payload: dict | None = None, **structured):
    cfg = config(*engines, structured=structured or None)
    r = Router(cfg).route_for("m")
    payload = payload or {"guided_json": SCHEMA}
    req = StructuredService(cfg.routes).prepare(payload, r)
    targets = req.targets(r, r.targets)
    clock = [0.0]
    plan = req.attempts(targets, 3, deadline=100.0, clock=lambda: clock[0])
    return req, plan, clock


def walk(req, plan, payload: dict, outcomes: list) -> list[str]:
    """Run *plan*, each attempt failing as the next of *outcomes* says; engines tried."""
    tried = []
    for target, (reason, kind) in zip(plan, outcomes, strict=False):
        req.body_for(payload, target)
        tried.append(target.engine.name)
        output = failed(kind) if kind else None
        if not plan.record(target.engine.name, reason, output):
            break
    return tried


def test_retries_rotate_among_the_best_enforcing_engines() -> None:
    a, b = {"name": "a", "kind": "vllm"}, {"name": "b", "kind": "vllm"}
    req, plan, _ = plan_of(a, b)
    invalid = ("invalid_output", "schema_violation")
    assert walk(req, plan, {}, [invalid] * 5) == ["a", "b", "a"]  # 1 + retries (2)
    req, plan, _ = plan_of(a, b, retries=1, retry_on="same")
    assert walk(req, plan, {}, [invalid] * 5) == ["a", "a"]
    req, plan, _ = plan_of(a, b)
    assert walk(req, plan, {}, [("connect", None), invalid, invalid]) == ["a", "b", "b"]


def test_a_retry_goes_to_an_engine_that_enforces_more() -> None:
    llama, vllm = {"name": "llama", "kind": "llamacpp"}, {"name": "vllm", "kind": "vllm"}
    schema = {"type": "number", "minimum": 1.5}
    payload = {"guided_json": schema}
    req, plan, _ = plan_of(llama, vllm, payload=payload, retries=1)
    invalid = ("invalid_output", "schema_violation")
    assert walk(req, plan, payload, [invalid, invalid]) == ["vllm", "vllm"]
    req, plan, _ = plan_of(llama, vllm, payload=payload, retries=1)
    assert walk(req, plan, payload, [("timeout", None), invalid]) == ["vllm", "llama"]


def test_a_refused_schema_is_sent_again_with_less_enforced() -> None:
    schema = {"type": "string", "pattern": "^a+$", "format": "email", "minLength": 2}
    payload = {"guided_json": schema}
    engine = {"name": "v", "kind": "vllm", "options": {"structured_backend": "guidance"}}
    req, plan, _ = plan_of(engine, payload=payload)
    sent = []
    for target in plan:
        sent.append(orjson.loads(req.body_for(payload, target))["structured_outputs"]["json"])
        if not plan.record("v", "rejected", None):
            break
    assert sent == [
        schema,
        {"type": "string", "minLength": 2},  # no patterns, formats, oneOf
        {"type": "string"},  # the core structure only
    ]
    assert req.how == "validated"


def test_a_deterministic_request_is_not_sent_twice_unchanged() -> None:
    payload = {"guided_json": SCHEMA, "temperature": 0}
    req, plan, _ = plan_of({"name": "a", "kind": "vllm"}, payload=payload)
    invalid = ("invalid_output", "schema_violation")
    assert walk(req, plan, payload, [invalid] * 3) == ["a"]
    # after a runaway the strings are bounded: a different request, worth sending
    essay = {"type": "object", "properties": {"text": {"type": "string"}}}
    payload = {"guided_json": essay, "temperature": 0, "max_tokens": 100}
    req, plan, _ = plan_of({"name": "a", "kind": "vllm"}, payload=payload)
    bodies = []
    for target in plan:
        bodies.append(orjson.loads(req.body_for(payload, target))["structured_outputs"]["json"])
        if not plan.record("a", "invalid_output", failed("truncated")):
            break
    bounded = {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 50}},  # half of 100 tokens
        "additionalProperties": False,
    }
    assert bodies == [essay, bounded]


def test_a_retry_of_a_seeded_request_gets_another_seed() -> None:
    payload = {"guided_json": SCHEMA, "seed": 7}
    req, plan, _ = plan_of({"name": "a", "kind": "vllm"}, payload=payload)
    seeds = []
    for target in plan:
        seeds.append(orjson.loads(req.body_for(payload, target))["seed"])
        if not plan.record("a", "invalid_output", failed("schema_violation")):
            break
    assert seeds == [7, 8, 9]


def test_no_retry_starts_after_the_deadline() -> None:
    _, plan, clock = plan_of({"name": "a", "kind": "vllm"})
    tried = []
    for target in plan:
        tried.append(target.engine.name)
        clock[0] = 150.0
        plan.record("a", "invalid_output", failed("schema_violation"))
    assert tried == ["a"]


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
        (
            {},
            {"default_max_tokens": "lots"},
            "routes[0].structured.default_max_tokens: expected 'auto' or a number of tokens "
            "of at least 1 (got 'lots')",
        ),
    ],
)
def test_config_errors_name_the_key(engine: dict, route: dict | None, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config({"name": "e", "kind": "vllm", **engine}, structured=route)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_llamacpp_unparsable_output_error_is_an_output_failure() -> None:
    llama = ENGINE_KINDS["llamacpp"].dialect
    message = "The model produced output that does not match the expected peg-native format"
    failure = llama.structured_output_error(500, message)
    assert failure is not None and failure.kind == "truncated"
    assert llama.structured_output_error(500, "out of memory") is None
    assert ENGINE_KINDS["vllm"].dialect.structured_output_error(500, message) is None


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
    at = argv.index("--structured-outputs-config.backend")
    assert argv[at : at + 4] == [
        "--structured-outputs-config.backend",
        "xgrammar",
        "--structured-outputs-config.disable_any_whitespace",
        "true",
    ]


def test_launched_vllm_defaults_to_the_measured_backend() -> None:
    vllm = ENGINE_KINDS["vllm"]
    launched = {"name": "v", "kind": "vllm", "launch": {"model": "/m", "port": 18001}}
    engine = parse_config(
        {
            "engines": [{"models": ["m"], **launched}],
            "routes": [{"model": "m", "engines": ["v"]}],
        }
    ).engines[0]
    assert structured_backend(engine) == "guidance"
    assert vllm.dialect.structured_capability(engine).describes == "vllm current (guidance backend)"
    started_elsewhere = config({"name": "e", "kind": "vllm"}).engines[0]
    assert structured_backend(started_elsewhere) == "auto"  # vLLM's own default


def test_a_schema_budget_leaves_half_the_launched_context_to_the_prompt() -> None:
    wide = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(40)}}
    launched = {
        "name": "v",
        "kind": "vllm",
        "models": ["m"],
        "launch": {"model": "/m", "port": 18001, "context": 2048},
    }
    cfg = parse_config({"engines": [launched], "routes": [{"model": "m", "engines": ["v"]}]})
    r = Router(cfg).route_for("m")
    req = StructuredService(cfg.routes).prepare({"guided_json": wide}, r)
    assert req.budget == token_budget(wide) > 1024
    assert orjson.loads(req.body_for({}, r.targets[0]))["max_tokens"] == 1024


def test_a_grammar_the_engine_failed_on_is_a_refused_constraint() -> None:
    vllm, llama = ENGINE_KINDS["vllm"].dialect, ENGINE_KINDS["llamacpp"].dialect
    assert vllm.refuses_constraint(400, "Grammar error: oneOf constraints are not supported")
    assert vllm.refuses_constraint(500, "Internal server error")  # xgrammar crashed on it
    assert not vllm.refuses_constraint(500, "CUDA out of memory")
    assert not vllm.refuses_constraint(503, "Internal server error")
    assert llama.refuses_constraint(400, "failed to parse grammar")
    assert not llama.refuses_constraint(500, "Internal server error")
