"""The engines' own load (queue, KV cache) read from their /metrics and used in routing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.gateway.engine_load import KV_AVOID, LoadScraper, read_load
from kiban.gateway.prefix_scan import prompt_keys
from kiban.gateway.routing import Router
from tests.unit.test_affinity_routing import _chat, _conversation, _pick, _route


def _vllm_text(waiting: tuple[float, ...], kv: tuple[float, ...]) -> bytes:
    """/metrics as vLLM writes it: prometheus_client, one series per engine core."""
    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    w = Gauge("vllm:num_requests_waiting", "Waiting", labels, registry=registry)
    k = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage", labels, registry=registry)
    r = Gauge("vllm:num_requests_waiting_by_reason", "By reason", ["reason"], registry=registry)
    r.labels("capacity").set(99)
    for core, (n, usage) in enumerate(zip(waiting, kv, strict=True)):
        w.labels(str(core), "m").set(n)
        k.labels(str(core), "m").set(usage)
    return generate_latest(registry)


# llama-server's /metrics as its tools/server/server-task.cpp writes it (the real server's text
# is read in tests/integration/test_affinity_llamacpp.py)
LLAMACPP_TEXT = b"""# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
"""


def test_vllm_queue_is_summed_and_kv_use_is_the_fullest_core() -> None:
    load = read_load(_vllm_text((2, 3), (0.5, 0.95)), ENGINE_KINDS["vllm"].metrics.names)
    assert (load.waiting, load.kv_usage) == (5.0, 0.95)
    assert load.penalty(0.9) == 5 + KV_AVOID
    assert load.penalty(0.96) == 5


def test_llamacpp_deferred_requests_are_its_queue() -> None:
    load = read_load(LLAMACPP_TEXT, ENGINE_KINDS["llamacpp"].metrics.names)
    assert (load.waiting, load.kv_usage) == (3.0, None)
    assert load.penalty(0.9) == 3


def test_no_series_no_load() -> None:
    load = read_load(b"# nothing here\n", ENGINE_KINDS["sglang"].metrics.names)
    assert (load.waiting, load.kv_usage, load.penalty(0.9)) == (None, None, 0)


def test_least_outstanding_counts_the_engine_queue_and_avoids_a_full_kv_cache() -> None:
    router = _router("least_outstanding")
    route = router.route_for("m")
    router.engines["a"].load_penalty = 3  # three waiting in a's own queue
    router.engines["b"].outstanding = 2
    router.engines["c"].load_penalty = KV_AVOID
    assert [t.engine.name for t in route.candidates()] == ["b", "a", "c"]


def test_cache_aware_passes_over_a_holder_close_to_kv_exhaustion() -> None:
    router = _router("cache_aware")
    route = _route(router)
    chat = _conversation(0, 2)
    owner = _pick(route, chat[0])
    router.engines[owner].load_penalty = KV_AVOID
    assert _pick(route, chat[1]) != owner
    router.engines[owner].load_penalty = 0
    keys = prompt_keys(chat[1].body)
    assert owner in route.request_order.holders(keys[0])


def test_the_guard_sees_the_engines_own_queue() -> None:
    router = _router("cache_aware")
    route = _route(router)
    hot = _chat([{"role": "system", "content": "hot " * 300}])
    owner = _pick(route, hot)
    router.engines[owner].load_penalty = 6  # busy with other clients' requests
    assert _pick(route, hot) != owner


def _router(strategy: str) -> Router:
    engines = [
        {"name": n, "kind": "vllm", "url": f"http://127.0.0.1:{9000 + i}", "models": ["m"]}
        for i, n in enumerate("abc")
    ]
    routes = [{"model": "m", "engines": ["a", "b", "c"], "strategy": strategy}]
    return Router(parse_config({"engines": engines, "routes": routes}, {}))


@pytest.fixture
async def metrics_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback HTTP server answering every request with the next body of a list."""
    bodies: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            body = bodies.pop(0) if bodies else b""
            status = b"200 OK" if body else b"503 Service Unavailable"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, bodies
    finally:
        server.close()
        await server.wait_closed()


async def test_scraper_reads_metrics_over_http_and_forgets_on_failure(metrics_server) -> None:
    port, bodies = metrics_server
    engines = [{"name": "a", "kind": "vllm", "url": f"http://127.0.0.1:{port}", "models": ["m"]}]
    router = Router(
        parse_config({"engines": engines, "routes": [{"model": "m", "engines": ["a"]}]})
    )
    upstream = router.engines["a"]
    upstream.connect(asyncio.get_running_loop())
    scraper = LoadScraper([upstream], interval_s=60, timeout_s=5, kv_avoid=0.9)
    try:
        bodies.append(_vllm_text((4,), (0.3,)))
        load = await scraper.scrape(upstream)
        assert load is not None and (load.waiting, load.kv_usage) == (4.0, 0.3)
        assert upstream.load_penalty == 4
        bodies.append(_vllm_text((0,), (0.97,)))
        await scraper.scrape_all()
        assert upstream.load_penalty == KV_AVOID
        assert await scraper.scrape(upstream) is None  # 503: unknown load, no penalty
        assert upstream.load_penalty == 0
    finally:
        assert upstream.http is not None
        upstream.http.close()
