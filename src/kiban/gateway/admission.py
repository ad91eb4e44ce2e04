"""Admitting one inference request: the checks between its headers and an engine.

Each step answers the client itself (an :class:`~kiban.api_errors.APIError`)
before any engine is touched: API key, content type, JSON body, model and route,
the key's allow-list, the structured-output constraint. The key's rate limits
are taken by the gateway (:meth:`kiban.gateway.app.Gateway.admit`), which owns
the limit store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kiban import api_errors as errors
from kiban.api_errors import APIError
from kiban.gateway.asgi import Scope
from kiban.gateway.auth import Grant
from kiban.gateway.live import Live
from kiban.gateway.metrics import Metrics
from kiban.gateway.proxy import Exchange
from kiban.gateway.routing import Route
from kiban.gateway.structured import StructuredRequest, answered_by
from kiban.structured.constraint import STRUCTURED_KEYS

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


@dataclass(slots=True)
class Admitted:
    """A request past admission: its exchange and what settling it needs."""

    ex: Exchange
    route: Route
    grant: Grant
    needs_images: bool
    prompt: int  # the prompt's token estimate when the key has a token budget, else 0
    reserved: int  # tokens taken from the key's budget at admission
    body_size: int  # the client's body, before kiban asked the engine for usage


def auth_and_type(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """The Authorization and Content-Type headers of the request."""
    authorization = content_type = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-type":
            content_type = value
    return authorization, content_type


def authorize(live: Live, metrics: Metrics, authorization: bytes | None) -> Grant:
    """The grant of the request's API key; 401 without a valid one."""
    grant = live.keys.grant_for(authorization)
    if grant is None:
        metrics.auth_rejections.inc()
        raise errors.invalid_api_key()
    return grant


def check_content_type(content_type: bytes | None) -> None:
    """415 unless the body is declared as JSON (or not declared at all)."""
    if content_type is not None and not _is_json(content_type):
        raise errors.unsupported_media_type(content_type)


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 otherwise."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise errors.invalid_json(err) from None
    if not isinstance(payload, dict):
        raise errors.invalid_json()
    return payload


def route_for(live: Live, grant: Grant, payload: dict[str, Any]) -> tuple[str, Route]:
    """The requested model and its route, if the key may use it."""
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise errors.missing_model()
    route = live.router.route_for(model)
    if route is None:
        raise errors.model_not_found(model, live.router.public_models)
    if grant.routes is not None and route.name not in grant.routes:
        raise errors.model_not_allowed(model, models_allowed(live, grant))
    return model, route


def stream_flag(payload: dict[str, Any]) -> bool:
    """Whether the client asked for a stream; 400 when ``stream`` is not a boolean."""
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise errors.invalid_stream()
    return bool(stream)


def structured_for(
    live: Live, payload: dict[str, Any], route: Route, endpoint: str
) -> StructuredRequest | None:
    """The request's structured-output constraint on *route*, or None when it has none."""
    if endpoint == "embeddings" or (
        route.name not in live.structured.fixed and STRUCTURED_KEYS.isdisjoint(payload)
    ):
        return None
    try:
        return live.structured.prepare(payload, route)
    except RecursionError:
        raise answered_by(errors.too_deep()) from None
    except APIError as err:
        raise answered_by(err) from None


def has_images(messages: Any) -> bool:
    """Whether any chat message carries an image part."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                    return True
    return False


def models_allowed(live: Live, grant: Grant) -> list[str]:
    """The public model names the grant's key may use."""
    if grant.routes is None:
        return live.router.public_models
    return [
        name
        for name in live.router.public_models
        if (route := live.router.route_for(name)) is not None and route.name in grant.routes
    ]


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")
