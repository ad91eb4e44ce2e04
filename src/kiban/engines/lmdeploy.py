"""lmdeploy's ``lmdeploy serve api_server``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kiban.engines.dialect import Dialect, choice_regex, openai_response_format
from kiban.engines.environment import EnvSpec, pip_install
from kiban.engines.kind import EngineKind
from kiban.engines.kv_layout import KvLayout
from kiban.engines.launch import ContainerImage, Launcher, LaunchTarget, LaunchUnsupported
from kiban.engines.telemetry import EngineMetricNames, EngineMetrics
from kiban.sizing.kv import KvFormat, dtype_format, plain
from kiban.sizing.overhead import TORCH_CUDA_CONTEXT_BYTES, activation_bytes, logits_bytes
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.structured.capability import StructuredCapability, xgrammar
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig
    from kiban.sizing.plan import EnginePlan

#: the lmdeploy release whose request model (lmdeploy/serve/openai/protocol.py) the
#: dialect below is checked against in tests
PINNED_VERSION = "0.18.0"


class LMDeployDialect(Dialect):
    """lmdeploy errors come as ``{"object": "error", "message": ..., "code": ...}``;
    the default mapping turns that shape into the OpenAI one."""

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any]:
        """lmdeploy 0.18 continues a final assistant message by itself: its chat templates
        render it without the end-of-turn marker (lmdeploy/model.py messages2prompt, both
        the built-in templates and HFChatTemplate); it has no field for it."""
        return {}

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """lmdeploy 0.18.0 raises ``ErrorCode.CONTEXT_LENGTH_EXCEEDED`` (HTTP 400): "Input
        length (M) must be smaller than the model context length (N)." or "The request
        exceeds the model context length." (lmdeploy/serve/core/async_engine.py,
        exceptions.py); a stream gets it as its first event."""
        message = error.get("message")
        return (
            status == 400
            and isinstance(message, str)
            and (
                "must be smaller than the model context length" in message
                or "exceeds the model context length" in message
            )
        )

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """xgrammar for both engines since v0.10.2; ``json_object`` since v0.11.0.

        ``ResponseFormat.type`` is text, json_object, json_schema or regex_schema
        (an lmdeploy extension): no choice (sent as a regex), no grammar. The
        schema goes to xgrammar's ``compile_json_schema`` with its defaults (any
        whitespace: no knob), without vLLM's pre-check, so only what xgrammar
        enforces is declared. v0.18 compiles the format before queueing the
        request (``ensure_response_format_compilable``) and answers an error;
        TurboMind before it logged the compile error and ran unconstrained.
        """
        kinds = frozenset({"json_schema", "json_object", "regex", "choice"})
        return xgrammar(f"lmdeploy {config.version or PINNED_VERSION} (xgrammar)", kinds)

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        if constraint.kind == "regex":
            return {"response_format": {"type": "regex_schema", "regex_schema": constraint.pattern}}
        if constraint.kind == "choice":
            pattern = choice_regex(constraint.choices)
            return {"response_format": {"type": "regex_schema", "regex_schema": pattern}}
        return openai_response_format(constraint)


class LMDeployLauncher(Launcher):
    """``lmdeploy serve api_server`` from the lmdeploy environment (GPU only)."""

    def environment(self, device: str) -> str:
        _gpu_only(device)
        return "lmdeploy"

    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        # lmdeploy/cli/serve.py (v0.16.0 to 0.18.0): `serve api_server MODEL --server-name
        # --server-port --model-name`; one served name per server.
        assert engine.launch is not None
        return [
            target.program("lmdeploy"),
            "serve",
            "api_server",
            engine.launch.model,
            "--server-name",
            target.host,
            "--server-port",
            str(target.port),
            "--model-name",
            engine.models[0],
        ]


# .github/workflows/docker.yml pushes openmmlab/lmdeploy:<tag>-cu12.8 and -cu13.0 for
# each release tag; docker/Dockerfile + docker/install.sh put lmdeploy in /opt/py3/bin
# (on PATH) and install curl; docs/en/llm/api_server.md runs it with --ipc=host.
# GPU only: the image is built for CUDA, and lmdeploy has no CPU backend.
def container_image(device: str) -> ContainerImage:
    """lmdeploy's CUDA 12.8 image at the pinned release (GPU only)."""
    _gpu_only(device)
    return ContainerImage(
        image=f"openmmlab/lmdeploy:v{PINNED_VERSION}-cu12.8",
        programs={"lmdeploy": "lmdeploy"},
        ipc_host=True,
        shm_size="32Gi",
        source="lmdeploy docker/Dockerfile, docker/install.sh, .github/workflows/docker.yml",
    )


