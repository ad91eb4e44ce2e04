"""``kiban report``: what a period (a day, a week) says about each GPU, read from Prometheus.

Every figure is one instant PromQL query at the end of the period, over the
period (subqueries where a share of time is asked), so a week costs the same
dozen queries as an hour. Engines are grouped by their ``gpu`` label (see
:func:`kiban.observability.scrape.engine_labels`); the GPU exporter's series
carry the same label.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from kiban.errors import KibanError

VRAM_HIGH = 0.9
KV_HIGH = 0.9
KV_SATURATION_NOTE = 0.05
VRAM_NOTE = 0.05
QUEUE_NOTE = 0.10
ERROR_NOTE = 0.01
UNASSIGNED = "unassigned"

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportError(KibanError):
    """Prometheus could not be read, or answered with an error."""


def parse_period(text: str) -> float:
    """``30m``, ``12h``, ``1d``, ``1w`` -> seconds."""
    match = _PERIOD.match(text)
    if not match:
        raise ValueError(f"invalid period {text!r}; expected a number and s, m, h, d or w (1d, 7d)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds < 60:
        raise ValueError(f"period {text!r} is shorter than a minute")
    return seconds


class Prometheus:
    """The few calls of Prometheus' HTTP API the report makes."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        return self._get("query", {"query": promql, "time": f"{at:.3f}"}, promql)

    def query_range(
        self, promql: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        return self._get("query_range", {**params, "step": f"{step_s:g}s"}, promql)

    def _get(self, api: str, query: dict[str, str], promql: str) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode(query)
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/{api}?{params}", timeout=self.timeout_s
            ) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            try:
                detail = json.load(err).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise ReportError(f"Prometheus at {self.url} refused {promql!r}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ReportError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        if body.get("status") != "success":
            raise ReportError(f"Prometheus at {self.url}: {body.get('error', body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@dataclass
class EngineFigures:
    engine: str
    gpu: str
    kind: str = ""
    model: str = ""
    kv_saturated_share: float | None = None
    kv_usage_peak: float | None = None
    queued_share: float | None = None
    queue_peak: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_peak: float | None = None
    requests: float = 0.0
    errors: float = 0.0


@dataclass
class GpuFigures:
    gpu: str
    engines: list[EngineFigures] = field(default_factory=list)
    vram_high_share: float | None = None
    vram_peak: float | None = None
    utilization_mean: float | None = None
    conclusions: list[str] = field(default_factory=list)


@dataclass
class Report:
    prometheus: str
    start: float
    end: float
    gpus: list[GpuFigures]

    @property
    def period_s(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return {
            "prometheus": self.prometheus,
            "start": self.start,
            "end": self.end,
            "period_s": self.period_s,
            "gpus": [asdict(g) for g in self.gpus],
        }


def _by(results: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    out = {}
    for item in results:
        value = float(item["value"][1])
        if value != value:  # NaN: no data in the window
            continue
        out[tuple(item["metric"].get(label, "") for label in labels)] = value
    return out


def build_report(
    prom: Prometheus, period_s: float, end: float | None = None, resolution_s: float = 15.0
) -> Report:
    """Query Prometheus for the period ending at *end* (now by default).

    Shares of time are sampled every *resolution_s* (the scrape interval), or
    coarser for long periods (at most 2000 samples a series).
    """
    end = time.time() if end is None else end
    p = f"{int(period_s)}s"
    step = f"{max(int(resolution_s), 1, int(period_s / 2000))}s"
    sub = f"[{p}:{step}]"

    def q(promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        return _by(prom.query(promql, end), *labels)

    used = "(kiban_gpu_memory_used_bytes / kiban_gpu_memory_total_bytes)"
    vram_high = q(f"avg by (gpu) (avg_over_time(({used} > bool {VRAM_HIGH}){sub}))", "gpu")
    vram_peak = q(f"max by (gpu) (max_over_time({used}{sub}))", "gpu")
    util = q(f"avg by (gpu) (avg_over_time(kiban_gpu_utilization_ratio[{p}]))", "gpu")

    keys = ("engine", "gpu", "kind", "model")
    kv = "kiban:engine_kv_cache_usage:ratio"
    waiting = "kiban:engine_requests_waiting"
    tokens = "kiban:engine_generation_tokens:rate"
    kv_sat = q(f"avg_over_time(({kv} > bool {KV_HIGH}){sub})", *keys)
    kv_peak = q(f"max_over_time({kv}[{p}])", *keys)
    queued = q(f"avg_over_time(({waiting} > bool 0){sub})", *keys)
    queue_peak = q(f"max_over_time({waiting}[{p}])", *keys)
    # tokens/s served: the rate averaged over the whole period (idle time counts as 0)
    tps = q(f"sum_over_time({tokens}{sub}) / {period_s / _seconds(step):.6g}", *keys)
    tps_peak = q(f"max_over_time({tokens}[{p}])", *keys)
    requests = q(f"sum by (engine) (increase(kiban_requests_total[{p}]))", "engine")
    errors = q(f'sum by (engine) (increase(kiban_requests_total{{status=~"5.."}}[{p}]))', "engine")

    engines: dict[str, EngineFigures] = {}
    for series in (kv_sat, kv_peak, queued, queue_peak, tps, tps_peak):
        for engine, gpu, kind, model in series:
            engines.setdefault(engine, EngineFigures(engine, gpu or UNASSIGNED, kind, model))
    for (engine,) in requests:
        if engine and engine != "none":
            engines.setdefault(engine, EngineFigures(engine, UNASSIGNED))
    for key, fig in engines.items():
        full = (fig.engine, "" if fig.gpu == UNASSIGNED else fig.gpu, fig.kind, fig.model)
        fig.kv_saturated_share = kv_sat.get(full)
        fig.kv_usage_peak = kv_peak.get(full)
        fig.queued_share = queued.get(full)
        fig.queue_peak = queue_peak.get(full)
        fig.tokens_per_s = tps.get(full)
        fig.tokens_per_s_peak = tps_peak.get(full)
        fig.requests = requests.get((key,), 0.0)
        fig.errors = errors.get((key,), 0.0)

    gpus: dict[str, GpuFigures] = {}
    for (gpu,) in {**vram_high, **vram_peak, **util}:
        gpus.setdefault(gpu, GpuFigures(gpu))
    for fig in engines.values():
        gpus.setdefault(fig.gpu, GpuFigures(fig.gpu)).engines.append(fig)
    for gpu, g in gpus.items():
        g.vram_high_share = vram_high.get((gpu,))
        g.vram_peak = vram_peak.get((gpu,))
        g.utilization_mean = util.get((gpu,))
        g.engines.sort(key=lambda e: e.engine)
        g.conclusions = conclude(g)
    ordered = sorted(gpus.values(), key=lambda g: (g.gpu == UNASSIGNED, _gpu_sort_key(g.gpu)))
    return Report(prom.url, end - period_s, end, ordered)


def _seconds(step: str) -> float:
    return float(step.rstrip("s"))


def _gpu_sort_key(gpu: str) -> tuple[int, str]:
    head = gpu.split(",")[0]
    return (int(head), gpu) if head.isdigit() else (1 << 30, gpu)


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%" if share >= 0.01 or share == 0 else f"{share * 100:.1f}%"


def _where(g: GpuFigures) -> str:
    if g.gpu == UNASSIGNED:
        return "Engines without a GPU label"
    if g.gpu == "cpu":
        return "CPU engines"
    return f"GPU {g.gpu}"


def conclude(g: GpuFigures) -> list[str]:
    """Plain sentences for one GPU, the most pressing first."""
    where = _where(g)
    notes: list[str] = []
    for e in g.engines:
        if e.kv_saturated_share is not None and e.kv_saturated_share >= KV_SATURATION_NOTE:
            notes.append(
                f"{where} ran out of KV cache {_pct(e.kv_saturated_share)} of the time "
                f"({e.engine}): add a GPU or use int8 KV."
            )
    if g.vram_high_share is not None and g.vram_high_share >= VRAM_NOTE:
        notes.append(
            f"{where} had more than 90% of its memory in use {_pct(g.vram_high_share)} "
            "of the time: no room for another engine or a longer context."
        )
    for e in g.engines:
        if e.queued_share is not None and e.queued_share >= QUEUE_NOTE:
            notes.append(
                f"Requests queued inside {e.engine} {_pct(e.queued_share)} of the time "
                f"(up to {e.queue_peak or 0:.0f} waiting): it needs more capacity."
            )
        if e.requests and e.errors / e.requests >= ERROR_NOTE:
            notes.append(
                f"{e.errors:.0f} of {e.requests:.0f} requests to {e.engine} failed with a 5xx "
                f"({_pct(e.errors / e.requests)})."
            )
    if notes:
        return notes
    if not g.engines and g.vram_peak is None:
        return [f"{where}: no data in this period."]
    peaks = [e.kv_usage_peak for e in g.engines if e.kv_usage_peak is not None]
    kv = f"KV cache peaked at {_pct(max(peaks))}" if peaks else "no KV-cache figures"
    return [f"{where} has headroom: {kv}, no lasting queue, no errors worth noting."]


def render_table(report: Report) -> Any:
    """The report as Rich renderables (a table and the conclusions)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def share(value: float | None) -> str:
        return "-" if value is None else _pct(value)

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    start = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.start))
    end = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.end))
    table = Table(title=f"kiban report, {start} to {end} ({report.prometheus})")
    for column in ("GPU", "engine", "VRAM >90%", "VRAM peak", "util", "KV full", "KV peak"):
        table.add_column(column, justify="left" if column in ("GPU", "engine") else "right")
    for column in ("queued", "tokens/s", "tokens/s peak", "requests", "5xx"):
        table.add_column(column, justify="right")
    for g in report.gpus:
        rows: list[EngineFigures | None] = [*g.engines] or [None]
        for i, e in enumerate(rows):
            first = i == 0
            table.add_row(
                g.gpu if first else "",
                e.engine if e else "-",
                share(g.vram_high_share) if first else "",
                share(g.vram_peak) if first else "",
                share(g.utilization_mean) if first else "",
                share(e.kv_saturated_share) if e else "-",
                share(e.kv_usage_peak) if e else "-",
                share(e.queued_share) if e else "-",
                rate(e.tokens_per_s) if e else "-",
                rate(e.tokens_per_s_peak) if e else "-",
                f"{e.requests:,.0f}" if e else "-",
                f"{e.errors:,.0f}" if e else "-",
            )
    notes = Text("\n".join(f"- {c}" for g in report.gpus for c in g.conclusions))
    return Group(table, notes)
