"""llama.cpp's native ``llama-server``.

Its errors already have the OpenAI shape (``{"error": {"code", "message",
"type"}}``, tools/server/server-common.cpp ``format_error_response``), so the
default `Dialect.error_to_openai` passes them through; an exception the HTTP
layer catches comes back as plain text, which the default wraps.
"""

from __future__ import annotations

import platform
import re
from typing import TYPE_CHECKING, Any, ClassVar

from kiban.engines.dialect import Dialect, TokenCount, choice_gbnf
from kiban.engines.environment import EnvSpec, Step
from kiban.engines.kind import EngineKind
from kiban.engines.kv_layout import KvLayout
from kiban.engines.launch import ContainerImage, Launcher, LaunchTarget
from kiban.engines.telemetry import EngineMetricNames, EngineMetrics, StartupLog, StartupReport
from kiban.sizing.kv import KvFormat, KvNeed, blocks, plain
from kiban.sizing.overhead import NATIVE_CUDA_CONTEXT_BYTES, activation_bytes, logits_bytes
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.structured.capability import CORE_FEATURES, SILENTLY_SKIPPED, StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig
    from kiban.sizing.plan import EnginePlan

#: what common/json-schema-to-grammar.cpp turns into grammar (llama.cpp as vendored
#: in llama-cpp-python 0.3.36). Patterns must be ^...$-anchored, else "accepting any
#: string" with only a warning; numeric bounds on integers only; string length not
#: beside pattern/format; additionalProperties defaults to false (stricter, still valid);
#: oneOf is generated as anyOf (seen letting a value matching two branches through).
LLAMACPP_FEATURES = CORE_FEATURES | frozenset(
    {
        "allOf",
        "allOf-multi",
        "prefixItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
LLAMACPP_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
#: common/chat.cpp, when the generated text does not parse as the chat format: guided
#: JSON cut off at max_tokens (answered as HTTP 500, without the text)
_UNPARSED_OUTPUT = "The model produced output that does not match the expected"

MIB = 1024 * 1024

#: the llama.cpp kiban runs: the commit llama-cpp-python 0.3.36 vendors (its engine
#: environments build it), which is llama.cpp's release b11312
#: (0c1e57098bba43ac29e6e3b677cdceebdd22334f), so its images are tagged *-b11312
LLAMA_CPP_COMMIT = "0c1e570"
LLAMA_CPP_BUILD = 11312

# Log lines look like "0.00.114.557 I llama_kv_cache: ..." (timestamp, level letter,
# message); with --no-log-prefix only the message is left.
_PREFIX = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?(?:(?P<level>[IWED]) )?(?P<msg>.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# llama_kv_cache: size =    1.00 MiB (   512 cells,   2 layers,  2/2 seqs), K (f16): ...
_KV_SIZE = re.compile(
    r"llama_kv_cache: size = *(?P<mib>[\d.]+) MiB "
    r"\( *(?P<cells>\d+) cells, *\d+ layers, *\d+/(?P<streams>\d+) seqs\)"
)
# load_tensors:   CPU_Mapped model buffer size =     8.51 MiB
# llama_kv_cache:        CPU KV buffer size =     1.00 MiB
_BUFFER = re.compile(r"^(?:load_tensors|llama_kv_cache): +(?P<buffer>\S+) (?:model|KV) buffer size")
# argument errors are printed before logging starts, without a prefix:
# error while handling argument "-ctk": Unsupported cache type: q9
_ARG_ERROR = re.compile(r"^error\b", re.IGNORECASE)


class LlamaCppDialect(Dialect):
    """Errors already have the OpenAI shape; structured output through top-level fields."""

    #: llama-server b11312 ignores ``continuous_usage_stats``, but with ``timings_per_token``
    #: every event carries ``timings.predicted_n``, the tokens generated so far (seen on the
    #: pinned build: a character of two tokens is one event with predicted_n 2, 4, ...)
    token_count = TokenCount({"timings_per_token": True}, "timings", "predicted_n")

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any] | None:
        """llama-server at the pinned commit takes ``continue_final_message`` (tools/server/
        server-common.cpp oaicompat_chat_params_parse): the Jinja template renders the messages
        before the last with the generation prompt, then the last message's content
        (common/chat.cpp), and the stream leaves that prefill out (server-task.cpp,
        is_continuation; a non-streamed answer repeats it, as seen in
        test_continuation_real_engines.py). A trailing assistant message alone is prefilled
        as well unless --no-prefill-assistant, but only the explicit field keeps the prefill
        out of the stream. The legacy (--no-jinja) renderer ignores the field and closes the
        message."""
        if config.launch is not None and "--no-jinja" in config.launch.args:
            return None
        return {"continue_final_message": True, "add_generation_prompt": False}

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """JSON Schema and GBNF grammars; no regex field. Whitespace is bounded by the
        converter itself (``space ::= | " " | "\\n" [ \\t]{0,20}``)."""
        kinds = frozenset({"json_schema", "json_object", "choice", "grammar"})
        return StructuredCapability(
            enforced=kinds,
            expressible=kinds,
            features=LLAMACPP_FEATURES,
            formats=LLAMACPP_FORMATS,
            skipped=SILENTLY_SKIPPED,
            describes=f"llama.cpp {config.version or 'server'}",
        )

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """HTTP 400 of type ``exceed_context_size_error``: "request (M tokens) exceeds the
        available context size (N tokens), try increasing it" (tools/server/
        server-context.cpp and server-common.cpp ``format_error_response``, b11312)."""
        return status == 400 and error.get("type") == "exceed_context_size_error"

    def structured_output_error(self, status: int, message: str) -> OutputFailure | None:
        if status == 500 and message.startswith(_UNPARSED_OUTPUT):
            return OutputFailure(
                "truncated",
                f"llama.cpp could not parse the model's output ({message}): guided JSON cut "
                "off at max_tokens; raise max_tokens",
            )
        return None

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """Top-level ``json_schema`` or ``grammar`` (tools/server/server-common.cpp).

        Not the README's ``response_format: {"type": "json_schema", "schema": ...}``:
        the server does not read that shape and generates unconstrained.
        """
        if constraint.kind == "json_schema":
            return {"json_schema": constraint.schema}
        if constraint.kind == "json_object":
            return {"json_schema": {"type": "object"}}
        if constraint.kind == "choice":
            return {"grammar": choice_gbnf(constraint.choices)}
        return {"grammar": constraint.grammar}


class LlamaServerLauncher(Launcher):
    """``llama-server`` from the llamacpp-cpu or llamacpp-cuda environment."""

    def environment(self, device: str) -> str:
        return "llamacpp-cpu" if device == "cpu" else "llamacpp-cuda"

    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        assert engine.launch is not None
        return [
            target.program("llama-server"),
            "--model",
            engine.launch.model,
            "--host",
            target.host,
            "--port",
            str(target.port),
            "--alias",
            engine.models[0],
        ]


# ggml-org/llama.cpp publishes ghcr.io/ggml-org/llama.cpp:server-cuda-b<build> (CUDA 12
# runtime) and :server-b<build> (CPU) from .devops/cuda.Dockerfile and cpu.Dockerfile:
# the `server` stage has /app/llama-server as ENTRYPOINT, installs curl and checks
# /health with it; no shared-memory needs (one process).
def container_image(device: str) -> ContainerImage:
    """llama.cpp's server image at the pinned build (``server-cuda`` or ``server``)."""
    variant = "server" if device == "cpu" else "server-cuda"
    return ContainerImage(
        image=f"ghcr.io/ggml-org/llama.cpp:{variant}-b{LLAMA_CPP_BUILD}",
        programs={"llama-server": "/app/llama-server"},
        source="llama.cpp .devops/cuda.Dockerfile, .devops/cpu.Dockerfile (server stage)",
    )


# /metrics answers only with --metrics. Current llama-server exports no KV-cache
# usage gauge (older builds had llamacpp:kv_cache_usage_ratio) and no TTFT histogram.
METRICS = EngineMetrics(
    launch_args=("--metrics",),
    names=EngineMetricNames(
        requests_running="llamacpp:requests_processing",
        requests_waiting="llamacpp:requests_deferred",
        prompt_tokens="llamacpp:prompt_tokens_total",
        generation_tokens="llamacpp:tokens_predicted_total",
    ),
)


class LlamaCppStartupLog(StartupLog):
    """llama-server logs its KV cache and buffer sizes at verbosity 4."""

    #: libllama's INFO lines (KV cache and buffer sizes) show from verbosity 4 on
    #: (common/log.cpp maps GGML INFO to LOG_LEVEL_TRACE); errors show at any level.
    #: Measured on the tiny model: about 30 log lines per request instead of 8.
    args: ClassVar[tuple[str, ...]] = ("--log-verbosity", "4")

    def report(self, log_text: str) -> StartupReport:
        """KV capacity, device and errors from one start's log (needs `args`).

        KV bytes add up every ``llama_kv_cache`` (SWA models and draft models have
        several); tokens are the largest cache's cells times its streams (without
        ``--kv-unified`` each of ``-np`` slots has its own stream of ``-c/-np`` cells).
        llama.cpp prints sizes in MiB with two decimals, so bytes are exact only to
        about 5 KiB.
        """
        kv_bytes, kv_tokens, errors, buffers = 0, 0, [], []
        found_kv = False
        for raw in log_text.splitlines():
            line = _ANSI.sub("", raw).rstrip()
            prefix = _PREFIX.match(line)
            level, msg = (prefix["level"], prefix["msg"]) if prefix else (None, line)
            if level == "E" or (level is None and _ARG_ERROR.match(msg)):
                if msg not in errors:
                    errors.append(msg)
            elif kv := _KV_SIZE.search(msg):
                found_kv = True
                kv_bytes += round(float(kv["mib"]) * MIB)
                kv_tokens = max(kv_tokens, int(kv["cells"]) * int(kv["streams"]))
            elif buffer := _BUFFER.match(msg):
                buffers.append(buffer["buffer"])
        return StartupReport(
            kv_cache_tokens=kv_tokens if found_kv else None,
            kv_cache_bytes=kv_bytes if found_kv else None,
            device=_device_of(buffers),
            errors=errors,
        )


# Facts checked against llama.cpp as vendored in llama-cpp-python 0.3.36 (PyPI sdist):
# src/llama-kv-cache.cpp: per layer ggml_new_tensor_3d(type_k, n_embd_k_gqa, kv_size,
#   n_stream) and the same for V (none for MLA models); n_stream = 1 if unified else
#   n_seq_max; kv_size is the per-stream context.
# src/llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256); without --kv-unified
#   n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256); "quantized V cache was requested,
#   but this requires Flash Attention"; MLA models refuse different K and V types.
# src/llama-kv-cache-iswa.cpp: SWA layers keep GGML_PAD(min(n_ctx_seq, n_swa + n_ubatch), 256).
# tools/server/server.cpp: -np unset means 4 slots with a unified cache.
# common/arg.cpp: -ctk/-ctv, -fa on|off|auto, -np, -ngl, --fit on|off, --kv-unified.
# ggml block sizes (gguf.GGML_QUANT_SIZES): q8_0 34 B / 32 values, q4_0 18 B / 32,
#   q4_1 20, iq4_nl 18, q5_0 22, q5_1 24.
# The input embedding (token_embd) stays in host memory whatever -ngl says.


class LlamaCppKv(KvLayout):
    """llama.cpp's per-slot streams of 256-token padded cells."""

    kv_dtypes = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0")
    capacity_dtypes = ("q8_0", "q4_0")
    kv_sized_by_tokens = True

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        names = [
            _LLAMA_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in kv_dtype.split("/")
        ]
        if len(names) > 2 or any(n not in _LLAMA_TYPES for n in names):
            raise PlanRefusal(
                f"llama.cpp has no KV cache type {kv_dtype!r} (no fp8 either); it takes "
                f"{', '.join(self.kv_dtypes)}, or K/V such as q8_0/q4_0",
                ("q8_0", "q4_0"),
            )
        k, v = _LLAMA_TYPES[names[0]], _LLAMA_TYPES[names[-1]]
        if spec.mla is not None and k.name != v.name:
            raise PlanRefusal("llama.cpp: MLA models need the same K and V cache type")
        if v.quantized and _flash_attention_off(target):
            raise PlanRefusal(
                "llama.cpp: a quantized V cache needs flash attention (llama-context.cpp: "
                "'quantized V cache was requested, but this requires Flash Attention'), and "
                "launch.args turn it off",
                (f"{k.name}/f16", "removing -fa off"),
            )
        k_values, v_values = spec.kv_elements_per_token(tp=1)
        for fmt, values in ((k, k_values), (v, v_values)):
            if fmt.block_values > 1 and values % fmt.block_values:
                raise PlanRefusal(
                    f"llama.cpp: {fmt.name} stores blocks of 32 values; rows of {values} "
                    "do not divide",
                    ("f16",),
                )
        return k, v

    def weights_on_device(self, spec: ModelSpec, target: PlanTarget) -> int:
        if not target.on_gpu:
            return spec.weights_bytes
        return -(-(spec.weights_bytes - spec.embedding_bytes) // target.tp)

    def kv_block_tokens(self, target: PlanTarget) -> int:
        return _PAD

    def kv_cache_bytes(
        self, need: KvNeed, context: int, concurrency: int, target: PlanTarget
    ) -> int:
        """Bytes for -np *concurrency* slots of *context* tokens (non-unified streams)."""
        per_slot = blocks(context, _PAD) * _PAD
        cells = concurrency * per_slot
        window = min(per_slot, blocks(need.window + _N_UBATCH, _PAD) * _PAD) if need.window else 0
        sliding = concurrency * window * need.sliding_bytes_per_token
        return cells * need.bytes_per_token + sliding

    def kv_capacity_tokens(
        self, need: KvNeed, kv_bytes: int, context: int, target: PlanTarget
    ) -> int:
        per_token = need.bytes_per_token + need.sliding_bytes_per_token
        return kv_bytes // per_token // _PAD * _PAD

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        compute = max(logits_bytes(spec, _N_UBATCH) // 2, activation_bytes(spec, _N_UBATCH) * 2)
        context_bytes = NATIVE_CUDA_CONTEXT_BYTES if target.on_gpu else 0
        return context_bytes + compute

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        warnings = []
        if k.name != v.name and target.on_gpu:
            warnings.append(
                f"mixed K/V cache types ({k.name}/{v.name}) on CUDA need a llama.cpp build with "
                "-DGGML_CUDA_FA_ALL_QUANTS=ON, else they fall back to a slow path or fail"
            )
        if k.name.startswith(("q4", "iq4")) and spec.family in {"qwen2", "minicpmv"}:
            warnings.append(
                "a 4-bit K cache on Qwen2/Qwen2.5-family models collapses quality (large k_proj "
                "biases; llama.cpp issue 21385); prefer q8_0 for K"
            )
        if spec.sliding_layers:
            warnings.append("sliding-window layers planned with llama.cpp's iSWA cache sizes")
        return warnings

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        """The cache, slots and offload the plan sized; over several GPUs, an even split.

        On several GPUs the plan gives each the same share, so the split is pinned to
        equal proportions (``--tensor-split 1,1``) instead of llama.cpp's default
        split by free memory; ``--split-mode layer`` (llama.cpp's default, stable)
        puts whole layers and their KV cells on each GPU (common/arg.cpp also has
        ``row`` and an experimental ``tensor``).
        """
        per_slot = blocks(plan.context, _PAD) * _PAD
        split = []
        if plan.on_gpu and plan.tp > 1:
            split = ["--split-mode", "layer", "--tensor-split", ",".join(["1"] * plan.tp)]
        return [
            "-c",
            str(per_slot * plan.concurrency),
            "-np",
            str(plan.concurrency),
            "-ngl",
            "999" if plan.on_gpu else "0",
            "-fa",
            "on",
            "-ctk",
            plan.kv_format.name,
            "-ctv",
            plan.kv_format_v.name,
            "--fit",
            "off",
            *split,
            *_cpu_flags(plan.cpus),
        ]


#: llama-cpp-python's sdist vendors llama.cpp; this release ships ggml-org/llama.cpp@0c1e570
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_LLAMACPP_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_LLAMACPP_SOURCE = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
#: parts of the sdist the server build never reads: vocab test models, docs, the submodule link
_LLAMACPP_UNUSED = ("models", "docs", "media", ".git")

#: GGML_NATIVE compiles ggml's AMX matmul in on Sapphire Rapids and later Xeons, and in this
#: version its first tile instruction faults (``ldtilecfg`` of a tile configuration the
#: compiler left invalid: SIGSEGV in the warm-up of any model with an AMX buffer, e.g. the
#: Q4_1 SmolLM2; ggml-org/llama.cpp#26954, open). GCC's -mno-amx-* win over -march=native
#: in any order, so x86-64 builds stay native but without AMX (AVX-512 and VNNI kept).
_NO_AMX = tuple(
    f"-DCMAKE_{lang}_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" for lang in ("C", "CXX")
)
LLAMACPP_CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: no libs beside it, no rpath
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives in tools/; only its target is built
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of a prebuilt one
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS: models come from disk, never from a hub
    "-DGGML_CCACHE=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",  # the sdist has no git history to read it from
    "-DLLAMA_BUILD_NUMBER=0",
    *(_NO_AMX if platform.machine() in ("x86_64", "AMD64") else ()),
)
#: flash-attention kernels for every K/V type pair, so mixed cache types (q8_0 K, q4_0 V)
#: run on the GPU; by default only q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16 are compiled
#: and other pairs fall back to the f16 kernel. In this version ``GGML_CUDA_FA_QUANTS=all``
#: replaces the deprecated ``GGML_CUDA_FA_ALL_QUANTS=ON`` (ggml/cmake/common.cmake).
LLAMACPP_CUDA_FLAGS: tuple[str, ...] = ("-DGGML_CUDA=ON", "-DGGML_CUDA_FA_QUANTS=all")


def llamacpp_spec(name: str, extra_cmake_flags: tuple[str, ...] = ()) -> EnvSpec:
    """Build llama.cpp's native ``llama-server`` into ``<env>/bin`` from the pinned sdist.

    Checked in the vendored sources (``common/arg.cpp``, ``tools/server``) of
    llama-cpp-python 0.3.36 = llama.cpp 0c1e570 (2026-10-01), the newest release
    when pinned: ``-fa on|off|auto``, ``--fit on|off`` (default on) and
    ``--fit-ctx``, ``-ctk``/``-ctv`` (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl,
    q5_0, q5_1), ``-c``, ``-np`` (default -1 = auto), ``-ngl`` (N, auto, all),
    ``--kv-unified``/``--no-kv-unified``, ``--kv-unified-per-slot``, ``--metrics``
    (``llamacpp:*`` names), ``-a/--alias``, ``--no-webui``; requests take
    ``json_schema``, ``grammar`` and OpenAI ``response_format``. A quantized V
    cache with ``-fa off`` refuses to start ("quantized V cache requires
    flash_attn to be enabled").

    The source and build trees are deleted once the binary is installed; GGML_NATIVE
    (default on) tunes the build for the CPU (and GPU) of the machine that builds it.
    """
    src, build = "{root}/src", "{root}/build"
    unused = tuple(f"--exclude={_LLAMACPP_SOURCE}/{part}" for part in _LLAMACPP_UNUSED)
    requirement = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    pip_download = ("{python}", "-m", "pip", "download", "{pip_extra}", "--no-deps")
    sdist_only = ("--no-binary", ":all:", "--dest", src)
    configure = ("cmake", "-S", f"{src}/{_LLAMACPP_SOURCE}", "-B", build, *LLAMACPP_CMAKE_FLAGS)
    return EnvSpec(
        name=name,
        steps=(
            Step(f"pip download {requirement} (sdist)", (*pip_download, *sdist_only, requirement)),
            Step(
                "unpack vendor/llama.cpp",
                ("tar", "-xzf", f"{src}/{_LLAMACPP_SDIST}", "-C", src, *unused, _LLAMACPP_SOURCE),
            ),
            Step("cmake configure", (*configure, *extra_cmake_flags)),
            Step(
                "cmake build llama-server",
                ("cmake", "--build", build, "--target", "llama-server", "--parallel", "{jobs}"),
                progress=r"^\[\s*(\d+%)\]",
            ),
            Step(
                "install llama-server",
                ("cmake", "-E", "copy", f"{build}/bin/llama-server", "{root}/bin/llama-server"),
            ),
            Step("remove source and build trees", ("cmake", "-E", "rm", "-rf", src, build)),
            Step("llama-server --version", ("{root}/bin/llama-server", "--version")),
        ),
    )


KIND = EngineKind(
    name="llamacpp",
    dialect=LlamaCppDialect(),
    launcher=LlamaServerLauncher(),
    image=container_image,
    environments=(
        llamacpp_spec("llamacpp-cpu"),
        llamacpp_spec("llamacpp-cuda", LLAMACPP_CUDA_FLAGS),
    ),
    metrics=METRICS,
    startup_log=LlamaCppStartupLog(),
    kv=LlamaCppKv(),
)


def _cpu_flags(cpus: tuple[int, ...]) -> list[str]:
    """One thread per given core, bound to those cores (common/arg.cpp: ``--cpu-range`` takes
    one range; ``--cpu-mask`` any set, as hex; ``--cpu-strict 1`` pins each thread)."""
    if not cpus:
        return []
    mask = sum(1 << core for core in cpus)
    return ["--threads", str(len(cpus)), "--cpu-mask", f"{mask:x}", "--cpu-strict", "1"]


def _device_of(buffers: list[str]) -> str | None:
    """``"cuda"`` when any weights or KV landed in a CUDA0.. buffer, else ``"cpu"``.

    Buffer names are ggml backend names: CPU, CPU_Mapped, CUDA_Host (pinned host
    memory) stay on the CPU; CUDA0, ROCm0, Vulkan0, Metal, ... are devices.
    """
    devices = [b for b in buffers if not b.startswith("CPU") and not b.endswith("_Host")]
    if devices:
        return re.sub(r"\d+$", "", devices[0]).lower()
    return "cpu" if buffers else None


_PAD = 256
_N_UBATCH = 512
_LLAMA_TYPES = {
    "f32": plain("f32", 32),
    "f16": plain("f16", 16),
    "bf16": plain("bf16", 16),
    "q8_0": KvFormat("q8_0", "q8_0 (34 B per 32 values)", 8.5, 32, 34, 0, True),
    "q5_1": KvFormat("q5_1", "q5_1 (24 B per 32 values)", 6, 32, 24, 0, True),
    "q5_0": KvFormat("q5_0", "q5_0 (22 B per 32 values)", 5.5, 32, 22, 0, True),
    "q4_1": KvFormat("q4_1", "q4_1 (20 B per 32 values)", 5, 32, 20, 0, True),
    "iq4_nl": KvFormat("iq4_nl", "iq4_nl (18 B per 32 values)", 4.5, 32, 18, 0, True),
    "q4_0": KvFormat("q4_0", "q4_0 (18 B per 32 values)", 4.5, 32, 18, 0, True),
}
#: kiban's generic names -> llama.cpp's (llama.cpp's own default is f16, not the model dtype)
_LLAMA_ALIASES = {"auto": "f16", "fp16": "f16", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}


def _flash_attention_off(target: PlanTarget) -> bool:
    """Whether launch.args switch flash attention off (``-fa off``, ``--flash-attn=0``, ...)."""
    value = target.arg_value("-fa", "--flash-attn")
    return value is not None and value.lower() in {"off", "0", "false"}
