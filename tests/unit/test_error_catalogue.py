"""The gateway's error catalogue: every code's status, type and labels; the JSON clients see."""

from __future__ import annotations

import inspect
from pathlib import Path

import orjson
import pytest

from kiban import api_errors as errors
from kiban.api_errors import APIError, ErrorCode
from kiban.structured.verify import OutputFailure

#: the OpenAI error types kiban answers with
TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "rate_limit_error",
    "service_unavailable",
    "timeout",
    "server_error",
    "invalid_response_error",
}

#: sample arguments for every named constructor
SAMPLES: dict[str, tuple] = {
    "unknown_path": ("/x",),
    "method_not_allowed": ("PUT", "/health", "GET"),
    "invalid_content_length": (),
    "body_too_large": (10,),
    "unsupported_media_type": (b"text/plain",),
    "invalid_json": ("bad",),
    "missing_model": (),
    "invalid_stream": (),
    "model_not_found": ("m", ["a", "b"]),
    "images_not_supported": ("m",),
    "invalid_api_key": (),
    "admin_key_missing": (),
    "admin_key_required": ("k",),
    "model_not_allowed": ("m", []),
    "rate_limit_exceeded": ("requests_per_minute", 60, 3),
    "engines_saturated": ("m", ["engine 'a' is full"]),
    "queue_timeout": ("m", "a", 2.0, 4),
    "no_healthy_engine": ("no healthy engine",),
    "upstream_timeout": ("too slow",),
    "engine_error": (418, "teapot", [], b'{"error":{}}'),
    "internal_error": ("rid",),
    "multiple_constraints": (["a", "b"], "b"),
    "unsupported_constraint": ("structured_outputs.structural_tag",),
    "invalid_response_format": ("response_format", "must be an object"),
    "invalid_json_schema": ("guided_json", "5 is not valid"),
    "too_deep": (),
    "fixed_schema_route": ("m", "guided_json"),
    "structured_output_unsupported": ("no engine can", "guided_regex"),
    "structured_output_rejected": ("rejected", None),
    "invalid_structured_output": ("structured_output_truncated", "cut", "guided_json", {}),
}


def constructors() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(errors, inspect.isfunction)
        if fn.__module__ == errors.__name__
        and inspect.signature(fn).return_annotation in ("APIError", APIError)
    ]


def test_every_code_has_a_status_a_type_and_a_label() -> None:
    for code in ErrorCode:
        assert 400 <= code.status < 600, code
        assert code.type in TYPES, code
        assert code.label == (code.value if code.on_wire else code.type)


def test_codes_are_unique_and_snake_case() -> None:
    values = [c.value for c in ErrorCode]
    assert len(values) == len(set(values))
    assert all(v.replace("_", "").isalpha() and v.islower() for v in values)


def test_only_engine_limits_count_as_the_gateways_own_429s() -> None:
    limited = {c: c.rate_limit for c in ErrorCode if c.rate_limit is not None}
    assert limited == {
        ErrorCode.ENGINES_SATURATED: "engine_concurrency",
        ErrorCode.QUEUE_TIMEOUT: "engine_queue_timeout",
    }
    assert all(c.status == 429 for c in limited)


def test_every_constructor_is_sampled() -> None:
    assert sorted(constructors()) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_status_type_and_code_come_from_the_catalogue(name: str) -> None:
    err = getattr(errors, name)(*SAMPLES[name])
    assert isinstance(err, APIError) and isinstance(err.error, ErrorCode)
    if err.raw_body is not None:  # an engine's error, relayed with its own status and body
        assert err.status == 418 and err.body() == b'{"error":{}}'
        return
    assert err.status == err.error.status
    body = orjson.loads(err.body())["error"]
    assert body["type"] == err.error.type
    assert body["code"] == (err.error.value if err.error.on_wire else None)
    assert body["message"] == err.message and body["message"]


def test_the_json_clients_see_is_unchanged() -> None:
    """Byte for byte what the gateway answered before the catalogue (tests/ and docs pin more)."""
    assert errors.model_not_found("x", ["a", "b"]).body() == (
        b'{"error":{"message":"model \'x\' does not exist; available models: a, b",'
        b'"type":"invalid_request_error","param":"model","code":"model_not_found"}}'
    )
    assert errors.invalid_stream().body() == (
        b'{"error":{"message":"\'stream\' must be a boolean",'
        b'"type":"invalid_request_error","param":"stream","code":null}}'
    )
    saturated = errors.engines_saturated("m", ["a busy", "b busy"])
    assert (saturated.status, saturated.headers) == (429, [(b"retry-after", b"1")])
    assert saturated.body() == (
        b'{"error":{"message":"every engine of model \'m\' is at its concurrency limit: '
        b'a busy; b busy","type":"rate_limit_error","param":null,"code":"engines_saturated"}}'
    )
    unhealthy = errors.no_healthy_engine("none")
    assert (unhealthy.status, unhealthy.headers) == (503, [(b"retry-after", b"5")])
    assert errors.invalid_content_length().body() == (
        b'{"error":{"message":"invalid Content-Length header",'
        b'"type":"invalid_request_error","param":null,"code":null}}'
    )


def test_labels_come_from_the_code() -> None:
    assert errors.invalid_stream().error.label == "invalid_request_error"
    assert errors.engine_error(400, "m", [], b"{}").error.label == "invalid_request_error"
    assert errors.queue_timeout("m", "a", 1, 1).error.label == "queue_timeout"


@pytest.mark.parametrize(
    "kind",
    [
        "no_content",
        "invalid_json",
        "truncated",
        "whitespace_runaway",
        "not_an_object",
        "schema_violation",
        "regex_mismatch",
        "not_a_choice",
    ],
)
def test_every_output_failure_has_a_422_in_the_catalogue(kind: str) -> None:
    code = ErrorCode(OutputFailure(kind, "m").code)
    assert (code.status, code.type) == (422, "invalid_response_error")


def test_no_error_is_built_outside_the_catalogue() -> None:
    src = Path(errors.__file__).parents[1]
    sites = [
        f"{path.relative_to(src)}:{n}"
        for path in src.rglob("*.py")
        if path != Path(errors.__file__)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "APIError(" in line
    ]
    assert sites == []
