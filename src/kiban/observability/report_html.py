"""``kiban report --html``: the report as one self-contained page, with charts per GPU.

The figures and conclusions are :func:`kiban.observability.report.build_report`'s;
this adds, per GPU, the series over the period from Prometheus range queries
(VRAM in use, each engine's KV-cache usage, requests waiting, tokens/s) and
the busy share of each day (the share of samples with a request running on
one of the GPU's engines), and a verdict in plain words. The page inlines
its data (JSON), its CSS and the uPlot the console ships: it opens from a
file, offline, and can be mailed.
"""

from __future__ import annotations

import datetime
import html
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kiban.observability.report import (
    KV_SATURATION_NOTE,
    QUEUE_NOTE,
    UNASSIGNED,
    VRAM_NOTE,
    GpuFigures,
    Prometheus,
    Report,
    _pct,
    _where,
)

#: points per chart line at most
POINTS = 300
_UPLOT = "uplot-1.6.32.min"


@dataclass
class GpuSeries:
    """One GPU's lines over the period: timestamps and named value lists (None: no sample)."""

    t: list[float] = field(default_factory=list)
    vram: dict[str, list[float | None]] = field(default_factory=dict)
    kv: dict[str, list[float | None]] = field(default_factory=dict)
    waiting: dict[str, list[float | None]] = field(default_factory=dict)
    tokens: dict[str, list[float | None]] = field(default_factory=dict)
    busy_by_day: dict[str, float] = field(default_factory=dict)


def _gpu_of(metric: dict[str, str]) -> str:
    return metric.get("gpu") or UNASSIGNED


def collect_series(prom: Prometheus, report: Report, resolution_s: float) -> dict[str, GpuSeries]:
    """Range queries over the report's period, grouped by GPU."""
    step = max(resolution_s, (report.end - report.start) / POINTS)
    times = []
    t = report.start
    while t <= report.end + 1e-6:
        times.append(round(t, 3))
        t += step
    series: dict[str, GpuSeries] = defaultdict(lambda: GpuSeries(t=times))

    def lines(promql: str, label: str) -> list[tuple[str, str, list[float | None]]]:
        found = []
        for item in prom.query_range(promql, report.start, report.end, step):
            values: list[float | None] = [None] * len(times)
            for at, value in item["values"]:
                i = round((float(at) - report.start) / step)
                if 0 <= i < len(times) and value not in ("NaN", "+Inf", "-Inf"):
                    values[i] = float(value)
            metric = item["metric"]
            found.append((_gpu_of(metric), metric.get(label, ""), values))
        return found

    used = "kiban_gpu_memory_used_bytes / kiban_gpu_memory_total_bytes"
    for gpu, _, values in lines(used, "gpu"):
        series[gpu].vram["VRAM in use"] = values
    for name, field_name in (
        ("kiban:engine_kv_cache_usage:ratio", "kv"),
        ("kiban:engine_requests_waiting", "waiting"),
        ("kiban:engine_generation_tokens:rate", "tokens"),
    ):
        for gpu, engine, values in lines(name, "engine"):
            getattr(series[gpu], field_name)[engine] = values
    busy = "sum by (gpu) (kiban:engine_requests_running) > bool 0"
    busy_step = max(resolution_s, (report.end - report.start) / 11000)  # Prometheus' limit
    for item in prom.query_range(busy, report.start, report.end, busy_step):
        per_day: dict[str, list[float]] = defaultdict(list)
        for at, value in item["values"]:
            day = datetime.datetime.fromtimestamp(float(at), datetime.UTC).strftime("%Y-%m-%d")
            per_day[day].append(float(value))
        series[_gpu_of(item["metric"])].busy_by_day = {
            day: sum(v) / len(v) for day, v in sorted(per_day.items())
        }
    for gpu in {g.gpu for g in report.gpus}:
        series[gpu]  # every GPU of the report gets its (maybe empty) charts
    return dict(series)