# lmdeploy 0.18 serves /metrics on the API port by default (cli/utils.py offers only
# ``--disable-metrics``; the older ``--enable-metrics`` is refused as an unknown
# argument, seen on the H200): no launch flag, the base class's empty default.
METRICS = EngineMetrics(
    names=EngineMetricNames(
        kv_cache_usage="lmdeploy:gpu_cache_usage_perc",
        requests_running="lmdeploy:num_requests_running",
        requests_waiting="lmdeploy:num_requests_waiting",
        prompt_tokens="lmdeploy:prompt_tokens_total",
        generation_tokens="lmdeploy:generation_tokens_total",
        ttft="lmdeploy:time_to_first_token_seconds",
    ),
)


# Facts checked against lmdeploy 0.18.0 (PyPI wheel) unless noted:
# lmdeploy/messages.py: QuantPolicy 0/4/8/16(fp8)/17(fp8_e5m2)/42(TurboQuant);
#   TurbomindEngineConfig asserts "FP8 quantization is not supported";
#   cache_max_entry_count = fraction of FREE memory after the weights load (since
#   v0.2.2); cache_block_seq_len = block_size = 64; max_prefill_token_num = 8192.
# lmdeploy/turbomind/supported_models.py SUPPORTED_ARCHS (no MiniCPMV since 0.14, PR #4557).
# lmdeploy/vl/model/minicpmv.py: "Only support v2.5 and v2.6".
# lmdeploy/pytorch/engine/executor/base.py _get_runtime_size: the PyTorch engine takes
#   (max_prefill_token_num + 2 x max_batches) x vocab x 2 bytes off free memory first.
# src/turbomind/kernels/attention/block.h (InternLM/lmdeploy): per token and head,
#   K and V each store head_dim x bits / 8 bytes plus t_bits x 2 / 8 = 4 bytes of
#   fp16/bf16 scale and zero point when quantized (int8 d=128: 132 B; int4: 68 B);
#   src/turbomind/models/llama/object_cache_plan.cc (HEAD) builds the cache from that
#   layout per layer with cache_block_seq_len tokens a block.
# lmdeploy/utils.py get_max_batch_size: 128 on GPUs other than A100/H100/H200/H800/L20Y.
# docs/en/supported_models/supported_models.md: TurboMind KV int8/int4 need head_dim 128;
#   the PyTorch engine quantizes no KV cache for MiniCPM-V or Qwen2.5-VL.
class LMDeployKv(KvLayout):
    """TurboMind's and the PyTorch engine's cache: 64-token blocks, a fraction of free memory."""

    kv_dtypes = ("0", "8", "4", "16", "17")
    capacity_dtypes = ("int8", "int4")

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        policy = _LMDEPLOY_POLICIES.get(kv_dtype.lower())
        if policy is None:
            raise PlanRefusal(
                f"lmdeploy has no KV cache setting {kv_dtype!r}",
                ("auto (0)", "int8 (8)", "int4 (4)"),
            )
        if not target.on_gpu:
            raise PlanRefusal("lmdeploy has no CPU backend (cuda, ascend, maca, camb only)")
        capability = target.gpu.compute_capability if target.gpu is not None else None
        if capability is not None and capability < (7, 0):
            raise PlanRefusal(f"lmdeploy needs sm70 or newer; {target.name} is older")
        _check_model(spec)
        backend = backend_for(spec, target.args)
        if policy == 0:
            return (dtype_format(spec, "0"),) * 2
        if policy == 42:
            raise PlanRefusal(
                "TurboQuant (quant_policy 42) packs K and V unevenly; kiban does not model its "
                "layout",
                ("int8 (8)", "int4 (4)"),
            )
        if policy in (16, 17):
            if backend == "turbomind":
                raise PlanRefusal(
                    "fp8 KV (quant_policy 16/17) is PyTorch-engine only and "
                    f"{spec.architecture} runs on TurboMind (it asserts 'FP8 quantization is "
                    "not supported')",
                    ("int8 (8)", "int4 (4)"),
                )
            if target.fp8_capable is False:
                raise PlanRefusal(
                    f"fp8 KV needs an FP8-capable GPU (sm89+); {target.name} is not",
                    ("int8 (8)", "int4 (4)"),
                )
            fmt = plain(str(policy), 8, "fp8 (per-tensor scale)", quantized=True)
            return fmt, fmt
        if spec.family == "minicpmv":
            raise PlanRefusal(
                "MiniCPM-V left lmdeploy's TurboMind in 0.14 (PR #4557 removed MiniCPMV from "
                "SUPPORTED_ARCHS); it runs on the PyTorch engine, which does not quantize its "
                "KV cache (supported_models.md)",
                ("auto (0)",),
            )
        if spec.mla is not None:
            raise PlanRefusal(
                "kiban does not model lmdeploy's int8/int4 layout for MLA (latent) caches",
                ("auto (0)", "fp8 (16)"),
            )
        if backend == "turbomind" and spec.head_dim != 128:
            raise PlanRefusal(
                f"TurboMind quantizes the KV cache only for head_dim 128 (this model: "
                f"{spec.head_dim})",
                ("auto (0)",),
            )
        label = f"int{policy} (fp16 scale + zero per token and head)"
        fmt = KvFormat(str(policy), label, policy, 1, 0, 4, True)
        return fmt, fmt

    def kv_block_tokens(self, target: PlanTarget) -> int:
        return 64

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        """CUDA context, prefill activations and logits; the PyTorch engine also reserves
        (max_prefill_token_num + 2 x max_batches) x vocab x 2 bytes before its cache."""
        overhead = (
            TORCH_CUDA_CONTEXT_BYTES
            + activation_bytes(spec, _MAX_PREFILL_TOKENS, target.tp)
            + logits_bytes(spec, concurrency)
        )
        if backend_for(spec, target.args) == "pytorch":
            overhead += _pytorch_runtime_reserve(spec, concurrency)
        return overhead

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        warnings = []
        if k.name == "4" and spec.family in {"qwen2", "qwen3", "minicpmv"}:
            warnings.append(
                "int4 KV (quant_policy 4) on Qwen-family models loses accuracy badly (large "
                "k_proj biases; lmdeploy issues 2822, 3752, 4743); prefer quant_policy 8"
            )
        if spec.family == "minicpmv":
            warnings.append(
                "MiniCPM-V runs on lmdeploy's PyTorch engine (TurboMind dropped it in 0.14); "
                "older docs that list TurboMind KV int8/int4 for it are stale"
            )
        if backend_for(spec, target.args) == "turbomind":
            warnings.append(
                "TurboMind silently shortens session_len when its blocks run out; the planned "
                "--cache-max-entry-count leaves room for session_len x max_batch_size"
            )
        warnings.append(
            "lmdeploy sizes its cache as a fraction of the memory free after its weights load: "
            "start it after the engines listed before it on the same GPU"
        )
        return warnings

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        backend = backend_for(plan.model, plan.args)
        free_after_weights = (
            plan.free_at_start_bytes - plan.weights_bytes - TORCH_CUDA_CONTEXT_BYTES
        )
        if backend == "pytorch":
            free_after_weights -= _pytorch_runtime_reserve(plan.model, plan.concurrency)
        ratio = plan.kv_cache_bytes / free_after_weights if free_after_weights > 0 else 1.0
        ratio = min(0.99, max(0.01, math.floor(ratio * 10000) / 10000))
        flags = [
            "--backend",
            backend,
            "--quant-policy",
            plan.kv_format.name,
            "--cache-max-entry-count",
            f"{ratio:.4f}",
            "--session-len",
            str(plan.context),
            "--max-batch-size",
            str(plan.concurrency),
        ]
        if plan.tp > 1:
            flags += ["--tp", str(plan.tp)]
        return flags


