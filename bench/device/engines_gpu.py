"""vLLM 0.26 and lmdeploy 0.18 (PyTorch engine) under `kiban up` on one GPU, against the plan.

Runs on the device from the repository root (see engines_gpu.sh, which installs the
carried wheels and writes the model first). One run = one engine configuration:

    python3 bench/device/engines_gpu.py vllm --kv auto --context 8192 --concurrency 16 --bench
    python3 bench/device/engines_gpu.py lmdeploy --kv 8 --context 8192 --concurrency 16 \
        --bench --structured

Each run plans the engine with `kiban plan --json` (NVML GPU), starts it with
`kiban up -d` behind the gateway, and records: the KV capacity the engine reports
(vLLM "GPU KV cache size: N tokens"; lmdeploy "Building CacheEngine with config:
CacheConfig(... num_gpu_blocks=N ...)") against the plan's tokens; the whole process
group's NVML memory against the plan (target: within 5%); `kiban status` and the
gateway's kiban_engine_gpu_verified; optionally tokens/s and TTFT through the gateway at
1 and 16 concurrent streams, and structured output (json_schema and regex in the
engine's dialect) with invalid answers returned as success counted. Appends a Markdown
section to $OUT/engines-<engine>.md and the JSON to $WORK/<run>.json; exits 1 when a
check does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from kiban import gpus as nvml  # noqa: E402
from kiban.processes import group_members  # noqa: E402
from kiban.run_state import RunDir  # noqa: E402

MiB = 1024**2
TOLERANCE = 0.05
GATEWAY, ENGINE_PORT = 8290, 8291
VERSIONS = {"vllm": "0.26.0", "lmdeploy": "0.18.0"}
_VLLM_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
_LMDEPLOY_CACHE = re.compile(r"CacheConfig\((.*?)\)", re.S)
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["city", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"}},
        "required": ["ok", "score"],
        "additionalProperties": False,
    },
]
REGEX = r"[A-Z]{3}-[0-9]{4}"


def kiban(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiban.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write_config(args, path: Path) -> None:
    launch = {
        "model": str(args.model),
        "gpus": [args.gpu],
        "port": ENGINE_PORT,
        "context": args.context,
        "concurrency": args.concurrency,
        "kv_cache_dtype": args.kv,
        "ready_timeout_s": 420,
        "restart": {"max_restarts": 0},
        "args": list(args.engine_args),
    }
    if args.engine == "lmdeploy":
        # the PyTorch engine (TurboMind is not carried); INFO logs its CacheConfig
        launch["args"] = ["--backend", "pytorch", "--log-level", "INFO", *launch["args"]]
    else:
        # FlashInfer is not carried (vLLM 0.26 requires flashinfer-python 0.6.14 and its
        # CUDA deps); its sampler is the one part a dense model reaches (sampler.py ->
        # topk_topp_sampler.flashinfer_sampler_supported imports it unless this is 0)
        launch["env"] = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    config = {
        "gateway": {"port": GATEWAY, "health_interval_s": 1, "request_log": False},
        "engines": [
            {
                "name": args.engine,
                "kind": args.engine,
                "version": VERSIONS[args.engine],
                "models": ["qwen"],
                "launch": launch,
            }
        ],
        "routes": [{"model": "qwen", "engines": [args.engine]}],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


def held_on(index: int, pids: set[int]) -> int | None:
    found = [p.used_bytes or 0 for p in nvml.processes(index) or [] if p.pid in pids]
    return sum(found) if found else None


def engine_report(engine: str, log: str) -> dict:
    """What the engine's own log says about its KV cache."""
    if engine == "vllm":
        tokens = _VLLM_TOKENS.findall(log)
        return {"kv_tokens": int(tokens[-1].replace(",", "")) if tokens else None}
    match = _LMDEPLOY_CACHE.findall(log)
    if not match:
        return {"kv_tokens": None}
    fields = dict(re.findall(r"(\w+)=([^,()]+)", match[-1]))
    blocks, size = int(fields.get("num_gpu_blocks", 0)), int(fields.get("block_size", 0))
    return {
        "kv_tokens": blocks * size,
        "num_gpu_blocks": blocks,
        "block_size": size,
        "cache_max_entry_count": fields.get("cache_max_entry_count"),
        "max_prefill_token_num": fields.get("max_prefill_token_num"),
        "quant_policy": fields.get("quant_policy"),
    }


