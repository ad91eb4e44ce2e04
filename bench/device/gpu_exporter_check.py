"""Device check: kiban's NVML GPU exporter against ``nvidia-smi``, read in the same moment.

Run on a GPU machine from the repository root with the machine's python3
(nvidia-ml-py and prometheus_client installed; kiban itself need not be):

    python3 bench/device/gpu_exporter_check.py [--rounds 5] [--load-seconds 20]

While it compares, an optional torch process (if torch is importable) keeps
GPU 0 busy and holds 1 GiB, so utilisation, power, clocks and the per-process
memory are compared under load and not only at idle. Each round reads the
exporter, then ``nvidia-smi --query-gpu=...`` and ``--query-compute-apps=...``,
then the exporter again; a reading matches when nvidia-smi's value lies within
the tolerance of the two exporter readings around it. Readings nvidia-smi
gives as [N/A] / [Not Supported] must be flagged unsupported by the exporter
(``kiban_gpu_metric_supported 0``), never exported as numbers.

Writes ``$OUT/gpu_exporter_check.json`` and ``$OUT/gpu_exporter_check.md``
(``$OUT`` defaults to ./out); exits 1 when any reading disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiban.observability.gpu import CLOCK_EVENT_REASONS, GpuCollector

MiB = 1024 * 1024

# nvidia-smi field -> (exporter metric, scale to nvidia-smi's unit, absolute tol, relative tol,
#                      exporter reading name for kiban_gpu_metric_supported)
FIELDS: dict[str, tuple[str, float, float, float, str]] = {
    "memory.total": ("kiban_gpu_memory_total_bytes", 1 / MiB, 1, 0, "memory"),
    "memory.used": ("kiban_gpu_memory_used_bytes", 1 / MiB, 64, 0.01, "memory"),
    "memory.reserved": ("kiban_gpu_memory_reserved_bytes", 1 / MiB, 1, 0, "memory"),
    "utilization.gpu": ("kiban_gpu_utilization_ratio", 100, 15, 0, "utilization"),
    "utilization.memory": ("kiban_gpu_memory_utilization_ratio", 100, 15, 0, "utilization"),
    "temperature.gpu": ("kiban_gpu_temperature_celsius", 1, 2, 0, "temperature"),
    "power.draw": ("kiban_gpu_power_watts", 1, 15, 0.15, "power"),
    "enforced.power.limit": ("kiban_gpu_power_limit_watts", 1, 1, 0, "power_limit"),
    "clocks.sm": ("kiban_gpu_sm_clock_hertz", 1e-6, 50, 0.1, "clocks"),
    "clocks.mem": ("kiban_gpu_memory_clock_hertz", 1e-6, 50, 0.1, "clocks"),
    "fan.speed": ("kiban_gpu_fan_speed_ratio", 100, 5, 0, "fan_speed"),
    "ecc.errors.corrected.volatile.total": ("kiban_gpu_ecc_errors_total", 1, 0, 0, "ecc_errors"),
    "ecc.errors.uncorrected.volatile.total": ("kiban_gpu_ecc_errors_total", 1, 0, 0, "ecc_errors"),
    "pstate": ("kiban_gpu_performance_state", 1, 0, 0, "performance_state"),
    "clocks_event_reasons.active": ("kiban_gpu_clock_event_active", 1, 0, 0, "clock_events"),
}
ECC_TYPE = {
    "ecc.errors.corrected.volatile.total": "corrected",
    "ecc.errors.uncorrected.volatile.total": "uncorrected",
}
# bit of nvidia-smi's clocks_event_reasons.active mask for each kiban reason label
REASON_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
UNAVAILABLE = ("[N/A]", "[Not Supported]", "N/A", "[Unknown Error]")

LOAD = """
import sys, time, torch
x = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")  # 1 GiB
a = torch.randn(4096, 4096, device="cuda")
end = time.time() + float(sys.argv[1])
print("ready", flush=True)
while time.time() < end:
    for _ in range(50):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
