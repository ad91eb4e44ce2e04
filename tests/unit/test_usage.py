"""Usage per API key: the stream's usage asked for and its extra event dropped, counts kept
when the store fails, SQLite rows that add up across writers, series kept private and bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiban.gateway import usage as usage_module
from kiban.gateway.console_state import quantile
from kiban.gateway.metrics import Metrics
from kiban.gateway.proxy import Exchange
from kiban.gateway.sse import EventStream
from kiban.gateway.stream_usage import ask_for_usage
from kiban.gateway.usage import OTHER_KEYS, Usage
from kiban.gateway.usage_store import Batch, SqliteUsage, SqliteUsageStore, hour_of, totals

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"


def _exchange(**fields) -> Exchange:
    ex = Exchange(
        request_id="r", endpoint="chat", body=b"{}", payload={}, model="m", stream=True,
        client_headers=[],
    )  # fmt: skip
    for key, value in fields.items():
        setattr(ex, key, value)
    return ex


def test_ask_for_usage_splices_the_option_into_the_same_bytes() -> None:
    body = b' {"model":"m","stream":true,"messages":[]}'
    payload = orjson.loads(body)
    sent, added = ask_for_usage(payload, body)
    assert added
    assert orjson.loads(sent) == {**orjson.loads(body), "stream_options": {"include_usage": True}}
    assert payload["stream_options"] == {"include_usage": True}
    assert sent.endswith(body[body.index(b"{") + 1 :])


@pytest.mark.parametrize(
    ("options", "added"),
    [({"include_usage": True}, False), ({"include_usage": False}, True), ({}, True), (None, True)],
)
def test_ask_for_usage_with_stream_options_of_the_client(options, added) -> None:
    payload = {"model": "m", "stream": True, "stream_options": options}
    sent, was_added = ask_for_usage(payload, orjson.dumps(payload))
    assert was_added is added
    assert orjson.loads(sent)["stream_options"]["include_usage"] is True


def test_invalid_stream_options_are_left_for_the_engine() -> None:
    payload = {"model": "m", "stream": True, "stream_options": "yes"}
    body = orjson.dumps(payload)
    assert ask_for_usage(payload, body) == (body, False)


def test_dropping_removes_only_the_usage_event_and_reads_it() -> None:
    events = EventStream(drop_usage=True)
    assert events.feed(CHUNK) == CHUNK
    assert events.feed(CHUNK + USAGE + DONE) == CHUNK + DONE
    assert events.feed(USAGE) == b""
    assert events.usage is not None and events.done


def test_dropping_keeps_usage_that_rides_on_a_choice() -> None:
    event = b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}\n\n'
    assert EventStream(drop_usage=True).feed(event) == event


def test_dropping_holds_an_event_split_across_reads() -> None:
    events = EventStream(drop_usage=True)
    stream = CHUNK + USAGE + DONE
    out = b"".join(events.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert out == CHUNK + DONE
    events.close()


def test_tokens_come_from_the_engine_usage_else_an_estimate() -> None:
    metrics = Metrics()
    usage = Usage(metrics.registry)
    usage.record(
        "alice", _exchange(status=200, usage={"prompt_tokens": 7, "completion_tokens": 2}), 99
    )
    usage.record("alice", _exchange(status=200, chunks=5), 11)  # a stream without usage
    usage.record("bob", _exchange(status=502), 11)  # no engine answered: a request, no tokens
    assert totals(asyncio.run(usage.rows(time.time() - 60))) == {
        "alice": [2, 18, 7],
        "bob": [1, 0, 0],
    }


class _FailingStore:
    def __init__(self) -> None:
        self.fail = True
        self.batches: list[Batch] = []

    async def add(self, batch: Batch) -> None:
        if self.fail:
            raise OSError("disk full")
        self.batches.append(batch)

    async def rows(self, since, key=None):
        return []

    async def close(self) -> None:
        return None


def test_a_failing_store_loses_nothing() -> None:
    metrics = Metrics()
    usage = Usage(metrics.registry)
    store = _FailingStore()
    usage.store = store
    ok = _exchange(status=200, usage={"prompt_tokens": 3, "completion_tokens": 4})

    async def scenario() -> list[bool]:
        usage.record("alice", ok, 0)
        first = await usage.flush()
        usage.record("alice", ok, 0)
        store.fail = False
        second = await usage.flush()
        return [first, second]

    assert asyncio.run(scenario()) == [False, True]
    hour = hour_of(time.time())
    assert store.batches == [{("alice", hour): [2, 6, 8]}]
    assert _value(metrics.render("public"), "kiban_usage_store_errors_total") == 1


def test_without_a_store_the_last_day_stays_in_memory() -> None:
    usage = Usage(Metrics().registry)
    usage.record("new", _exchange(status=200, usage={"prompt_tokens": 1}), 0)
    usage._put_back({("old", hour_of(time.time()) - 3 * 86400): [1, 0, 0]})
    assert asyncio.run(usage.flush())
    assert totals(asyncio.run(usage.rows(0))) == {"new": [1, 1, 0]}


def test_sqlite_rows_add_up_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml.usage.sqlite"
    hour = hour_of(time.time())
    SqliteUsage(path).add({("alice", hour): [1, 10, 5], ("bob", hour - 7200): [2, 1, 1]})
    asyncio.run(SqliteUsageStore(path).add({("alice", hour): [2, 20, 10]}))
    rows = SqliteUsage(path).rows(time.time() - 3 * 3600)
    assert totals(rows) == {"alice": [3, 30, 15], "bob": [2, 1, 1]}
    assert totals(SqliteUsage(path).rows(time.time() - 60)) == {"alice": [3, 30, 15]}
    assert totals(SqliteUsage(path).rows(time.time() - 3 * 3600, "bob")) == {"bob": [2, 1, 1]}
    assert SqliteUsage(tmp_path / "none.sqlite").rows(0) == []


def _value(exposition: bytes, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_key_series_are_private() -> None:
    metrics = Metrics()
    usage = Usage(metrics.registry)
    usage.record(
        "alice", _exchange(status=200, usage={"prompt_tokens": 7, "completion_tokens": 2}), 0
    )
    usage.rejected("alice", "requests_per_minute")
    public, private = metrics.render("public"), metrics.render("private")
    assert b"alice" not in public and b"kiban_key_" not in public
    assert b"kiban_requests_total" not in private
    assert _value(private, "kiban_key_tokens_total", key="alice", type="prompt") == 7
    assert _value(private, "kiban_key_requests_total", key="alice", status="2xx") == 1
    assert (
        _value(
            private,
            "kiban_key_rate_limit_rejections_total",
            key="alice",
            limit="requests_per_minute",
        )
        == 1
    )


def test_key_series_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_module, "MAX_KEY_SERIES", 2)
    metrics = Metrics()
    usage = Usage(metrics.registry)
    for name in ("a", "b", "c", "d"):
        usage.record(name, _exchange(status=200, usage={"prompt_tokens": 1}), 0)
    private = metrics.render("private")
    keys = {
        s.labels["key"]
        for family in text_string_to_metric_families(private.decode())
        for s in family.samples
    }
    assert keys == {"a", "b", OTHER_KEYS}
    assert _value(private, "kiban_key_tokens_total", key=OTHER_KEYS, type="prompt") == 2


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 2.0), (0.5, 4.0), (1.0, 4.0), (float("inf"), 4.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.3)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_html_report_is_self_contained_and_escapes_names() -> None:
    from kiban.observability.report import EngineFigures, GpuFigures, Report
    from kiban.observability.report_html import GpuSeries, render_html, verdict

    hot = EngineFigures("<b>e</b>", "0", kv_saturated_share=0.2, kv_usage_peak=1.0, requests=9)
    full = GpuFigures("0", [hot], vram_high_share=0.0, vram_peak=0.5)
    idle = GpuFigures("1", [EngineFigures("calm", "1", kv_usage_peak=0.4, tokens_per_s_peak=12.5)])
    series = GpuSeries(t=[0.0, 60.0], busy_by_day={"2026-12-01": 0.25})
    assert verdict(full, series).startswith(
        "GPU 0 does not suffice: <b>e</b>'s KV cache was full 20%"
    )
    assert "busiest day 2026-12-01, busy 25% of it" in verdict(full, series)
    assert verdict(idle, None).startswith("GPU 1 suffices: KV cache peaked at 40%, 12.5 tokens/s")
    page = render_html(Report("http://prom:9090", 0.0, 3600.0, [full, idle]), {"0": series})
    assert "<b>e</b>" not in page and "&lt;b&gt;e&lt;/b&gt;" in page
    assert "<script src" not in page and "uPlot" in page and "@@" not in page
