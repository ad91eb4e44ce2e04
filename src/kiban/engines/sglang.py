"""SGLang's ``sglang.launch_server``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kiban.engines.dialect import (
    CONTINUOUS_USAGE,
    Dialect,
    choice_regex,
    openai_response_format,
)
from kiban.engines.environment import EnvSpec, pip_install
from kiban.engines.kind import EngineKind
from kiban.engines.kv_layout import KvLayout
from kiban.engines.launch import ContainerImage, Launcher, LaunchTarget, LaunchUnsupported
from kiban.engines.telemetry import EngineMetricNames, EngineMetrics
from kiban.sizing.kv import KvFormat, dtype_format, plain
from kiban.sizing.overhead import (
    CUDA_GRAPHS_BYTES,
    TORCH_CUDA_CONTEXT_BYTES,
    activation_bytes,
    logits_bytes,
)
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.structured.capability import (
    StructuredCapability,
    xgrammar,
)
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig
    from kiban.sizing.plan import EnginePlan

#: the SGLang release whose ChatCompletionRequest
#: (sglang/srt/entrypoints/openai/protocol.py) the dialect is checked against in tests
PINNED_VERSION = "0.5.23"


class SGLangDialect(Dialect):
    """SGLang serves the OpenAI routes and GET /health; JSON through ``response_format``,
    regex and EBNF through top-level fields."""

    #: SGLang 0.5.23 puts the usage so far on every event for ``continuous_usage_stats``
    #: (sglang/srt/entrypoints/openai/serving_chat.py, should_include_usage)
    token_count = CONTINUOUS_USAGE

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any]:
        """SGLang 0.5.23 takes a final assistant message's text off the messages and appends
        its tokens after the generation prompt when ``continue_final_message`` is set
        (sglang/srt/entrypoints/openai/serving_chat.py, _handle_last_assistant_message;
        without it the message would turn into a user turn)."""
        return {"continue_final_message": True}

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """SGLang 0.5.23 answers 400 "The input (M tokens) is longer than the model's context
        length (N tokens)." or "Requested token count exceeds the model's maximum context
        length of N tokens..." (sglang/srt/managers/tokenizer_manager.py
        ``_validate_one_request``)."""
        message = error.get("message")
        return (
            status == 400
            and isinstance(message, str)
            and (
                "is longer than the model's context length" in message
                or "exceeds the model's maximum context length" in message
            )
        )

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """The default grammar backend is xgrammar; its whitespace knob is ignored (#8250)."""
        return xgrammar(f"sglang {config.version or PINNED_VERSION} (xgrammar)")

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """``response_format`` for JSON, top-level ``regex`` / ``ebnf`` otherwise.

        ``strict`` is always true: with ``strict: false`` SGLang leaves the
        schema to the chat template when the renderer handles response_format
        (``to_sampling_params``), i.e. unconstrained.
        """
        if constraint.kind == "regex":
            return {"regex": constraint.pattern}
        if constraint.kind == "choice":
            return {"regex": choice_regex(constraint.choices)}
        if constraint.kind == "grammar":
            return {"ebnf": constraint.grammar}
        return openai_response_format(constraint)


class SGLangLauncher(Launcher):
    """``python -m sglang.launch_server`` from the sglang environment (NVIDIA GPUs only)."""

    def environment(self, device: str) -> str:
        _gpu_only(device)
        return "sglang"

    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        assert engine.launch is not None
        return [
            target.program("python"),
            "-m",
            "sglang.launch_server",
            "--model-path",
            engine.launch.model,
            "--served-model-name",
            engine.models[0],
            "--host",
            target.host,
            "--port",
            str(target.port),
        ]


# lmsysorg/sglang:vX.Y.Z (docker/Dockerfile); docker/compose.yaml runs
# `python3 -m sglang.launch_server` with ipc: host, memlock and stack ulimits, and a
# curl healthcheck on /health; the docs' docker run gives --shm-size 32g.
def container_image(device: str) -> ContainerImage:
    """SGLang's image at the pinned release (GPU only)."""
    _gpu_only(device)
    return ContainerImage(
        image=f"lmsysorg/sglang:v{PINNED_VERSION}",
        programs={"python": "python3"},
        ipc_host=True,
        shm_size="32Gi",
        ulimits={"memlock": -1, "stack": 67108864},
        source="sglang docker/Dockerfile, docker/compose.yaml",
    )


# ``--enable-metrics`` serves /metrics on the API port; token_usage is the KV pool in use.
METRICS = EngineMetrics(
    launch_args=("--enable-metrics",),
    names=EngineMetricNames(
        kv_cache_usage="sglang:token_usage",
        requests_running="sglang:num_running_reqs",
        requests_waiting="sglang:num_queue_reqs",
        prompt_tokens="sglang:prompt_tokens_total",
        generation_tokens="sglang:generation_tokens_total",
        ttft="sglang:time_to_first_token_seconds",
    ),
)


# Facts checked against sglang 0.5.23 (PyPI wheel):
# sglang/srt/arg_groups/fields/model.py: --kv-cache-dtype auto, fp8_e5m2, fp8_e4m3, mxfp8,
#   bf16/bfloat16, FP4 recipes ("fp8_e5m2 and fp8_e4m3 are supported for CUDA 11.8+").
# sglang/srt/model_executor/pool_configurator.py: cell_size = kv_heads x (head_dim +
#   v_head_dim) x layers x dtype size per token (page size 1 by default).
# sglang/srt/mem_cache/kv_cache_configurator.py _profile_available_bytes: KV pool =
#   free memory after the weights load - free memory before it x (1 - mem_fraction_static);
#   --max-total-tokens caps the pool (arg_groups/fields/schedule.py).
class SGLangKv(KvLayout):
    """SGLang's token pool: one token per page, sized from the memory free at start."""

    kv_dtypes = ("auto", "bf16", "fp8_e4m3", "fp8_e5m2")
    capacity_dtypes = ()

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        name = {"fp8": "fp8_e4m3", "bfloat16": "bf16"}.get(kv_dtype, kv_dtype)
        if name not in self.kv_dtypes:
            raise PlanRefusal(
                f"SGLang KV cache dtype {kv_dtype!r} is not one kiban plans "
                "(FP4 and mxfp8 layouts are not modelled)",
                self.kv_dtypes,
            )
        if not target.on_gpu:
            raise PlanRefusal("kiban plans SGLang on CUDA GPUs only")
        if name == "auto":
            return (dtype_format(spec),) * 2
        if name == "bf16":
            return (plain("bf16", 16),) * 2
        if target.fp8_capable is False:
            raise PlanRefusal(
                f"{name} KV cache needs an FP8-capable GPU (sm89+); {target.name} is not",
                ("auto",),
            )
        fmt = plain(name, 8, f"{name} (per-tensor scale)", quantized=True)
        return fmt, fmt

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        return (
            TORCH_CUDA_CONTEXT_BYTES
            + CUDA_GRAPHS_BYTES
            + activation_bytes(spec, _CHUNKED_PREFILL, target.tp)
            + logits_bytes(spec, min(concurrency, _CHUNKED_PREFILL))
        )

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        return [
            "SGLang sizes its pool from the memory free when it starts "
            "(--mem-fraction-static): start it after the engines listed before it on the GPU"
        ]

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        before_load = plan.free_at_start_bytes - TORCH_CUDA_CONTEXT_BYTES
        static = (plan.weights_bytes + plan.kv_cache_bytes) / before_load if before_load else 1.0
        fraction = min(0.99, math.ceil(static * 1000) / 1000)
        flags = [
            "--context-length",
            str(plan.context),
            "--max-running-requests",
            str(plan.concurrency),
            "--kv-cache-dtype",
            plan.kv_format.name,
            "--mem-fraction-static",
            f"{fraction:.3f}",
            "--max-total-tokens",
            str(plan.kv_tokens),
        ]
        if plan.tp > 1:
            flags += ["--tp-size", str(plan.tp)]
        return flags


ENVIRONMENTS = (
    EnvSpec(
        name="sglang",
        steps=(pip_install(f"sglang=={PINNED_VERSION}"),),
        smoke_imports=("sglang",),
    ),
)


def _gpu_only(device: str) -> None:
    if device == "cpu":
        raise LaunchUnsupported("kiban runs SGLang on NVIDIA GPUs only; use launch.device: gpu")


KIND = EngineKind(
    name="sglang",
    dialect=SGLangDialect(),
    launcher=SGLangLauncher(),
    image=container_image,
    environments=ENVIRONMENTS,
    metrics=METRICS,
    kv=SGLangKv(),
)


_CHUNKED_PREFILL = 8192
