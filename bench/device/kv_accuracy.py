"""Device benchmark: kiban's llama.cpp plan vs real GPU memory, and tokens/s per KV type.

Runs on a CUDA machine with no network (the lead's H100). Steps:

1. write a random-weights GGUF with Qwen2.5-7B's shapes (from kiban's catalogue:
   28 layers, hidden 3584, 28/4 heads, FFN 18944, vocab 152064) using the `gguf`
   package; q8_0 matrices are written as random blocks (fast, no quantizing);
2. for each KV cache type (f16, q8_0, q4_0): plan one llama.cpp engine with
   kiban's planner exactly as `kiban up` does (NVML GPU, context per slot x
   slots), start the CUDA llama-server with the plan's flags, read NVML's
   per-process GPU memory and llama-server's own buffer sizes, and compare them
   with the plan (target: within 5%);
3. generation tokens/s at concurrency 1, 4 and 16 (fixed prompt, ignore_eos);
4. write kv_accuracy.json and kv_accuracy.md to --out.

    python bench/device/kv_accuracy.py --llama-server PATH --out "$OUT"

Needs on PYTHONPATH: kiban's src/, and gguf, pydantic, orjson (see kv_accuracy.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from kiban.config import parse_config  # noqa: E402
from kiban.engines import ENGINE_KINDS  # noqa: E402
from kiban.models.tiny import IM_END, PAD_TOKEN, SPECIAL_TOKENS, train_tokenizer  # noqa: E402
from kiban.planning.hf_config import shape_fields  # noqa: E402
from kiban.planning.plan import plan_config  # noqa: E402
from kiban.sizing import catalogue  # noqa: E402

MODEL = "Qwen/Qwen2.5-7B-Instruct"
MiB = 1024**2
PROMPT = "Write a long story about a lighthouse keeper who collects old maps. " * 4


# ---------------------------------------------------------------- GGUF writing


def _q8_0_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random q8_0 data: per 32 values an f16 scale (small, finite) and 32 int8."""
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 34), dtype=np.uint8)
    scale = np.full((rows, cols // 32), 2e-4, dtype=np.float16).view(np.uint8)
    blocks[:, :, 0:2] = scale.reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, cols // 32 * 34)


def _matrix(rng, rows: int, cols: int, weights: str):
    import gguf

    if weights == "q8_0":
        return _q8_0_blocks(rng, rows, cols), gguf.GGMLQuantizationType.Q8_0
    values = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)
    return values, None


def write_gguf(path: Path, weights: str, model: str = MODEL, seed: int = 0) -> dict:
    """A random GGUF with the shapes of catalogue Qwen2 model *model*; returns them."""
    import gguf

    shape = shape_fields(catalogue.find_model(model).config)
    h, ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    heads, kv_heads, vocab = shape["num_heads"], shape["num_kv_heads"], shape["vocab_size"]
    kv = kv_heads * shape["head_dim"]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(f"kiban-random-{model.rsplit('/', 1)[-1]}")
    writer.add_context_length(shape["max_context"])
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(7 if weights == "q8_0" else 1)  # MOSTLY_Q8_0 / MOSTLY_F16
    tok = train_tokenizer(2048)
    known = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(known)
    for text, idx in known.items():
        tokens[idx] = text
    types = [
        int(gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL)
        for t in tokens
    ]
    pad = vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.token_to_id(PAD_TOKEN))
    writer.add_eos_token_id(tok.token_to_id(IM_END))
    writer.add_add_bos_token(False)

    def add(name: str, rows: int, cols: int) -> None:
        data, raw = _matrix(rng, rows, cols, weights)
        writer.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", vocab, h)
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(h, np.float32))
        add(p + "attn_q.weight", h, h)
        add(p + "attn_k.weight", kv, h)
        add(p + "attn_v.weight", kv, h)
        for bias, size in (("attn_q.bias", h), ("attn_k.bias", kv), ("attn_v.bias", kv)):
            writer.add_tensor(p + bias, np.zeros(size, np.float32))
        add(p + "attn_output.weight", h, h)
        writer.add_tensor(p + "ffn_norm.weight", np.ones(h, np.float32))
        add(p + "ffn_gate.weight", ff, h)
        add(p + "ffn_up.weight", ff, h)
        add(p + "ffn_down.weight", h, ff)
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    if not catalogue.find_model(model).config.get("tie_word_embeddings"):
        add("output.weight", vocab, h)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        k: shape[k]
        for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size")
    }