"""


def exporter_readings(collector: GpuCollector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def smi_fields() -> list[str]:
    """The --query-gpu fields this nvidia-smi knows, of those kiban compares."""
    help_text = subprocess.run(
        ["nvidia-smi", "--help-query-gpu"], capture_output=True, text=True, check=True
    ).stdout
    known = []
    for field in FIELDS:
        alt = field.replace("clocks_event_reasons", "clocks_throttle_reasons")
        if f'"{field}"' in help_text:
            known.append(field)
        elif f'"{alt}"' in help_text:
            known.append(alt)
    return known


def query_smi(fields: list[str]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    gpus = subprocess.run(
        ["nvidia-smi", f"--query-gpu=index,{','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [
        dict(zip(["index", *fields], (v.strip() for v in line.split(",")), strict=True))
        for line in gpus.strip().splitlines()
    ]
    apps = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=gpu_uuid,pid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    app_rows = [
        dict(
            zip(
                ["gpu_uuid", "pid", "used_memory"],
                (v.strip() for v in line.split(",")),
                strict=True,
            )
        )
        for line in apps.strip().splitlines()
        if line.strip()
    ]
    return rows, app_rows


def exporter_value(readings, field: str, gpu: str, reason: str | None = None) -> float | None:
    metric = FIELDS[field.replace("clocks_throttle_reasons", "clocks_event_reasons")][0]
    labels: dict[str, str] = {"gpu": gpu}
    if field in ECC_TYPE:
        labels["type"] = ECC_TYPE[field]
    if reason:
        labels["reason"] = reason
    return readings.get((metric, tuple(sorted(labels.items()))))


def supported(readings, gpu: str, name: str) -> float | None:
    return readings.get(
        ("kiban_gpu_metric_supported", tuple(sorted({"gpu": gpu, "metric": name}.items())))
    )


def compare_round(collector: GpuCollector, fields: list[str]) -> list[dict]:
    before = exporter_readings(collector)
    smi_rows, apps = query_smi(fields)
    after = exporter_readings(collector)
    results = []
    uuid_to_gpu = {i["uuid"]: i["gpu"] for i in collector.info}
    for row in smi_rows:
        gpu = row["index"]
        for field in fields:
            canonical = field.replace("clocks_throttle_reasons", "clocks_event_reasons")
            _, scale, tol_abs, tol_rel, reading = FIELDS[canonical]
            smi = row[field]
            flag = supported(after, gpu, reading)
            result = {"gpu": gpu, "field": canonical, "nvidia_smi": smi, "supported": flag}
            if smi in UNAVAILABLE:
                values = [exporter_value(r, field, gpu) for r in (before, after)]
                result["exporter"] = values[1]
                # nvidia-smi has none: the exporter must not invent a number
                result["ok"] = flag == 0 or all(v is None for v in values)
                result["note"] = "unavailable in nvidia-smi"
            elif canonical == "pstate":
                want = float(smi.lstrip("P"))
                got = [exporter_value(r, field, gpu) for r in (before, after)]
                result.update(exporter=got[1], ok=want in got)
            elif canonical == "clocks_event_reasons.active":
                mask = int(smi, 16)
                mismatched = []
                for reason in CLOCK_EVENT_REASONS:
                    want = 1.0 if mask & REASON_BITS[reason] else 0.0
                    got = {exporter_value(r, field, gpu, reason) for r in (before, after)}
                    if want not in got:
                        mismatched.append(reason)
                result.update(exporter="per reason", ok=not mismatched, mismatched=mismatched)
            else:
                want = float(smi)
                got = [exporter_value(r, field, gpu) for r in (before, after)]
                if None in got:
                    result.update(exporter=None, ok=False, note="missing from the exporter")
                else:
                    scaled = [g * scale for g in got]
                    tol = max(tol_abs, tol_rel * abs(want))
                    low, high = min(scaled) - tol, max(scaled) + tol
                    result.update(
                        exporter=round(scaled[1], 3),
                        diff=round(scaled[1] - want, 3),
                        tolerance=round(tol, 3),
                        ok=low <= want <= high,
                    )
            results.append(result)
    for app in apps:
        gpu = uuid_to_gpu.get(app["gpu_uuid"])
        want = app["used_memory"]
        matches = [
            v / MiB
            for (name, labels), v in after.items()
            if name == "kiban_gpu_process_memory_used_bytes"
            and dict(labels)["pid"] == app["pid"]
            and dict(labels)["gpu"] == gpu
        ]
        result = {"gpu": gpu, "field": f"process {app['pid']} used_memory", "nvidia_smi": want}
        if want in UNAVAILABLE:
            result.update(exporter=matches or None, ok=not matches)
        else:
            result.update(
                exporter=matches[0] if matches else None,
                ok=bool(matches) and abs(matches[0] - float(want)) <= 1,
            )
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)

    collector = GpuCollector(watch_xid=True)
    print(collector.describe_state(), flush=True)
    if not collector.available:
        (out / "gpu_exporter_check.json").write_text(
            json.dumps({"available": False, "reason": collector.unavailable_reason}, indent=2)
        )
        return 1

    load = None
    try:
        import torch  # noqa: F401

        load = subprocess.Popen(
            [sys.executable, "-c", LOAD, str(args.load_seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        load.stdout.readline()  # "ready": memory allocated, kernels running
        time.sleep(2)
    except ImportError:
        print("torch not importable: comparing an idle GPU", flush=True)

    try:
        fields = smi_fields()
        rounds = []
        for _ in range(args.rounds):
            rounds.append(compare_round(collector, fields))
            time.sleep(0.5)
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            exporter_readings(collector)
            timings.append(time.perf_counter() - started)
        final = exporter_readings(collector)
    finally:
        if load is not None:
            load.terminate()
            load.wait(timeout=30)
        collector.close()

    # a reading passes when it matched in most rounds (values move under load)
    summary: dict[tuple[str, str], dict] = {}
    for results in rounds:
        for r in results:
            key = (str(r["gpu"]), r["field"])
            entry = summary.setdefault(key, {**r, "matched_rounds": 0, "rounds": 0})
            entry["rounds"] += 1
            entry["matched_rounds"] += int(bool(r["ok"]))
            entry["last"] = r
    for entry in summary.values():
        entry["ok"] = entry["matched_rounds"] * 2 > entry["rounds"]
    supported_flags = {
        f"{dict(labels)['gpu']}/{dict(labels)['metric']}": v
        for (name, labels), v in final.items()
        if name == "kiban_gpu_metric_supported"
    }
    nvidia_smi_version = subprocess.run(
        ["nvidia-smi", "--version"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "available": True,
        "state": collector.describe_state(),
        "nvidia_smi": nvidia_smi_version,
        "python": platform.python_version(),
        "under_load": load is not None,
        "rounds": args.rounds,
        "collect_us": {
            "median": round(statistics.median(timings) * 1e6, 1),
            "p90": round(sorted(timings)[int(len(timings) * 0.9)] * 1e6, 1),
            "gpus": len(collector.gpus),
        },
        "supported": supported_flags,
        "comparisons": list(summary.values()),
        "ok": all(e["ok"] for e in summary.values()),
    }
    (out / "gpu_exporter_check.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        f"# kiban GPU exporter vs nvidia-smi\n\n{report['state']}; under load: "
        f"{report['under_load']}; {args.rounds} rounds; one NVML sweep (all GPUs) "
        f"median {report['collect_us']['median']} µs, p90 {report['collect_us']['p90']} µs.\n",
        "| GPU | reading | nvidia-smi | exporter | diff | tolerance | matched | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary.values():
        last = e["last"]
        lines.append(
            f"| {e['gpu']} | {e['field']} | {last['nvidia_smi']} | {last.get('exporter')} | "
            f"{last.get('diff', '')} | {last.get('tolerance', '')} | "
            f"{e['matched_rounds']}/{e['rounds']} | {'yes' if e['ok'] else '**no**'} |"
        )
    lines += ["", "Readings the platform does not give (kiban_gpu_metric_supported 0):", ""]
    lines += [f"- {k}" for k, v in sorted(supported_flags.items()) if v == 0] or ["- none"]
    (out / "gpu_exporter_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
