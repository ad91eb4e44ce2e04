"""A route's engine as a strategy sees it (``Target``), an order of them, and the request view.

The routing strategies (``routing``, ``prefix_affinity``, ``session_affinity``) all
work on these; they live apart so the strategies need not import the router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kiban.gateway.engines import Engine


@dataclass(frozen=True, slots=True)
class Target:
    """An engine of a route and the model name to send it."""

    engine: Engine
    model: str
    #: this target's bit among its route's targets (1 << its position): engine sets as masks
    bit: int


Order = Callable[[list[Target]], list[Target]]


class RequestView(Protocol):
    """What a request-aware strategy (cache_aware, session) reads of a request."""

    body: bytes
    payload: dict[str, Any]
    client_headers: list[tuple[bytes, bytes]]
