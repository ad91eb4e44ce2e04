"""A structured request on its way through the gateway: constraint, validator, policy.

The gateway builds one only when a request carries a structured field or its
route has a fixed schema; every other request skips this module entirely.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

from kiban import api_errors as errors
from kiban.api_errors import APIError
from kiban.gateway.structured_attempts import RELAX_STEPS, AttemptPlan
from kiban.structured.capability import StructuredCapability
from kiban.structured.constraint import (
    STRUCTURED_KEYS,
    Constraint,
    constraint_from_request,
    json_schema_constraint,
)
from kiban.structured.features import ANNOTATION_FEATURES, canonical_schema_features
from kiban.structured.relax import bound_runaways, relax, string_bound, token_budget
from kiban.structured.stream import StreamAccumulator
from kiban.structured.validator import CompiledSchema, SchemaError, ValidatorCache
from kiban.structured.verify import OutputFailure, choices_of, verify_content

if TYPE_CHECKING:
    from kiban.config import EngineConfig, RouteConfig, StructuredPolicy
    from kiban.gateway.routing import Route
    from kiban.gateway.targets import Target

#: response header saying how a structured answer was obtained: "enforced" (the engine
#: enforced the whole constraint), "validated" (kiban checked what the engine could not
#: enforce), or the error code when there is no answer
STRUCTURED_HEADER = b"x-kiban-structured"
#: max_tokens kiban gives a json_object, regex or grammar request that set none
AUTO_BUDGET = 1024
#: rank of an engine that accepts the form but enforces none of it (kiban validates)
UNENFORCED_RANK = 1_000_000
#: kinds kiban can check itself, so an engine that does not enforce them may still serve
VERIFIABLE = frozenset({"json_schema", "json_object", "regex", "choice"})


@dataclass(slots=True)
class StructuredRequest:
    """One request's constraint, its compiled validator, its route's policy, and what
    its attempts have sent so far."""

    constraint: Constraint
    compiled: CompiledSchema | None
    policy: StructuredPolicy
    set_max_tokens: bool
    budget: int  # max_tokens: the client's, or the one kiban gives the request
    deterministic: bool = False  # temperature 0: the same body gets the same answer
    seed: int | None = None
    stream: StreamAccumulator | None = field(default=None)
    #: "enforced" or "validated": how the current attempt's answer is obtained
    how: str | None = None
    bounded: bool = False  # after a runaway: bound strings
    integers: bool = False  # after a number that never ended: bound numbers as integers
    ranks: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # engine -> relax steps after refusals
    sent: set[tuple[str, bytes]] = field(default_factory=set)  # (engine, constraint) sent
    sends: int = 0
    deadline: float = float("inf")  # no attempt runs past it (the route's total timeout)

    # -- where it may go --

    def targets(self, route: Route, candidates: list[Target]) -> list[Target]:
        """The candidates that may take this request, best enforcing first.

        An engine that enforces the whole constraint ranks first; one that enforces
        part of a JSON Schema next (fewer features left out first); one that accepts
        the form without enforcing it last. With ``structured.unenforced: refuse`` only
        the first kind is used. Raises 400 naming what is unenforceable when no engine
        of the route may take the request.
        """
        ranks: dict[str, int] = {}
        reasons: list[str] = []
        partial: list[str] = []
        kind = self.constraint.kind
        for target in route.targets:
            capability = target.engine.structured
            missing = capability.unenforced(self.constraint)
            name = target.engine.name
            if not missing:
                ranks[name] = 0
                continue
            reasons.append(f"{capability.describes} cannot enforce {', '.join(missing)}")
            if kind in capability.enforced:
                rank = len(missing)
            elif kind in capability.expressible and kind in VERIFIABLE:
                rank = UNENFORCED_RANK
            else:
                continue
            partial.append(name)
            if self.policy.unenforced == "validate":
                ranks[name] = rank
        if not ranks:
            hint = ""
            if partial:
                hint = (
                    f" (the route's structured.unenforced: validate would send it to "
                    f"{', '.join(sorted(partial))} and validate the output)"
                )
            raise errors.structured_output_unsupported(
                f"no engine of model {route.name!r} can enforce this {kind} "
                f"constraint: {'; '.join(reasons)}{hint}",
                self.constraint.source,
            )
        self.ranks = ranks
        chosen = [t for t in candidates if t.engine.name in ranks]
        return sorted(chosen, key=self.rank)

    def rank(self, target: Target) -> int:
        return self.ranks.get(target.engine.name, UNENFORCED_RANK)

    def attempts(
        self,
        targets: list[Target],
        attempts: int,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> AttemptPlan:
        """The attempts in order (see :mod:`kiban.gateway.structured_attempts`)."""
        self.deadline = deadline
        return AttemptPlan(self, targets, attempts, deadline, clock)

    def relax_further(self, engine: str) -> bool:
        """*engine* refused the schema: ask it with less enforced next, if anything is left."""
        step = self.steps.get(engine, 0)
        if self.constraint.kind != "json_schema" or step >= RELAX_STEPS:
            return False
        self.steps[engine] = step + 1
        return True

    def sent_before(self, target: Target) -> bool:
        """Whether *target*'s next body would carry a constraint it was already sent."""
        engine = target.engine
        constraint, _ = self._constraint_for(engine.name, engine.structured)
        return (engine.name, _identity(constraint)) in self.sent

    # -- what it sends --

    def body_for(self, payload: dict[str, Any], target: Target) -> bytes:
        """The request in *target*'s dialect: the part of the constraint it enforces,
        a bounded max_tokens, and a new seed on a retry of a seeded request."""
        engine = target.engine
        constraint, self.how = self._constraint_for(engine.name, engine.structured)
        out = {k: v for k, v in payload.items() if k not in STRUCTURED_KEYS}
        out["model"] = target.model
        out.update(engine.dialect.structured_fields(constraint, engine.config))
        if self.set_max_tokens:
            out["max_tokens"] = _within_context(self.budget, engine.config)
        if self.seed is not None:
            out["seed"] = self.seed + self.sends
        self.sends += 1
        self.sent.add((engine.name, _identity(constraint)))
        return orjson.dumps(out)

    def _constraint_for(
        self, engine: str, capability: StructuredCapability
    ) -> tuple[Constraint, str]:
        constraint = self.constraint
        if constraint.kind not in capability.enforced:
            return constraint, "validated"
        if constraint.kind != "json_schema":
            return constraint, "enforced"
        bound = string_bound(constraint.schema, self.budget) if self.bounded else 0
        step = self.steps.get(engine, 0)
        schema, relaxed = enforceable_schema(constraint.key, capability, step, bound, self.integers)
        how = "validated" if relaxed else "enforced"
        if schema is None:
            return constraint, how
        return replace(constraint, schema=schema), how

    # -- what it checks --

    def verify_body(self, body: bytes) -> OutputFailure | None:
        """Verify every choice of a non-streamed response body."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            return OutputFailure("invalid_json", f"the engine's response body is not JSON: {err}")
        return self.verify_response(data)

    def verify_response(self, data: Any) -> OutputFailure | None:
        """Verify every choice of a response body already parsed."""
        if not isinstance(data, dict):
            return OutputFailure("no_content", "the engine's response has no choices")
        return self._verify_choices(choices_of(data))

    def start_stream(self) -> StreamAccumulator:
        self.stream = StreamAccumulator()
        return self.stream

    def verify_stream(self) -> OutputFailure | None:
        assert self.stream is not None
        return self._verify_choices(self.stream.choices())

    def _verify_choices(self, choices: list[tuple[str | None, str | None]]) -> OutputFailure | None:
        if not choices:
            return OutputFailure("no_content", "the engine's response has no choices")
        for index, (content, finish_reason) in enumerate(choices):
            failure = verify_content(
                self.constraint, self.compiled, content, finish_reason, self.policy.whitespace_run
            )
            if failure is not None:
                if len(choices) > 1:
                    return OutputFailure(
                        failure.kind, f"choice {index}: {failure.message}", failure.pointer
                    )
                return failure
        return None


def answered_by(err: APIError) -> APIError:
    """*err* with the structured-output header naming its code (a request with no answer)."""
    err.headers.append((STRUCTURED_HEADER, err.error.label.encode()))
    return err


class StructuredService:
    """Builds :class:`StructuredRequest` objects; holds the validator cache and route schemas."""

    def __init__(self, routes: list[RouteConfig], cache: ValidatorCache | None = None) -> None:
        self.cache = cache or ValidatorCache()
        self.fixed: dict[str, Constraint] = {}
        for route in routes:
            policy = route.structured
            if policy.schema_ is not None:
                self.fixed[route.model] = json_schema_constraint(
                    policy.schema_, policy.name, f"routes.{route.model}.structured.schema"
                )

    def prepare(self, payload: dict[str, Any], route: Route) -> StructuredRequest | None:
        """The structured request for *payload* on *route*, or None when it has no constraint."""
        constraint = constraint_from_request(payload)
        fixed = self.fixed.get(route.name)
        if fixed is not None:
            if constraint is not None and constraint.key != fixed.key:
                raise errors.fixed_schema_route(route.name, constraint.source)
            constraint = fixed
        if constraint is None:
            return None
        compiled = None
        if constraint.kind == "json_schema":
            try:
                compiled = self.cache.get(constraint.key, constraint.schema)
            except SchemaError as err:
                raise errors.invalid_json_schema(constraint.source, err) from None
        policy = route.config.structured
        given = payload.get("max_tokens") or payload.get("max_completion_tokens")
        budget = given if isinstance(given, int) else default_budget(constraint, policy)
        seed = payload.get("seed")
        return StructuredRequest(
            constraint,
            compiled,
            policy,
            set_max_tokens=given is None,
            budget=budget,
            deterministic=payload.get("temperature") == 0,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        )


def default_budget(constraint: Constraint, policy: StructuredPolicy) -> int:
    """``max_tokens`` for a request that gave none: the route's, or one from the schema."""
    if policy.default_max_tokens != "auto":
        return policy.default_max_tokens
    if constraint.kind == "json_schema":
        return token_budget(constraint.schema)
    if constraint.kind == "choice":
        return max(len(c) for c in constraint.choices) + 16
    return AUTO_BUDGET


