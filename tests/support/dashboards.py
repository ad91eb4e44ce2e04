"""Read the queries out of kiban's Grafana dashboards and run them against a real Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kiban.observability.report import Prometheus

_GPU_SERIES = re.compile(r"\bkiban_gpu_[a-z_]+|\bkiban_engine_gpu_verified\b")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def about_gpus(self) -> bool:
        """The query reads a GPU series (NVML exporter, GPU policy)."""
        return bool(_GPU_SERIES.search(self.expr))


def panel_queries(path: Path) -> list[PanelQuery]:
    board = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append(PanelQuery(board["uid"], panel["title"], target["refId"], target["expr"]))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables as a query would see them ($__rate_interval, $engine, ...)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    return expr


def empty_panels(
    prom: Prometheus, queries: list[PanelQuery], variables: dict[str, str], at: float
) -> list[PanelQuery]:
    """The queries that return no series at *at*."""
    return [q for q in queries if not prom.query(substitute(q.expr, variables), at)]
