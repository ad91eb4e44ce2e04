"""The planner's KV cache size against what a real llama-server (CPU build) allocates.

Each case plans one CPU llama.cpp engine on the tiny GGUF (2 layers, 2 KV heads,
head_dim 64) from a kiban.yaml-shaped config, starts llama-server with the plan's
flags (as `kiban up` does) and compares the plan's KV bytes and cells with
llama.cpp's own "llama_kv_cache: size = ... MiB (N cells, ...)" line, for the
f16, q8_0 and q4_0 cache types (q8_0 and q4_0 need flash attention for V, which
the plan turns on).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.planning.plan import plan_config

pytestmark = pytest.mark.engine


def _plan(gguf: Path, kv_type: str, context: int, concurrency: int):
    raw = {
        "engines": [
            {
                "name": "tiny",
                "kind": "llamacpp",
                "models": ["tiny"],
                "launch": {
                    "model": str(gguf),
                    "device": "cpu",
                    "port": 9,
                    "context": context,
                    "concurrency": concurrency,
                    "kv_cache_dtype": kv_type,
                },
            }
        ],
        "routes": [{"model": "tiny", "engines": ["tiny"]}],
    }
    plan = plan_config(parse_config(raw, env={}), gpus=[])
    assert plan.ok, plan.problems
    return plan.engines[0]


@pytest.mark.parametrize(
    ("kv_type", "context", "concurrency"),
    [("f16", 1000, 3), ("q8_0", 4096, 2), ("q4_0", 700, 4)],
)
def test_kv_buffer_matches_llamacpp(
    kv_type: str, context: int, concurrency: int, tiny_gguf: Path, llamacpp_engine_factory
) -> None:
    plan = _plan(tiny_gguf, kv_type, context, concurrency)
    flags = dict(zip(plan.flags[::2], plan.flags[1::2], strict=True))
    engine = llamacpp_engine_factory(
        tiny_gguf,
        "tiny",
        ctx=int(flags["-c"]),
        parallel=int(flags["-np"]),
        extra_args=tuple(plan.flags),
    )
    try:
        log = engine.log_tail(10**7)
    finally:
        engine.stop()
    report = ENGINE_KINDS["llamacpp"].startup_log.report(log)
    cells = int(flags["-c"])
    print(
        f"{kv_type}: planned {plan.kv_cache_bytes:,} B for {cells} cells; "
        f"llama.cpp reported {report.kv_cache_bytes:,} B, {report.kv_cache_tokens} cells"
    )
    assert report.kv_cache_tokens == cells
    assert report.kv_cache_bytes == pytest.approx(plan.kv_cache_bytes, rel=0.02)
