"""A structured request on its way through the gateway: constraint, validator, policy.

The gateway builds one only when a request carries a structured field or its
route has a fixed schema; every other request skips this module entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from kiban.gateway.errors import APIError
from kiban.structured.constraint import (
    STRUCTURED_KEYS,
    Constraint,
    constraint_from_request,
    json_schema_constraint,
)
from kiban.structured.stream import StreamAccumulator
from kiban.structured.validator import CompiledSchema, SchemaError, ValidatorCache
from kiban.structured.verify import OutputFailure, choices_of, verify_content

if TYPE_CHECKING:
    from kiban.config import RouteConfig, StructuredPolicy
    from kiban.gateway.routing import Route, Target


@dataclass(slots=True)
class StructuredRequest:
    """One request's constraint, its compiled validator and its route's policy."""

    constraint: Constraint
    compiled: CompiledSchema | None
    policy: StructuredPolicy
    set_max_tokens: bool
    stream: StreamAccumulator | None = field(default=None)

    # -- where it may go --

    def targets(self, route: Route, candidates: list[Target]) -> list[Target]:
        """The candidates that may take this request, enforcing engines first.

        Raises 400 naming what is unenforceable when no engine of the route
        can enforce the constraint (and the route does not allow validating
        output from engines that merely accept it).
        """
        enforcing, accepting = set(), set()
        reasons: list[str] = []
        for target in route.targets:
            capability = target.upstream.structured
            missing = capability.unenforced(self.constraint)
            if not missing:
                enforcing.add(target.upstream.name)
            else:
                reasons.append(f"{capability.describes} cannot enforce {', '.join(missing)}")
                if self.constraint.kind in capability.expressible:
                    accepting.add(target.upstream.name)
        allowed = enforcing
        if not enforcing:
            if self.policy.unenforced != "validate" or not accepting:
                hint = ""
                if accepting:
                    hint = (
                        f" (the route's structured.unenforced: validate would send it to "
                        f"{', '.join(sorted(accepting))} and validate the output)"
                    )
                raise APIError(
                    400,
                    f"no engine of model {route.name!r} can enforce this {self.constraint.kind} "
                    f"constraint: {'; '.join(reasons)}{hint}",
                    param=self.constraint.source,
                    code="structured_output_unsupported",
                )
            allowed = accepting
        chosen = [t for t in candidates if t.upstream.name in allowed]
        return chosen

    def plan(self, targets: list[Target], attempts: int) -> list[Target]:
        """Attempts in order: failover for connection errors, retries for invalid output."""
        if not targets:
            return []
        tries = max(attempts, 1 + self.policy.retries)
        if self.policy.retry_on == "same":
            per = 1 + self.policy.retries
            ordered = [t for t in targets for _ in range(per)]
        else:
            ordered = [targets[i % len(targets)] for i in range(tries)]
        return ordered[:tries]

    # -- what it sends --

    def body_for(self, payload: dict[str, Any], target: Target) -> bytes:
        """The request in *target*'s dialect, with a bounded max_tokens."""
        upstream = target.upstream
        out = {k: v for k, v in payload.items() if k not in STRUCTURED_KEYS}
        out["model"] = target.model
        out.update(upstream.kind.structured_fields(self.constraint, upstream.config))
        if self.set_max_tokens:
            out["max_tokens"] = self.policy.default_max_tokens
        return orjson.dumps(out)

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
                raise APIError(
                    400,
                    f"model {route.name!r} is an extractor with a fixed schema; leave out "
                    f"{constraint.source} or send the same schema",
                    param=constraint.source,
                    code="fixed_schema_route",
                )
            constraint = fixed
        if constraint is None:
            return None
        compiled = None
        if constraint.kind == "json_schema":
            try:
                compiled = self.cache.get(constraint.key, constraint.schema)
            except SchemaError as err:
                raise APIError(
                    400,
                    f"{constraint.source} is not a valid JSON Schema: {err}",
                    param=constraint.source,
                    code="invalid_json_schema",
                ) from None
        set_max = payload.get("max_tokens") is None and payload.get("max_completion_tokens") is None
        return StructuredRequest(constraint, compiled, route.config.structured, set_max)
