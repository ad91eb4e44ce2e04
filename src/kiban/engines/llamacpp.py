"""llama.cpp's native ``llama-server``.

Its errors already have the OpenAI shape (``{"error": {"code", "message",
"type"}}``, tools/server/server-common.cpp ``format_error_response``), so the
default `EngineKind.error_to_openai` passes them through; an exception the HTTP
layer catches comes back as plain text, which the default wraps.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from kiban.engines.base import EngineKind, StartupReport, choice_gbnf
from kiban.structured.capability import CORE_FEATURES, SILENTLY_SKIPPED, StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig

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
#: common/chat.cpp, when the generated text does not parse as the chat format, e.g.
#: guided JSON cut off at max_tokens (answered as HTTP 500)
_UNPARSED_OUTPUT = "The model produced output that does not match the expected"


MIB = 1024 * 1024

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


class LlamaCpp(EngineKind):
    """llama-server answers /health with 503 while the model loads, 200 when ready."""

    name = "llamacpp"

    # -- start-up report --

    #: libllama's INFO lines (KV cache and buffer sizes) show from verbosity 4 on
    #: (common/log.cpp maps GGML INFO to LOG_LEVEL_TRACE); errors show at any level.
    #: Measured on the tiny model: about 30 log lines per request instead of 8.
    startup_log_args: ClassVar[tuple[str, ...]] = ("--log-verbosity", "4")

    def startup_report(self, log_text: str) -> StartupReport:
        """KV capacity, device and errors from one start's log (needs `startup_log_args`).

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

    # -- structured output --

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

    def structured_output_error(self, status: int, message: str) -> OutputFailure | None:
        if status == 500 and message.startswith(_UNPARSED_OUTPUT):
            return OutputFailure(
                "invalid_json",
                f"llama.cpp could not parse the model's output ({message}); guided JSON cut off "
                "at max_tokens looks like this",
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


def _device_of(buffers: list[str]) -> str | None:
    """``"cuda"`` when any weights or KV landed in a CUDA0.. buffer, else ``"cpu"``.

    Buffer names are ggml backend names: CPU, CPU_Mapped, CUDA_Host (pinned host
    memory) stay on the CPU; CUDA0, ROCm0, Vulkan0, Metal, ... are devices.
    """
    devices = [b for b in buffers if not b.startswith("CPU") and not b.endswith("_Host")]
    if devices:
        return re.sub(r"\d+$", "", devices[0]).lower()
    return "cpu" if buffers else None