def bench(model_args: list[str], out: Path) -> dict:
    done = kiban(
        "bench", f"http://127.0.0.1:{GATEWAY}", "-m", "qwen", "--stream", "--max-tokens", "128",
        "-q", "--json", "-o", str(out), *model_args, timeout=300,
    )  # fmt: skip
    if not out.exists():
        return {"error": done.stderr[-500:]}
    r = json.loads(out.read_text())["result"]
    return {
        "requests": r["requests"],
        "ok": r["ok"],
        "errors": r["errors"],
        "tokens_per_s": round(r["output_tokens_per_s"], 1),
        "ttft_p50_ms": round(r["ttft_ms"]["p50"], 1) if r.get("ttft_ms") else None,
        "requests_per_s": round(r["requests_per_s"], 2),
    }


def post(body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{GATEWAY}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def structured(rounds: int) -> dict:
    """json_schema and regex through kiban; 200 answers that do not match are the failures."""
    import jsonschema_rs

    counts = {"sent": 0, "ok_valid": 0, "ok_invalid": 0, "refused": 0, "statuses": {}}
    samples = []
    for i in range(rounds):
        for n, schema in enumerate(SCHEMAS):
            body = {
                "model": "qwen",
                "messages": [{"role": "user", "content": f"Give me record {i}."}],
                "max_tokens": 96,
                "temperature": 1.0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": f"s{n}", "schema": schema, "strict": True},
                },
            }
            status, answer = post(body)
            counts["sent"] += 1
            counts["statuses"][str(status)] = counts["statuses"].get(str(status), 0) + 1
            if status != 200:
                counts["refused"] += 1
                if len(samples) < 3:
                    samples.append(answer.get("error", answer))
                continue
            text = answer["choices"][0]["message"]["content"]
            try:
                valid = jsonschema_rs.validator_for(schema).is_valid(json.loads(text))
            except ValueError:
                valid = False
            counts["ok_valid" if valid else "ok_invalid"] += 1
        body = {
            "model": "qwen",
            "messages": [{"role": "user", "content": "A code."}],
            "max_tokens": 16,
            "regex": REGEX,  # kiban's form; sent to lmdeploy as response_format regex_schema
        }
        status, answer = post(body)
        counts["sent"] += 1
        counts["statuses"][str(status)] = counts["statuses"].get(str(status), 0) + 1
        if status == 200:
            text = answer["choices"][0]["message"]["content"]
            ok = re.fullmatch(REGEX, text) is not None
            counts["ok_valid" if ok else "ok_invalid"] += 1
        else:
            counts["refused"] += 1
            if len(samples) < 3:
                samples.append(answer.get("error", answer))
    counts["refusal_samples"] = samples
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=("vllm", "lmdeploy"))
    parser.add_argument("--model", type=Path, default=Path("/tmp/kiban-engines/qwen2.5-7b-random"))
    parser.add_argument("--kv", default="auto")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--bench", action="store_true", help="tokens/s and TTFT at 1 and 16")
    parser.add_argument("--structured", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    work = Path(os.environ.get("WORK", "/tmp/kiban-engines"))
    out = Path(os.environ.get("OUT", "/tmp/kiban-out"))
    run = f"{args.engine}-kv{args.kv}-{args.context}x{args.concurrency}"
    config = work / f"{run}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_config(args, config)
    result: dict = {"run": run, "ok": True, "problems": []}

    def problem(text: str) -> None:
        result["ok"] = False
        result["problems"].append(text)

    planned = kiban("plan", "-c", str(config), "--json")
    plan = json.loads(planned.stdout) if planned.stdout.startswith("{") else {"engines": []}
    ep = next(iter(plan.get("engines", [])), None)
    if ep is None or not plan.get("ok"):
        problem(f"plan refused: {plan.get('problems') or planned.stderr[-800:]}")
    started = time.monotonic()
    up = kiban("up", "-c", str(config), "-d", timeout=500)
    result["up_seconds"] = round(time.monotonic() - started, 1)
    result["up_output"] = (up.stdout + up.stderr)[-3000:]
    state = RunDir(config.resolve()).read()
    record = state.engines.get(args.engine) if state else None
    if up.returncode != 0 or record is None:
        problem("kiban up failed")
    else:
        log = Path(record.log).read_text(errors="replace")
        pids = group_members(record.pid) | {record.pid}
        used = held_on(args.gpu, pids)
        result["engine_log_kv"] = engine_report(args.engine, log)
        result["nvml_bytes"] = used
        status = kiban("status", "-c", str(config), "--json")
        result["status"] = json.loads(status.stdout) if status.returncode == 0 else status.stderr
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{GATEWAY}/metrics").read().decode()
        result["gpu_verified_metric"] = [
            line for line in metrics.splitlines() if line.startswith("kiban_engine_gpu_verified")
        ]
        if record.gpu_verified is not True:
            problem(f"gpu_verified {record.gpu_verified}: {record.message}")
        if ep is not None:
            reported = result["engine_log_kv"]["kv_tokens"]
            result["kv_tokens_error"] = (
                None if not reported else round((reported - ep["kv_tokens"]) / ep["kv_tokens"], 4)
            )
            if used is None:
                problem("NVML lists no memory for the engine's processes")
            else:
                need = ep["required_bytes"]
                result["nvml_error"] = round((used - need) / need, 4)
                if abs(result["nvml_error"]) > TOLERANCE:
                    problem(f"NVML {used / MiB:.0f} MiB vs plan {ep['required_bytes'] / MiB:.0f}")
        if args.bench:
            one = ["-c", "1", "-n", "6", "--warmup", "1"]
            result["bench_c1"] = bench(one, work / f"{run}-c1.json")
            sixteen = ["-c", "16", "-d", "20", "--warmup", "16"]
            result["bench_c16"] = bench(sixteen, work / f"{run}-c16.json")
        if args.structured:
            result["structured"] = structured(args.structured)
            if result["structured"]["ok_invalid"]:
                problem(f"{result['structured']['ok_invalid']} invalid answers returned as 200")
        (work / f"{run}.log").write_text(log)
    down = kiban("down", "-c", str(config), timeout=120)
    result["down"] = (down.stdout + down.stderr)[-300:]
    result["plan"] = ep and {
        k: ep[k]
        for k in ("flags", "kv_tokens", "kv_cache_bytes", "weights_bytes", "overhead_bytes",
                  "required_bytes", "share_bytes", "free_at_start_bytes", "context", "concurrency")
    }  # fmt: skip
    (work / f"{run}.json").write_text(json.dumps(result, indent=2, default=str))
    with (out / f"engines-{args.engine}.md").open("a") as md:
        md.write(markdown(result))
    print(markdown(result))
    return 0 if result["ok"] else 1


def markdown(r: dict) -> str:
    p = r.get("plan") or {}
    kv = r.get("engine_log_kv") or {}
    lines = [f"### {r['run']}: {'ok' if r['ok'] else 'PROBLEMS: ' + '; '.join(r['problems'])}", ""]
    if p:
        lines.append(f"Plan flags: `{' '.join(p['flags'])}`; up in {r.get('up_seconds')} s.")
        lines.append("")
        lines.append("| | plan | engine / NVML | error |")
        lines.append("|---|---|---|---|")
        error = r.get("kv_tokens_error")
        lines.append(f"| KV tokens | {p['kv_tokens']:,} | {kv.get('kv_tokens')} | {error} |")
        used = r.get("nvml_bytes")
        lines.append(
            f"| whole process MiB | {p['required_bytes'] / MiB:.0f} | "
            f"{used / MiB if used else float('nan'):.0f} | {r.get('nvml_error')} |"
        )
        lines.append(
            f"| weights / KV / overhead MiB | {p['weights_bytes'] / MiB:.0f} / "
            f"{p['kv_cache_bytes'] / MiB:.0f} / {p['overhead_bytes'] / MiB:.0f} | | |"
        )
        if kv.get("num_gpu_blocks") is not None:
            lines.append(f"| lmdeploy CacheConfig | | {json.dumps(kv)} | |")
    lines.append("")
    lines.append(f"kiban_engine_gpu_verified: {r.get('gpu_verified_metric')}")
    for key in ("bench_c1", "bench_c16"):
        if key in r:
            lines.append(f"- {key}: {json.dumps(r[key])}")
    if "structured" in r:
        lines.append(f"- structured output: {json.dumps(r['structured'])}")
    if not r["ok"]:
        lines += ["", "```", r.get("up_output", "")[-1500:], "```"]
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    sys.exit(main())