def verdict(g: GpuFigures, s: GpuSeries | None) -> str:
    """Does this GPU suffice? One sentence with the numbers behind it."""
    where = _where(g)
    verb = "suffice" if where.endswith("engines") else "suffices"  # "CPU engines" / "GPU 0"
    full = [e for e in g.engines if (e.kv_saturated_share or 0) >= KV_SATURATION_NOTE]
    queued = [e for e in g.engines if (e.queued_share or 0) >= QUEUE_NOTE]
    vram = (g.vram_high_share or 0) >= VRAM_NOTE
    busiest = max(s.busy_by_day.items(), key=lambda kv: kv[1]) if s and s.busy_by_day else None
    busy = f"; busiest day {busiest[0]}, busy {_pct(busiest[1])} of it" if busiest else ""
    if full or queued or vram:
        reasons = [
            f"{e.engine}'s KV cache was full {_pct(e.kv_saturated_share or 0)} of the time"
            for e in full
        ]
        reasons += [
            f"requests queued in {e.engine} {_pct(e.queued_share or 0)} of the time" for e in queued
        ]
        if vram:
            reasons.append(f"VRAM was above 90% {_pct(g.vram_high_share or 0)} of the time")
        return f"{where} {'do' if verb == 'suffice' else 'does'} not suffice: " + (
            f"{', '.join(reasons)}{busy}. Add a second GPU now."
        )
    if not g.engines and g.vram_peak is None:
        return f"{where}: no data in this period."
    peaks = [e.kv_usage_peak for e in g.engines if e.kv_usage_peak is not None]
    kv = f"KV cache peaked at {_pct(max(peaks))}" if peaks else "no KV-cache figures"
    tokens = [e.tokens_per_s_peak for e in g.engines if e.tokens_per_s_peak is not None]
    peak = f", {max(tokens):,.1f} tokens/s at peak" if tokens else ""
    return (
        f"{where} {verb}: {kv}{peak}, no lasting queue{busy}. "
        "A second GPU is due when the KV cache is full or requests queue for more than "
        f"{_pct(KV_SATURATION_NOTE)} / {_pct(QUEUE_NOTE)} of the time."
    )


def render_html(report: Report, series: dict[str, GpuSeries]) -> str:
    """The whole page."""
    static = resources.files("kiban.gateway").joinpath("console_static")
    uplot_js = static.joinpath(f"{_UPLOT}.js").read_text(encoding="utf-8")
    uplot_css = static.joinpath(f"{_UPLOT}.css").read_text(encoding="utf-8")
    data = {
        "gpus": [
            {
                "gpu": g.gpu,
                "where": _where(g),
                "series": _series_dict(series.get(g.gpu)),
            }
            for g in report.gpus
        ]
    }
    start, end = (_when(report.start), _when(report.end))
    sections = "\n".join(_gpu_section(g, series.get(g.gpu)) for g in report.gpus)
    if not report.gpus:
        sections = "<p class=empty>Prometheus has no kiban series in this period.</p>"
    values = {
        "title": html.escape(f"kiban report, {start} to {end}"),
        "source": html.escape(report.prometheus),
        "uplot_css": uplot_css,
        "css": _CSS,
        "sections": sections,
        "data": json.dumps(data).replace("</", "<\\/"),
        "uplot_js": uplot_js.replace("</script", "<\\/script"),
        "script": _SCRIPT,
    }
    return re.sub(r"@@(\w+)@@", lambda m: values[m.group(1)], _PAGE)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _series_dict(s: GpuSeries | None) -> dict[str, Any]:
    if s is None:
        return {}
    return {
        "t": s.t,
        "vram": s.vram,
        "kv": s.kv,
        "waiting": s.waiting,
        "tokens": s.tokens,
        "busy_by_day": s.busy_by_day,
    }


