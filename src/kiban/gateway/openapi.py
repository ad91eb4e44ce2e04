"""The OpenAPI 3.1 document of kiban's HTTP API, served at ``GET /openapi.json``.

It describes what kiban itself checks and answers: a request body must be a
JSON object with a string ``model`` (and a boolean ``stream``); every other
field goes to the engine as sent, so the document leaves them open. Every
error kiban answers has the OpenAI shape ``{"error": {message, type, param,
code}}``. ``python -m kiban.gateway.openapi`` prints the document that
docs/openapi.json holds (a test keeps the two equal).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from kiban import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERROR_STATUSES = {
    "400": "Malformed request: not JSON, not an object, no model, bad stream or structured field",
    "401": "Missing or invalid API key",
    "403": "The API key may not use this model",
    "404": "Unknown model or path",
    "405": "Method not allowed on this path",
    "413": "Request body larger than gateway.max_body_bytes",
    "415": "Content-Type is not JSON",
    "422": "No valid structured output after the route's retries",
    "429": "A key's rate limit, every engine at its concurrency limit, or an engine's own 429",
    "500": "An engine's own error (kiban relays its status and message)",
    "502": "An engine's own error or an engine that answered nonsense",
    "503": "No healthy engine for the model",
    "504": "The engine did not answer within the route's timeouts",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {
        s: {"description": _ERROR_STATUSES[s], "content": _json(_ERROR)}
        for s in statuses or tuple(_ERROR_STATUSES)
    }


def _inference(summary: str, request: str, response: str, streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = _json({"$ref": f"#/components/schemas/{response}"})
    if streams:
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string"}},
                "description": "Server-sent events relayed from the engine; ends with "
                "`data: [DONE]`, or with an error event when the engine failed mid-stream",
            }
        }
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {
                "required": True,
                "content": _json({"$ref": f"#/components/schemas/{request}"}),
            },
            "responses": {
                "200": {"description": "The engine's answer, relayed", "content": content},
                **_errors(),
            },
        }
    }


def _request(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {
                "type": "string",
                "minLength": 1,
                "description": "A model name from GET /v1/models",
            },
            **extra,
        },
        "additionalProperties": True,
        "description": "Fields other than those listed go to the engine untouched.",
    }


_STREAM = {"stream": {"type": ["boolean", "null"]}}
_ANY = {"description": "Passed to the engine as sent"}
_RESPONSE_FORMAT = {
    "type": ["object", "null"],
    "required": ["type"],
    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
    "if": {"properties": {"type": {"const": "json_schema"}}},
    "then": {
        "required": ["json_schema"],
        "properties": {
            "json_schema": {
                "type": "object",
                "required": ["schema"],
                "properties": {"schema": {"type": ["object", "boolean"]}},
            }
        },
    },
    "description": "Enforced by the engines and verified by kiban (docs/structured-output.md); "
    "a route whose engines cannot enforce a constraint answers 400 "
    "structured_output_unsupported",
}


def openapi_document(models: list[str] | None = None) -> dict[str, Any]:
    """The document; *models* (the configured public names) become examples of ``model``."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "kiban gateway",
            "version": __version__,
            "description": "OpenAI-compatible endpoints in front of self-hosted engines.",
        },
        "paths": {
            "/v1/chat/completions": _inference(
                "Chat completion (streamed when stream is true)",
                "ChatCompletionRequest",
                "ChatCompletion",
                streams=True,
            ),
            "/v1/completions": _inference(
                "Text completion (streamed when stream is true)",
                "CompletionRequest",
                "Completion",
                streams=True,
            ),
            "/v1/embeddings": _inference(
                "Embeddings", "EmbeddingRequest", "EmbeddingList", streams=False
            ),
            "/v1/models": {
                "get": {
                    "summary": "The models this key may use",
                    "security": [{"bearer": []}, {}],
                    "responses": {
                        "200": {
                            "description": "Model list",
                            "content": _json({"$ref": "#/components/schemas/ModelList"}),
                        },
                        **_errors("401"),
                    },
                }
            },
            "/health": _plain_get("The process is alive", {"type": "object"}),
            "/ready": _plain_get(
                "Every route has a healthy engine (503 names those that have none)",
                {"$ref": "#/components/schemas/Readiness"},
                extra={
                    "503": {
                        "description": "Some route has no healthy engine",
                        "content": _json({"$ref": "#/components/schemas/Readiness"}),
                    }
                },
            ),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": _plain_get("This document", {"type": "object"}),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required when the gateway has API keys configured",
                }
            },
            "schemas": _schemas(),
        },
    }
    if models:
        doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["examples"] = (
            models
        )
    return doc


def _plain_get(
    summary: str, schema: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    ok = {"description": summary, "content": _json(schema)}
    return {"get": {"summary": summary, "responses": {"200": ok, **(extra or {})}}}


def _schemas() -> dict[str, Any]:
    choice_list = {"type": "array", "items": {"type": "object"}}
    usage = {
        "type": ["object", "null"],
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "integer", "null"]},
                    },
                }
            },
        },
        "ChatCompletionRequest": _request(
            {
                **_STREAM,
                "messages": _ANY,
                "response_format": _RESPONSE_FORMAT,
                "max_tokens": _ANY,
                "max_completion_tokens": _ANY,
            }
        ),
        "CompletionRequest": _request({**_STREAM, "prompt": _ANY, "max_tokens": _ANY}),
        "EmbeddingRequest": _request({"input": _ANY}),
        "ChatCompletion": {
            "type": "object",
            "required": ["choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string"},
                "model": {"type": "string"},
                "choices": choice_list,
                "usage": usage,
            },
        },
        "Completion": {
            "type": "object",
            "required": ["choices"],
            "properties": {"id": {"type": "string"}, "choices": choice_list, "usage": usage},
        },
        "EmbeddingList": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "array"}, "model": {"type": "string"}, "usage": usage},
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "routes_without_healthy_engine"],
            "properties": {
                "ready": {"type": "boolean"},
                "routes_without_healthy_engine": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


if __name__ == "__main__":
    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")
