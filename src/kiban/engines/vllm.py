"""vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from kiban.engines.base import EngineKind, EngineOption, parse_version
from kiban.structured.capability import (
    ALL_KINDS,
    SILENTLY_SKIPPED,
    XGRAMMAR_FEATURES,
    XGRAMMAR_FORMATS,
    StructuredCapability,
)
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig

#: ``guided_*`` request fields were removed in v0.12.0 (vllm PR #29326); from then on
#: vLLM ignores them as extra fields and generates unconstrained (HTTP 200).
CURRENT_API_SINCE = (0, 12, 0)
#: ``--structured-outputs-config`` replaced ``--guided-decoding-*`` flags (PR #22772)
STRUCTURED_OUTPUTS_CONFIG_SINCE = (0, 10, 2)


class VLLM(EngineKind):
    """vLLM answers GET /health with 200 once the engine loop runs."""

    name = "vllm"
    options = (
        EngineOption(
            "structured_backend",
            ("auto", "xgrammar", "guidance"),
            "auto",
            "the server's structured-output backend (--structured-outputs-config.backend)",
        ),
    )

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """By backend (vllm/sampling_params.py ``_validate_structured_outputs``, v0.32).

        - ``xgrammar``: no fallback; vLLM answers 400 for what its xgrammar
          pre-check rejects, and xgrammar skips some keywords silently.
        - ``guidance`` (llguidance): raises on any keyword it cannot enforce.
        - ``auto``: xgrammar, falling back to guidance for what xgrammar's
          pre-check rejects; what xgrammar skips silently is never re-routed.
        """
        backend = self.option(config, "structured_backend")
        version = config.version or "current"
        describes = f"vllm {version} ({backend} backend)"
        if backend == "xgrammar":
            return StructuredCapability(
                enforced=ALL_KINDS,
                expressible=ALL_KINDS,
                features=XGRAMMAR_FEATURES,
                formats=XGRAMMAR_FORMATS,
                skipped=SILENTLY_SKIPPED,
                describes=describes,
            )
        return StructuredCapability(
            enforced=ALL_KINDS,
            expressible=ALL_KINDS,
            features=None,
            formats=None,
            skipped=SILENTLY_SKIPPED if backend == "auto" else frozenset(),
            describes=describes,
        )

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """``structured_outputs`` (current API) or ``guided_*`` (before v0.12.0).

        Current: ``StructuredOutputsParams`` in vllm/sampling_params.py takes
        exactly one of json, regex, choice, grammar, json_object. Before v0.12:
        ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
        on the request, and ``response_format`` for json_object.
        """
        if _uses_current_api(config):
            value = {
                "json_schema": lambda: {"json": constraint.schema},
                "json_object": lambda: {"json_object": True},
                "regex": lambda: {"regex": constraint.pattern},
                "choice": lambda: {"choice": list(constraint.choices)},
                "grammar": lambda: {"grammar": constraint.grammar},
            }[constraint.kind]()
            return {"structured_outputs": value}
        if constraint.kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {
            "json_schema": {"guided_json": constraint.schema},
            "regex": {"guided_regex": constraint.pattern},
            "choice": {"guided_choice": list(constraint.choices)},
            "grammar": {"guided_grammar": constraint.grammar},
        }[constraint.kind]

    def structured_launch_args(self, config: EngineConfig) -> list[str]:
        """The backend, with compact JSON (no free whitespace) where the backend allows it.

        vLLM 0.32 reads ``disable_any_whitespace`` from the server config only
        (backend_xgrammar.py / backend_guidance.py); the per-request field of the
        same name is parsed and ignored. The server refuses it with ``auto``.
        """
        backend = self.option(config, "structured_backend")
        version = parse_version(config.version) if config.version else None
        if version is not None and version < STRUCTURED_OUTPUTS_CONFIG_SINCE:
            args = ["--guided-decoding-backend", backend]
            if backend != "auto":
                args.append("--guided-decoding-disable-any-whitespace")
            return args
        settings: dict[str, Any] = {"backend": backend}
        if backend != "auto":
            settings["disable_any_whitespace"] = True
        return ["--structured-outputs-config", orjson.dumps(settings).decode()]


def _uses_current_api(config: EngineConfig) -> bool:
    version = parse_version(config.version) if config.version else None
    return version is None or version >= CURRENT_API_SINCE
