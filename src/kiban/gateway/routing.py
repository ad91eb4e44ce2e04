"""Routes: a public model name, its engines, and the order in which to try them."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kiban.config import KibanConfig, RouteConfig, resolve_target_model
from kiban.gateway.engines import Engine
from kiban.gateway.prefix_affinity import CacheAware, load_of
from kiban.gateway.session_affinity import SessionAffinity
from kiban.gateway.targets import Order, RequestView, Target


def _priority(targets: list[Target]) -> list[Target]:
    return targets


class _RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def order(self, targets: list[Target]) -> list[Target]:
        if not targets:
            return targets
        start = self._next % len(targets)
        self._next += 1
        return targets[start:] + targets[:start]


class _LeastOutstanding:
    """Fewest requests in flight first (plus the engine's own load); ties broken by rotation.

    Two engines (the common route) are compared inline: a sort with a Python
    key costs a nested interpreter call per engine.
    """

    def __init__(self) -> None:
        self._next = 0

    def order(self, targets: list[Target]) -> list[Target]:
        count = len(targets)
        if count < 2:
            return list(targets)
        start = self._next % count
        self._next += 1
        rotated = targets[start:] + targets[:start]
        if count == 2:
            first, second = rotated[0].engine, rotated[1].engine
            if second.outstanding + second.load_penalty < first.outstanding + first.load_penalty:
                rotated.reverse()
            return rotated
        rotated.sort(key=load_of)  # stable: ties keep the rotation
        return rotated


class _Weighted:
    """Smooth weighted round robin (as nginx does it): deterministic, well spread."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def order(self, targets: list[Target]) -> list[Target]:
        if len(targets) < 2:
            return targets
        total = 0.0
        for t in targets:
            weight = t.engine.config.weight
            total += weight
            self._current[t.engine.name] = self._current.get(t.engine.name, 0.0) + weight
        first = max(targets, key=lambda t: self._current[t.engine.name])
        self._current[first.engine.name] -= total
        rest = sorted(
            (t for t in targets if t is not first),
            key=lambda t: -t.engine.config.weight,
        )
        return [first, *rest]


def _ewma_latency(targets: list[Target]) -> list[Target]:
    """Lowest smoothed latency first, weighted by load; unmeasured engines go first."""
    return sorted(
        targets,
        key=lambda t: (t.engine.ewma_latency_s * (1 + t.engine.outstanding), random.random()),
    )


def make_order(strategy: str) -> Order:
    factories: dict[str, Callable[[], Order]] = {
        "priority": lambda: _priority,
        "round_robin": lambda: _RoundRobin().order,
        "least_outstanding": lambda: _LeastOutstanding().order,
        "weighted": lambda: _Weighted().order,
        "ewma_latency": lambda: _ewma_latency,
    }
    return factories[strategy]()


def make_request_order(
    config: RouteConfig, targets: list[Target], fallback: Order
) -> CacheAware | SessionAffinity | None:
    """The strategy that reads each request (cache_aware, session); None for the others."""
    if config.strategy == "cache_aware":
        return CacheAware(config.cache_aware, targets, fallback)
    if config.strategy == "session":
        return SessionAffinity(config.session, targets, fallback)
    return None


@dataclass
class RetryBudget:
    """Retries may add at most *ratio* of recent traffic (plus a small floor).

    A token bucket: every request deposits *ratio* tokens, every retry takes
    one, and the floor refills at *min_per_s*. During an outage this keeps
    retries from multiplying the load on the engines still up.
    """

    ratio: float
    min_per_s: float
    capacity: float = 0.0
    tokens: float = 0.0
    _last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.capacity = max(10.0, self.min_per_s * 10)
        self.tokens = self.capacity

    def deposit(self) -> None:
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def try_withdraw(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.min_per_s)
        self._last = now
        if self.tokens >= 1.0 - 1e-9:  # ten deposits of 0.1 make one retry, not 0.999...
            self.tokens -= 1.0
            return True
        return False


class Route:
    """A public model name with its ordered engines and its policies."""

    def __init__(self, config: RouteConfig, targets: list[Target]) -> None:
        self.config = config
        self.name = config.model
        self.targets = targets
        aware = config.strategy in ("cache_aware", "session")
        self.order = make_order("least_outstanding" if aware else config.strategy)
        self.request_order = make_request_order(config, targets, self.order)
        self.budget = RetryBudget(config.retries.budget_ratio, config.retries.min_retries_per_s)

    def candidates(
        self, needs_images: bool = False, request: RequestView | None = None
    ) -> list[Target]:
        """Targets able to take this request now, in the strategy's order."""
        now = time.monotonic()
        usable = [
            t
            for t in self.targets
            if t.engine.available(now) and (not needs_images or t.engine.accepts_images)
        ]
        if self.request_order is not None and request is not None:
            return self.request_order.order(usable, request)
        return self.order(usable)

    def has_healthy_target(self) -> bool:
        now = time.monotonic()
        return any(t.engine.healthy and t.engine.breaker.allows(now) for t in self.targets)


class Router:
    """Every route of a configuration, looked up by public name or alias.

    *reuse*: the engines of a previous configuration; an engine whose
    configuration did not change keeps its live state (health, circuit,
    requests in flight, queue) across a reload.
    """

    def __init__(self, config: KibanConfig, reuse: dict[str, Engine] | None = None) -> None:
        reuse = reuse or {}
        self.engines = {}
        for engine in config.engines:
            old = reuse.get(engine.name)
            self.engines[engine.name] = (
                old if old is not None and old.config == engine else Engine.from_config(engine)
            )
        self.routes: list[Route] = []
        self._by_name: dict[str, Route] = {}
        for route_cfg in config.routes:
            targets = [
                Target(self.engines[t.engine], resolve_target_model(config, route_cfg, t), 1 << i)
                for i, t in enumerate(route_cfg.engines)
            ]
            route = Route(route_cfg, targets)
            self.routes.append(route)
            for name in route_cfg.public_names:
                self._by_name[name] = route

    def route_for(self, model: str) -> Route | None:
        return self._by_name.get(model)

    @property
    def public_models(self) -> list[str]:
        return list(self._by_name)