@lru_cache(maxsize=1024)
def enforceable_schema(
    key: bytes, capability: StructuredCapability, step: int, bound: int, integers: bool
) -> tuple[Any, tuple[str, ...]]:
    """The schema of *key* relaxed to what *capability* enforces after *step* refusals,
    with strings bounded to *bound* characters (0: unbounded) and numbers to bounded
    integers (:func:`kiban.structured.relax.bound_runaways`), None when that is the
    schema itself; and the features left out."""
    canonical = key.removeprefix(b"schema:")
    trusted = capability.narrowed(step)
    used = canonical_schema_features(canonical)
    unsupported = [f for f in used if not trusted.supports(f)]
    if not unsupported and not bound:
        return None, ()
    schema = orjson.loads(canonical)
    if unsupported:
        schema = relax(schema, trusted.supports)
    if bound:
        schema = bound_runaways(schema, bound, trusted.supports, integers)
    return schema, tuple(sorted(set(unsupported) - ANNOTATION_FEATURES))


def _identity(constraint: Constraint) -> bytes:
    """Equal for equal constraints (the schema an attempt sends may be relaxed or bounded)."""
    return orjson.dumps(constraint.schema) if constraint.kind == "json_schema" else b""


def _within_context(budget: int, engine: EngineConfig) -> int:
    """At most half the context kiban launched the engine with (its prompt needs room)."""
    context = engine.launch.context if engine.launch is not None else None
    return min(budget, context // 2) if context else budget
