"""Samples of a run (compact arrays) and their summary: rates, percentiles, errors."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kiban.bench.connection import Connection

PERCENTILES = (50, 90, 99)


class Recorder:
    """Collects one sample per finished request; 8 bytes per request, 4 per streamed token."""

    def __init__(self) -> None:
        self.latency = array("d")
        self.ttft = array("d")
        self.itl = array("f")
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_missing = 0  # successful requests without a usage block
        self.stream_events = 0
        self.token_events = 0
        self.started = 0.0
        self.last_finished = 0.0
        self.client_cpu_s = 0.0  # CPU time of this process (all threads) while measuring

    @property
    def finished(self) -> int:
        return self.ok + self.errors.total()

    def record(self, conn: Connection, started: float, stream: bool) -> None:
        """Account the request that just ended on *conn*, sent (or due) at *started*."""
        finished = conn.finished
        if finished > self.last_finished:
            self.last_finished = finished
        if conn.error is not None:
            self.error(conn.error, conn.error_sample)
            return
        self.ok += 1
        self.latency.append(finished - started)
        prompt, completion = conn.usage()
        if stream:
            timer = conn.timer
            self.stream_events += timer.events
            self.token_events += timer.token_events
            if timer.token_events:
                self.ttft.append(timer.first_token - started)
                self.itl.extend(timer.gaps)
            if completion is None:
                completion = timer.token_events
        if completion is None:
            self.usage_missing += 1
        else:
            self.completion_tokens += completion
            self.prompt_tokens += prompt or 0

    def error(self, kind: str, sample: bytes | str = b"") -> None:
        self.errors[kind] += 1
        if kind not in self.error_samples:
            text = sample.decode("utf-8", "replace") if isinstance(sample, bytes) else sample
            self.error_samples[kind] = " ".join(text.split())

    def summary(self, elapsed_s: float | None = None) -> Summary:
        """Figures of the run; *elapsed_s* defaults to first start to last finish."""
        if elapsed_s is None:
            elapsed_s = max(self.last_finished - self.started, 0.0)
        rate = (lambda n: n / elapsed_s) if elapsed_s > 0 else (lambda n: 0.0)
        return Summary(
            requests=self.finished,
            ok=self.ok,
            errors=dict(self.errors.most_common()),
            error_samples=dict(self.error_samples),
            duration_s=elapsed_s,
            requests_per_s=rate(self.ok),
            latency_ms=Distribution.of(self.latency),
            ttft_ms=Distribution.of(self.ttft),
            itl_ms=Distribution.of(self.itl),
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            output_tokens_per_s=rate(self.completion_tokens),
            stream_events=self.stream_events,
            token_events=self.token_events,
            usage_missing=self.usage_missing,
            client_cpu_s=self.client_cpu_s,
            client_cpu_us_per_request=self.client_cpu_s / self.finished * 1e6
            if self.finished
            else 0.0,
        )


@dataclass(frozen=True)
class Distribution:
    """Percentiles of a sample in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    min: float

    @classmethod
    def of(cls, samples: array[float]) -> Distribution | None:
        if not samples:
            return None
        values = np.frombuffer(samples, dtype=np.float64 if samples.typecode == "d" else np.float32)
        ms = values.astype(np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), p50, p90, p99, float(ms.max()), float(ms.min()))


@dataclass(frozen=True)
class Summary:
    """What a run measured; ``to_dict()`` is the ``--json`` output's ``result``."""

    requests: int
    ok: int
    errors: dict[str, int]
    error_samples: dict[str, str]
    duration_s: float
    requests_per_s: float
    latency_ms: Distribution | None
    ttft_ms: Distribution | None
    itl_ms: Distribution | None
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    stream_events: int
    token_events: int
    usage_missing: int
    client_cpu_s: float
    client_cpu_us_per_request: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
