"""vLLM's start-up log lines as its 0.32 code writes them, parsed into a StartupReport."""

from __future__ import annotations

from kiban.engines import ENGINE_KINDS

vllm = ENGINE_KINDS["vllm"]

CPU_LOG = """\
(Worker pid=7549) INFO 11-25 01:24:58 [cpu_worker.py:260] Explicitly set (1.0/10.59) GiB for KV \
cache on node 0.
(EngineCore pid=7317) INFO 11-25 01:24:58 [kv_cache_utils.py:2327] CPU KV cache size: 682,625 \
tokens, Maximum concurrency for 1,000 tokens per request: 682.62x
(APIServer pid=5967) WARNING 11-25 01:24:05 [system_utils.py:255] Found ulimit of 20000 and \
failed to automatically increase with error current limit exceeds maximum limit. This can cause \
fd limit errors like `OSError: [Errno 24] Too many open files`.
"""

GPU_FAILURE = """\
(EngineCore pid=1) INFO [gpu_worker.py:1] Available KV cache memory: 11.47 GiB
(EngineCore pid=1) INFO [kv_cache_utils.py:2327] GPU KV cache size: 83,488 tokens, Maximum \
concurrency for 40,960 tokens per request: 2.04x
(EngineCore pid=1) ERROR [core.py:1] EngineCore failed to start.
ValueError: Free memory on device cuda:0 (1.0/22.05 GiB) on startup is less than desired GPU \
memory utilization (0.92, 20.29 GiB).
"""


def test_cpu_log() -> None:
    report = vllm.startup_log.report(CPU_LOG)
    assert report.kv_cache_tokens == 682_625
    assert report.kv_cache_bytes == 1024**3
    assert report.device == "cpu"
    assert report.errors == []  # a WARNING that mentions OSError is no start-up error


def test_gpu_log_with_errors() -> None:
    report = vllm.startup_log.report(GPU_FAILURE)
    assert (report.kv_cache_tokens, report.device) == (83_488, "cuda")
    assert report.kv_cache_bytes == int(11.47 * 1024**3)
    assert len(report.errors) == 2 and report.errors[1].startswith("ValueError: Free memory")


def test_nothing_to_report() -> None:
    report = vllm.startup_log.report("INFO starting\n")
    assert report.kv_cache_tokens is None and report.errors == []
