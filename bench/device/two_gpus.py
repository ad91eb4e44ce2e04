"""Checks of bench/device/two_gpus.sh on a machine with two GPUs; each prints Markdown.

    python3 bench/device/two_gpus.py memory --config C --plan PLAN.json   # plan vs NVML per GPU
    python3 bench/device/two_gpus.py gpus --config C --metrics M.txt     # exporter, verified
    python3 bench/device/two_gpus.py served --before A.txt --after B.txt # requests per engine
    python3 bench/device/two_gpus.py kill --bench B.json                 # failures by kind
    python3 bench/device/two_gpus.py restarted --config C --engine E --old-pid N

Each exits 1 when what it checks does not hold (and says which line failed), so the
shell script can count failed steps. Engines and their PIDs come from kiban's run
state (what `kiban status` reads); GPU figures from NVML directly, in the same moment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from kiban import gpus as nvml  # noqa: E402
from kiban.processes import group_members  # noqa: E402
from kiban.run_state import RunDir, RunState  # noqa: E402

MiB = 1024**2
TOLERANCE = 0.05
_BUFFER = re.compile(r"(CUDA\d+|CUDA_Host|CPU\w*) (model|KV|compute) buffer size = +([\d.]+) MiB")
_METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def state_of(config: Path) -> RunState:
    state = RunDir(config.resolve()).read()
    if state is None:
        raise SystemExit(f"kiban is not up for {config}")
    return state


def held_on(index: int, pids: set[int]) -> int | None:
    """Bytes NVML lists for *pids* on GPU *index* (None: none of them is there)."""
    found = [p.used_bytes or 0 for p in nvml.processes(index) or [] if p.pid in pids]
    return sum(found) if found else None


def log_buffers(text: str) -> dict[str, dict[str, float]]:
    """llama.cpp's buffer sizes per device: {"CUDA0": {"model": MiB, "KV": ..., ...}}."""
    out: dict[str, dict[str, float]] = {}
    for device, kind, mib in _BUFFER.findall(text):
        out.setdefault(device, {}).setdefault(kind, 0.0)
        out[device][kind] += float(mib)
    return out


def metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text -> (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _METRIC.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def cmd_memory(args) -> int:
    """Each GPU's memory held by the engine's processes against the plan's per-GPU bytes."""
    plan = json.loads(args.plan.read_text())
    engine_plan = next(e for e in plan["engines"] if e["engine"] == args.engine)
    record = state_of(args.config).engines[args.engine]
    pids = group_members(record.pid) | {record.pid}
    planned = engine_plan["required_bytes"]
    buffers = log_buffers(Path(record.log).read_text(errors="replace"))
    lines = [
        f"### {args.engine}: plan vs NVML per GPU",
        "",
        f"Flags from the plan: `{' '.join(engine_plan['flags'])}`; weights "
        f"{engine_plan['weights_bytes'] / MiB:.0f} MiB, "
        f"KV {engine_plan['kv_cache_bytes'] / MiB:.0f} MiB, "
        f"overhead {engine_plan['overhead_bytes'] / MiB:.0f} MiB per GPU "
        f"({engine_plan['context']} tokens x {engine_plan['concurrency']} slots).",
        "",
        "| GPU | planned MiB | NVML MiB (engine's processes) | error | llama.cpp model / KV / "
        "compute MiB |",
        "|---|---|---|---|---|",
    ]
    ok = True
    for position, index in enumerate(engine_plan["gpus"]):
        used = held_on(index, pids)
        own = buffers.get(f"CUDA{position}", {})
        logged = " / ".join(f"{own.get(k, 0):.0f}" for k in ("model", "KV", "compute"))
        if used is None:
            ok = False
            lines.append(f"| {index} | {planned / MiB:.0f} | **none** | - | {logged} |")
            continue
        error = (used - planned) / planned
        ok &= abs(error) <= TOLERANCE
        mark = "" if abs(error) <= TOLERANCE else " **over 5%**"
        lines.append(
            f"| {index} | {planned / MiB:.0f} | {used / MiB:.0f} | {error:+.2%}{mark} | {logged} |"
        )
    host = buffers.get("CUDA_Host", {}) | buffers.get("CPU_Mapped", {})
    lines += ["", f"Host-side buffers (llama.cpp log): {json.dumps(host)}", ""]
    print("\n".join(lines))
    return 0 if ok else 1


def cmd_gpus(args) -> int:
    """Per engine: GPUs NVML and the gateway's exporter show its processes on; verified flag."""
    state = state_of(args.config)
    samples = metrics(args.metrics.read_text())
    exported: dict[int, list[tuple[str, float]]] = {}
    verified: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "kiban_gpu_process_memory_used_bytes":
            exported.setdefault(int(labels["pid"]), []).append((labels["gpu"], value))
        elif name == "kiban_engine_gpu_verified":
            verified[labels.get("engine", "?")] = value
    gpu_count = len(nvml.inventory())
    lines = [
        "| engine | GPUs (config) | PID | NVML: GPUs holding its memory (MiB) | exporter: "
        "kiban_gpu_process_memory_used_bytes (GPU: MiB) | kiban_engine_gpu_verified | "
        "kiban status | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for name, record in state.engines.items():
        pids = group_members(record.pid) | {record.pid} if record.pid else set()
        nvml_seen = {i: held_on(i, pids) for i in range(gpu_count)}
        nvml_seen = {i: b for i, b in nvml_seen.items() if b is not None}
        exp = [(gpu, value) for pid in pids for gpu, value in exported.get(pid, [])]
        exp_gpus = {int(g) for g, _ in exp}
        right = set(nvml_seen) == set(record.gpus) == exp_gpus
        flag = verified.get(name)
        right &= flag == 1.0 and record.gpu_verified is True
        ok &= right
        lines.append(
            f"| {name} | {record.gpus} | {record.pid} | "
            + ", ".join(f"{i}: {b / MiB:.0f}" for i, b in sorted(nvml_seen.items()))
            + " | "
            + ", ".join(f"{g}: {v / MiB:.0f}" for g, v in sorted(exp))
            + f" | {flag} | {record.state}, gpu_verified={record.gpu_verified}, "
            f"{record.message} | {'yes' if right else '**no**'} |"
        )
    gpus = sorted({labels["gpu"] for n, labels, _ in samples if n == "kiban_gpu_memory_used_bytes"})
    lines += ["", f"GPUs in the gateway's exporter: {', '.join(gpus) or 'none'}"]
    ok &= len(gpus) == gpu_count
    print("\n".join(lines))
    return 0 if ok else 1


def _requests(path: Path) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name, labels, value in metrics(path.read_text()):
        if name == "kiban_requests_total":
            engine = labels.get("engine", "?")
            counts[engine] = counts.get(engine, 0.0) + value
    return counts


def cmd_served(args) -> int:
    """Requests each engine answered between two scrapes of the gateway's /metrics."""
    before, after = _requests(args.before), _requests(args.after)
    delta = {e: after.get(e, 0) - before.get(e, 0) for e in sorted(set(before) | set(after))}
    total = sum(delta.values())
    shares = ", ".join(
        f"{e}: {n:.0f} ({n / total:.0%})" if total else f"{e}: 0" for e, n in delta.items()
    )
    print(f"requests answered per engine: {shares}")
    balanced = total > 0 and all(delta.get(e, 0) >= total * args.min_share for e in args.expect)
    return 0 if balanced or not args.expect else 1


def cmd_kill(args) -> int:
    """A load that saw one engine killed: no failure before streaming started."""
    result = json.loads(args.bench.read_text())["result"]
    errors: dict[str, int] = result.get("errors", {})
    before_stream = {k: v for k, v in errors.items() if k.startswith("http_") or k in
                     ("connect", "timeout", "protocol", "disconnected")}  # fmt: skip
    mid_stream = {k: v for k, v in errors.items() if k not in before_stream}
    print(
        f"requests {result.get('requests')}, ok {result.get('ok')}; failed before streaming "
        f"started: {sum(before_stream.values())} {before_stream or ''}; ended mid-stream "
        f"(started on the killed engine): {sum(mid_stream.values())} {mid_stream or ''}; "
        f"samples: {json.dumps(result.get('error_samples', {}))}"
    )
    return 0 if not before_stream and result.get("ok", 0) > 0 else 1


def cmd_restarted(args) -> int:
    """Wait until the supervisor has the engine running again with a new PID on its GPUs."""
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    record = None
    while time.monotonic() < deadline:
        record = state_of(args.config).engines[args.engine]
        if record.state == "running" and record.pid not in (None, args.old_pid):
            pids = group_members(record.pid) | {record.pid}
            where = {i: held_on(i, pids) for i in record.gpus}
            if all(b is not None for b in where.values()):
                print(
                    f"{args.engine}: running again after {time.monotonic() - started:.1f} s "
                    f"(restarts {record.restarts}), PID {args.old_pid} -> {record.pid}, on GPU "
                    + ", ".join(f"{i} ({b / MiB:.0f} MiB)" for i, b in where.items())
                    + f", gpu_verified={record.gpu_verified}"
                )
                return 0
        time.sleep(1)
    print(f"{args.engine}: not running again within {args.timeout:g} s: {record}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--plan", type=Path, required=True)
    p = sub.add_parser("gpus")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p = sub.add_parser("served")
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--expect", nargs="*", default=[], help="engines that must each get a share")
    p.add_argument("--min-share", type=float, default=0.25)
    p = sub.add_parser("kill")
    p.add_argument("--bench", type=Path, required=True)
    p = sub.add_parser("restarted")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--old-pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    handler = {
        "memory": cmd_memory,
        "gpus": cmd_gpus,
        "served": cmd_served,
        "kill": cmd_kill,
        "restarted": cmd_restarted,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