def _share(value: float | None) -> str:
    return "-" if value is None else _pct(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _gpu_section(g: GpuFigures, s: GpuSeries | None) -> str:
    e = html.escape
    rows = "".join(
        "<tr>"
        f"<td>{e(f.engine)}</td><td>{e(f.model)}</td>"
        f"<td class=num>{_share(f.kv_saturated_share)}</td>"
        f"<td class=num>{_share(f.kv_usage_peak)}</td>"
        f"<td class=num>{_share(f.queued_share)}</td>"
        f"<td class=num>{_rate(f.tokens_per_s)}</td><td class=num>{_rate(f.tokens_per_s_peak)}</td>"
        f"<td class=num>{f.requests:,.0f}</td><td class=num>{f.errors:,.0f}</td>"
        "</tr>"
        for f in g.engines
    )
    notes = "".join(f"<li>{e(c)}</li>" for c in g.conclusions)
    days = "".join(
        f"<tr><td>{e(day)}</td><td class=num>{_pct(share)}</td></tr>"
        for day, share in (s.busy_by_day.items() if s else ())
    )
    gpu_id = e(g.gpu)
    return f"""
<section class=gpu data-gpu="{gpu_id}">
  <h2>{e(_where(g))}</h2>
  <p class=verdict>{e(verdict(g, s))}</p>
  <ul class=notes>{notes}</ul>
  <p class=figures>VRAM above 90%: {_share(g.vram_high_share)} of the time, peak
    {_share(g.vram_peak)}; mean utilisation {_share(g.utilization_mean)}.</p>
  <div class=charts>
    <figure><figcaption>VRAM in use</figcaption><div class=chart data-chart=vram></div></figure>
    <figure><figcaption>KV cache in use</figcaption><div class=chart data-chart=kv></div></figure>
    <figure><figcaption>requests waiting in the engine</figcaption>
      <div class=chart data-chart=waiting></div></figure>
    <figure><figcaption>generated tokens/s</figcaption>
      <div class=chart data-chart=tokens></div></figure>
  </div>
  <h3>Busy share of each day</h3>
  <table class=days><thead><tr><th>day (UTC)</th><th>busy</th></tr></thead>
    <tbody>{days or "<tr><td colspan=2 class=empty>no engine figures</td></tr>"}</tbody></table>
  <h3>Engines</h3>
  <table><thead><tr><th>engine</th><th>model</th><th>KV full</th><th>KV peak</th>
    <th>queued</th><th>tokens/s</th><th>tokens/s peak</th><th>requests</th><th>5xx</th>
  </tr></thead><tbody>{rows or "<tr><td colspan=9 class=empty>none</td></tr>"}</tbody></table>
</section>"""


_CSS = """
body { margin: 0 auto; max-width: 1200px; padding: 16px 24px;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 14px; }
.source { color: #66707a; }
.verdict { font-size: 15px; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 0; padding: 8px; border: 1px solid #d8dde2; border-radius: 6px; }
figcaption { color: #66707a; }
table { border-collapse: collapse; margin: 4px 0 12px; }
th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #d8dde2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.empty { color: #66707a; font-style: italic; }
"""

_SCRIPT = """
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const colors = ["#1f6feb", "#c62828", "#1a7f37", "#8250df", "#b26a00", "#0f766e"];
  const ratio = (v) => (v === null ? null : 100 * v);
  const scale = { vram: ratio, kv: ratio, waiting: (v) => v, tokens: (v) => v };
  const units = { vram: "%", kv: "%", waiting: "", tokens: "/s" };
  for (const gpu of data.gpus) {
    const section = document.querySelector('section[data-gpu="' + CSS.escape(gpu.gpu) + '"]');
    const s = gpu.series;
    for (const el of section.querySelectorAll("[data-chart]")) {
      const kind = el.dataset.chart;
      const lines = Object.entries((s && s[kind]) || {});
      el.dataset.lines = String(lines.length);
      if (!lines.length) { el.textContent = "no data"; el.className += " empty"; continue; }
      const opts = {
        width: Math.max(480, el.clientWidth || 520), height: 200,
        scales: { x: { time: true } },
        axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => v + units[kind]) }],
        series: [{}].concat(lines.map(([name], i) => ({
          label: name, stroke: colors[i % colors.length], width: 2, spanGaps: false,
        }))),
      };
      new uPlot(opts, [s.t].concat(lines.map(([, values]) => values.map(scale[kind]))), el);
      el.dataset.drawn = "1";
    }
  }
  document.body.dataset.ready = "1";
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@@title@@</title>
<style>@@uplot_css@@</style>
<style>@@css@@</style>
</head>
<body>
<h1>@@title@@</h1>
<p class=source>From Prometheus at @@source@@. Charts: uPlot 1.6.32 (MIT), inlined.</p>
@@sections@@
<script id="report-data" type="application/json">@@data@@</script>
<script>@@uplot_js@@</script>
<script>@@script@@</script>
</body>
</html>
"""