# ---------------------------------------------------------------- planning


def plan_for(model: Path, kv_type: str, context: int, concurrency: int):
    raw = {
        "engines": [
            {
                "name": "llama",
                "kind": "llamacpp",
                "models": ["m"],
                "launch": {
                    "model": str(model),
                    "port": 9,
                    "gpus": [0],
                    "context": context,
                    "concurrency": concurrency,
                    "kv_cache_dtype": kv_type,
                },
            }
        ],
        "routes": [{"model": "m", "engines": ["llama"]}],
    }
    plan = plan_config(parse_config(raw, env={}))  # GPUs from NVML
    if not plan.ok:
        raise SystemExit(f"plan refused: {plan.problems}")
    return plan.engines[0]


# ---------------------------------------------------------------- measuring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvml_used(pid: int) -> tuple[int | None, int]:
    """(memory NVML lists for *pid*, memory used on GPU 0)."""
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return proc.usedGpuMemory, used
    return None, used


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("llama-server not healthy in time")


_BUFFERS = {
    "cuda_model_mib": re.compile(r"CUDA0 model buffer size =\s*([\d.]+) MiB"),
    "cuda_kv_mib": re.compile(r"CUDA0 KV buffer size =\s*([\d.]+) MiB"),
    "cuda_compute_mib": re.compile(r"CUDA0 compute buffer size =\s*([\d.]+) MiB"),
}


def log_buffers(text: str) -> dict[str, float]:
    out = {}
    for key, pattern in _BUFFERS.items():
        values = [float(v) for v in pattern.findall(text)]
        if values:
            out[key] = sum(values)
    return out


def generate(port: int, concurrency: int, tokens: int) -> dict:
    """*concurrency* parallel completions of *tokens* tokens each; aggregate tokens/s."""
    results: list[dict] = []
    errors: list[str] = []

    def one() -> None:
        body = json.dumps(
            {"prompt": PROMPT, "n_predict": tokens, "ignore_eos": True, "cache_prompt": False,
             "temperature": 0.0}
        ).encode()  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                results.append(json.loads(r.read()))
        except OSError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    generated = sum(r.get("timings", {}).get("predicted_n", 0) for r in results)
    per_request = [r["timings"]["predicted_per_second"] for r in results if "timings" in r]
    return {
        "concurrency": concurrency,
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 1) if wall else 0.0,
        "per_request_tokens_per_s": round(sum(per_request) / len(per_request), 1)
        if per_request
        else None,
        "errors": errors,
    }