ENVIRONMENTS = (
    EnvSpec(
        name="lmdeploy",
        steps=(pip_install(f"lmdeploy=={PINNED_VERSION}"),),  # the dialect's version
        smoke_imports=("lmdeploy",),
    ),
)


def _gpu_only(device: str) -> None:
    if device == "cpu":
        raise LaunchUnsupported("lmdeploy has no CPU backend; use launch.device: gpu")


KIND = EngineKind(
    name="lmdeploy",
    dialect=LMDeployDialect(),
    launcher=LMDeployLauncher(),
    image=container_image,
    environments=ENVIRONMENTS,
    metrics=METRICS,
    kv=LMDeployKv(),
)


_MAX_PREFILL_TOKENS = 8192
#: kiban's generic names and lmdeploy's own (numbers and QuantPolicy names) -> policy
_LMDEPLOY_POLICIES = {
    "auto": 0,
    "0": 0,
    "none": 0,
    "bf16": 0,
    "fp16": 0,
    "int8": 8,
    "8": 8,
    "int4": 4,
    "4": 4,
    "fp8": 16,
    "fp8_e4m3": 16,
    "16": 16,
    "fp8_e5m2": 17,
    "17": 17,
    "turbo_quant": 42,
    "42": 42,
}
#: lmdeploy/turbomind/supported_models.py SUPPORTED_ARCHS at 0.18.0
TURBOMIND_ARCHS = frozenset(
    {
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
        "InternS2PreviewForConditionalGeneration",
        "InternS2MobiusForConditionalGeneration",
        "InternVLChatModel",
        "InternVLForConditionalGeneration",
        "InternS1ForConditionalGeneration",
        "LlamaForCausalLM",
        "InternLM2ForCausalLM",
        "InternLM3ForCausalLM",
        "Glm4MoeLiteForCausalLM",
        "GptOssForCausalLM",
        "MixtralForCausalLM",
    }
)


