"""LlamaCppStartupLog.report and error shapes on lines copied from real llama-server runs.

The runs: llama-server of llama.cpp 0c1e570 (llama-cpp-python 0.3.36, the pinned
``llamacpp-cpu`` env) on the tiny GGUF (2 layers, 2 KV heads, head_dim 64) with
``-ngl 0 --fit off --log-verbosity 4``.
"""

from __future__ import annotations

import orjson

from kiban.engines.llamacpp import MIB, LlamaCppDialect, LlamaCppStartupLog

STARTUP_LOG = LlamaCppStartupLog()
DIALECT = LlamaCppDialect()

# -c 1024 -np 2 (no --kv-unified: two streams of 512 cells), f16 K and V
F16_TWO_STREAMS = """\
0.00.054.625 I cmn  common_param:   - CPU     : AMD EPYC (24105 MiB, 24105 MiB free)
0.00.107.305 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.00.113.731 I load_tensors:   CPU_Mapped model buffer size =     8.51 MiB
0.00.113.957 I llama_context: constructing llama_context
0.00.113.959 I llama_context: n_seq_max             = 2
0.00.113.960 I llama_context: n_ctx                 = 1024
0.00.113.960 I llama_context: n_ctx_seq             = 512
0.00.113.961 I llama_context: flash_attn            = auto
0.00.113.962 I llama_context: kv_unified            = false
0.00.113.972 I llama_context:        CPU  output buffer size =     0.02 MiB
0.00.114.017 I llama_kv_cache:        CPU KV buffer size =     1.00 MiB
0.00.114.557 I llama_kv_cache: size =    1.00 MiB (   512 cells,   2 layers,  2/2 seqs), \
K (f16):    0.50 MiB, V (f16):    0.50 MiB
0.00.114.558 I llama_kv_cache: attn_rot_k = 0, n_embd_head_k_all = 64
0.00.115.359 I sched_reserve:        CPU compute buffer size =     4.51 MiB
0.17.842.500 I srv  llama_server: model loaded
0.17.842.519 I srv  llama_server: listening on http://127.0.0.1:18771
"""

# -c 8192 -np 2 --kv-unified -ctk q8_0 -fa off: one stream of 8192 cells, q8_0 K, f16 V
Q8_K_UNIFIED = """\
0.00.046.572 I load_tensors:   CPU_Mapped model buffer size =     8.51 MiB
0.00.046.762 I llama_context: flash_attn            = disabled
0.00.075.058 I llama_kv_cache:        CPU KV buffer size =     6.12 MiB
0.00.083.734 I llama_kv_cache: size =    6.12 MiB (  8192 cells,   2 layers,  2/1 seqs), \
K (q8_0):    2.12 MiB, V (f16):    4.00 MiB
"""

# -c 1024 -np 2 -ctv q8_0 -fa off: refused before any KV cache exists
QUANTIZED_V_WITHOUT_FA = """\
warning: no usable GPU found, --gpu-layers option will be ignored
warning: one possible reason is that llama.cpp was compiled without GPU support
warning: consult docs/build.md for compilation instructions
0.00.004.016 I srv  llama_server: initializing ...
0.00.006.542 W srv  llama_server: security: no API key is set and CORS allows all origins \
(see https://github.com/ggml-org/llama.cpp/pull/25655)
0.00.008.089 I srv    load_model: loading model 'tiny.gguf'
0.00.012.911 E llama_init_from_model: quantized V cache requires flash_attn to be enabled
0.00.012.943 E cmn  common_init_: failed to create context with model 'tiny.gguf'
0.00.012.957 E cmn  common_init_: failed to create context with model 'tiny.gguf'
0.00.012.971 E srv    load_model: failed to create_context with model 'tiny.gguf'
0.00.012.985 I srv    operator(): operator(): cleaning up before exit...
0.00.013.257 E srv  llama_server: exiting due to model loading error
"""

# -ctk q9: rejected while parsing arguments, before logging has a prefix
BAD_CACHE_TYPE = """\
error while handling argument "-ctk": Unsupported cache type: q9

usage:
-h,    --help, --usage                  print usage and exit
"""

# a missing model file
MISSING_MODEL = """\
0.00.487.271 E gguf_init_from_file: failed to open GGUF file 'nonexist.gguf' \
(No such file or directory)
0.00.487.276 E llama_model_load: error loading model: llama_model_loader: \
failed to load model from nonexist.gguf
0.00.487.278 E srv    load_model: failed to load model, 'nonexist.gguf'
"""


def test_kv_cache_of_two_streams() -> None:
    report = STARTUP_LOG.report(F16_TWO_STREAMS)
    # 2 layers x 2 KV heads x 64 x 2 bytes (f16) x K and V = 1024 bytes per cell
    assert report.kv_cache_tokens == 1024 and report.kv_cache_bytes == 1024 * 1024
    assert report.device == "cpu" and report.errors == []


def test_kv_cache_of_one_unified_stream_with_quantized_k() -> None:
    report = STARTUP_LOG.report(Q8_K_UNIFIED)
    assert report.kv_cache_tokens == 8192
    # the log rounds to 0.01 MiB: exact 2 x 8192 x 128 x (34/32 + 2) = 6.125 MiB
    assert report.kv_cache_bytes == round(6.12 * MIB)


def test_quantized_v_without_flash_attention_explains_itself() -> None:
    report = STARTUP_LOG.report(QUANTIZED_V_WITHOUT_FA)
    assert report.errors[0] == (
        "llama_init_from_model: quantized V cache requires flash_attn to be enabled"
    )
    assert len(report.errors) == 4  # the repeated line once; warnings are not errors
    assert report.kv_cache_tokens is None and report.kv_cache_bytes is None
    assert report.device is None


def test_argument_errors_without_prefix() -> None:
    report = STARTUP_LOG.report(BAD_CACHE_TYPE)
    assert report.errors == ['error while handling argument "-ctk": Unsupported cache type: q9']


def test_missing_model_file() -> None:
    errors = STARTUP_LOG.report(MISSING_MODEL).errors
    assert errors[0].startswith("gguf_init_from_file: failed to open GGUF file 'nonexist.gguf'")


def test_cuda_buffers_mean_cuda() -> None:
    """Lines formatted with llama.cpp's own format strings (src/llama-model.cpp,
    src/llama-kv-cache.cpp) for a CUDA build; no GPU run was possible here."""
    model_buffer = "load_tensors: %12s model buffer size = %8.2f MiB"
    kv_buffer = "llama_kv_cache: %10s KV buffer size = %8.2f MiB"
    lines = [
        model_buffer % ("CPU_Mapped", 4.0),
        model_buffer % ("CUDA0", 4000.0),
        kv_buffer % ("CUDA0", 448.0),
    ]
    assert STARTUP_LOG.report("\n".join(lines)).device == "cuda"
    assert STARTUP_LOG.report(lines[0]).device == "cpu"


def test_error_bodies_pass_through() -> None:
    """llama-server already answers in the OpenAI shape (body copied from a real 503)."""
    body = b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'
    assert DIALECT.error_to_openai(503, body) == body


def test_plain_text_exception_is_wrapped() -> None:
    """server-http.cpp answers an uncaught exception with its text as text/plain."""
    out = orjson.loads(DIALECT.error_to_openai(500, b"std::bad_alloc"))
    assert out["error"]["message"] == "std::bad_alloc"
    assert out["error"]["type"] == "upstream_error"