def run_one(args, model: Path, kv_type: str, out: Path) -> dict:
    plan = plan_for(model, kv_type, args.slot_context, max(args.concurrency))
    port = free_port()
    llamacpp = ENGINE_KINDS["llamacpp"]
    # what `kiban up` runs: base command, the plan's flags, the log verbosity the
    # start-up report needs
    argv = [args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            *plan.flags, *llamacpp.startup_log.args]  # fmt: skip
    log_path = out / f"llama-server-{kv_type}.log"
    _, used_before = nvml_used(-1)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc)
        time.sleep(2)
        proc_bytes, used_after = nvml_used(proc.pid)
        measured = proc_bytes if proc_bytes is not None else used_after - used_before
        runs = [generate(port, c, args.gen_tokens) for c in args.concurrency]
        peak_proc, peak_used = nvml_used(proc.pid)
        peak = peak_proc if peak_proc is not None else peak_used - used_before
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text(errors="replace")
    buffers = log_buffers(log_text)
    report = llamacpp.startup_log.report(log_text)
    predicted = plan.required_bytes
    return {
        "kv_type": kv_type,
        "flags": plan.flags,
        "predicted": {
            "weights_on_gpu_bytes": plan.weights_bytes,
            "kv_cache_bytes": plan.kv_cache_bytes,
            "overhead_bytes": plan.overhead_bytes,
            "total_bytes": predicted,
        },
        "measured": {
            "nvml_bytes_after_start": measured,
            "nvml_bytes_after_load": peak,
            "nvml_source": "process" if proc_bytes is not None else "device used delta",
            "llama_log": buffers,
            "startup_report": {
                "kv_cache_bytes": report.kv_cache_bytes,
                "kv_cache_tokens": report.kv_cache_tokens,
                "device": report.device,
                "errors": report.errors,
            },
        },
        "error_total_pct": round((measured - predicted) / predicted * 100, 2),
        "error_kv_pct": round(
            ((report.kv_cache_bytes or 0) - plan.kv_cache_bytes) / plan.kv_cache_bytes * 100, 3
        ),
        "throughput": runs,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# llama.cpp KV plan vs measurement ({report['gpu']}, {report['model']})",
        "",
        f"Weights {report['weights']}, {report['slot_context']} tokens per slot x "
        f"{report['slots']} slots. Command: `{report['command']}`",
        "",
        "| KV | predicted total MiB | NVML MiB | error | KV predicted MiB | KV log MiB "
        "| KV error | model buf MiB | compute buf MiB | "
        + " | ".join(f"tok/s c={c}" for c in report["concurrency"])
        + " |",
        "|---" * (9 + len(report["concurrency"])) + "|",
    ]
    for r in report["results"]:
        p, m = r["predicted"], r["measured"]
        log = m["llama_log"]
        speeds = " | ".join(str(t["tokens_per_s"]) for t in r["throughput"])
        lines.append(
            f"| {r['kv_type']} | {p['total_bytes'] / MiB:.0f} | "
            f"{m['nvml_bytes_after_start'] / MiB:.0f} | {r['error_total_pct']:+.2f}% | "
            f"{p['kv_cache_bytes'] / MiB:.1f} | "
            f"{(m['startup_report']['kv_cache_bytes'] or 0) / MiB:.1f} | "
            f"{r['error_kv_pct']:+.3f}% | "
            f"{log.get('cuda_model_mib', float('nan')):.0f} | "
            f"{log.get('cuda_compute_mib', float('nan')):.0f} | {speeds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", help="path of the CUDA llama-server (to measure)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), type=Path)
    parser.add_argument("--work", default="/tmp/kiban-kv-bench", type=Path)
    parser.add_argument("--weights", choices=("q8_0", "f16"), default="q8_0")
    parser.add_argument("--model", default=MODEL, help="catalogue Qwen2 model whose shapes to use")
    parser.add_argument("--kv", default="f16,q8_0,q4_0")
    parser.add_argument("--slot-context", type=int, default=8192)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument(
        "--gguf-only", type=Path, metavar="PATH", help="only write the random GGUF to PATH"
    )
    args = parser.parse_args()
    if args.gguf_only is not None:
        started = time.perf_counter()
        shapes = write_gguf(args.gguf_only, args.weights, args.model)
        took = time.perf_counter() - started
        size = args.gguf_only.stat().st_size / 1e9
        print(f"GGUF {args.gguf_only} ({size:.2f} GB, {shapes}) in {took:.0f}s", flush=True)
        return
    if args.llama_server is None:
        parser.error("--llama-server is required (unless --gguf-only)")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import pynvml

    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    model = args.work / f"{args.model.rsplit('/', 1)[-1]}-random-{args.weights}.gguf"
    started = time.perf_counter()
    if not model.exists():
        write_gguf(model, args.weights, args.model)
    took = time.perf_counter() - started
    print(f"GGUF {model} ({model.stat().st_size / 1e9:.2f} GB) in {took:.0f}s", flush=True)
    results = []
    for kv_type in args.kv.split(","):
        result = run_one(args, model, kv_type, args.out)
        print(json.dumps(result), flush=True)
        results.append(result)
    report = {
        "gpu": gpu if isinstance(gpu, str) else gpu.decode(),
        "model": f"random weights, {args.model} shapes",
        "weights": args.weights,
        "slot_context": args.slot_context,
        "slots": max(args.concurrency),
        "concurrency": args.concurrency,
        "command": " ".join(sys.argv),
        "results": results,
    }
    (args.out / "kv_accuracy.json").write_text(json.dumps(report, indent=2))
    (args.out / "kv_accuracy.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