def _pytorch_runtime_reserve(spec: ModelSpec, concurrency: int) -> int:
    """lmdeploy/pytorch/engine/executor/base.py _get_runtime_size (before halving)."""
    return (_MAX_PREFILL_TOKENS + 2 * concurrency) * spec.vocab_size * 2


def backend_for(spec: ModelSpec, args: tuple[str, ...] = ()) -> str:
    """The engine lmdeploy runs the model on: ``--backend`` from launch.args when given
    (e.g. ``pytorch`` where TurboMind is not installed), else ``turbomind`` for the
    architectures TurboMind lists and ``pytorch`` for the rest."""
    for i, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        if flag == "--backend":
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            if value in ("turbomind", "pytorch"):
                return value
    return "turbomind" if spec.architecture in TURBOMIND_ARCHS else "pytorch"


def _check_model(spec: ModelSpec) -> None:
    """Models lmdeploy refuses whatever the KV setting."""
    if spec.family == "minicpmv" and spec.version not in {"2.5", "2.6"}:
        raise PlanRefusal(
            f"lmdeploy supports MiniCPM-V 2.5 and 2.6 only (lmdeploy/vl/model/minicpmv.py: "
            f"'Only support v2.5 and v2.6'); this is version {spec.version} "
            "(lmdeploy issues 3901, 4050); serve it with vLLM or llama.cpp"
        )
