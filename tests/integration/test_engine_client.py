"""The gateway's HTTP/1.1 client to engines, against real servers on loopback.

The fault-injecting upstream (an aiohttp server in its own process) plays a
well-behaved engine and the misbehaving ones; two raw asyncio servers in the
test play what no HTTP library would send (garbage, an idle connection closed
without notice).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from kiban.gateway.engine_client import BadResponse, ConnectFailed, Deadline, Dropped, Pool
from tests.support.engines import EngineProcess, free_port
from tests.support.gateway import fault_upstream

JSON = b"content-type: application/json\r\n"


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    upstream = fault_upstream(tmp_path_factory.mktemp("fault"), slow_interval=0.2).start()
    yield upstream
    upstream.stop()


def _chat(model: str, stream: bool = False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return json.dumps(body).encode()


async def _post(pool: Pool, body: bytes, **kw) -> tuple[int, bytes]:
    exchange = await pool.request(
        b"POST", b"/v1/chat/completions", JSON, body, connect_timeout=2, **kw
    )
    try:
        return exchange.status, await exchange.read()
    finally:
        exchange.finish()


async def test_post_reuses_one_keep_alive_connection(fault: EngineProcess) -> None:
    pool = Pool(fault.base_url, asyncio.get_running_loop())
    for _ in range(5):
        status, body = await _post(pool, _chat("ok"))
        assert status == 200
        echoed = json.loads(json.loads(body)["choices"][0]["message"]["content"])
        assert echoed["body"]["model"] == "ok"
        assert echoed["headers"]["Host"] == f"127.0.0.1:{fault.port}"
    assert len(pool._open) == 1 and len(pool._idle) == 1
    pool.close()


async def test_stream_chunks_arrive_as_sent(fault: EngineProcess) -> None:
    pool = Pool(fault.base_url, asyncio.get_running_loop())
    exchange = await pool.request(
        b"POST", b"/v1/chat/completions", JSON, _chat("slow", True), connect_timeout=2
    )
    assert exchange.status == 200 and exchange.content_type.startswith(b"text/event-stream")
    loop = asyncio.get_running_loop()
    arrivals, chunks = [], []
    while chunk := await exchange.next_chunk():
        arrivals.append(loop.time())
        chunks.append(chunk)
    exchange.finish()
    text = b"".join(chunks)
    assert text.count(b"data: ") == 31 and text.endswith(b"data: [DONE]\n\n")
    # one token every 0.2 s: the client hands each over as it comes, not all at the end
    assert len(arrivals) >= 20 and arrivals[-1] - arrivals[0] > 4
    pool.close()


async def test_status_and_retry_after(fault: EngineProcess) -> None:
    pool = Pool(fault.base_url, asyncio.get_running_loop())
    exchange = await pool.request(
        b"POST", b"/v1/chat/completions", JSON, _chat("status-429"), connect_timeout=2
    )
    assert exchange.status == 429 and exchange.retry_after == b"7"
    assert b"injected HTTP 429" in await exchange.read()
    exchange.finish()
    pool.close()


async def test_first_byte_and_total_deadlines(fault: EngineProcess) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(fault.base_url, loop)
    with pytest.raises(Deadline) as info:
        await _post(pool, _chat("hang"), first_byte_at=loop.time() + 0.3)
    assert info.value.what == "first byte"
    exchange = await pool.request(
        b"POST",
        b"/v1/chat/completions",
        JSON,
        _chat("slow", True),
        connect_timeout=2,
        total_at=loop.time() + 0.5,
    )
    with pytest.raises(Deadline) as info:
        while await exchange.next_chunk():
            pass
    assert info.value.what == "total"
    exchange.finish()
    await asyncio.sleep(0.05)  # the loop reports the aborted connections as lost
    assert not pool._open  # both connections closed, nothing left in the pool
    pool.close()


async def test_dropped_stream_and_refused_connection(fault: EngineProcess) -> None:
    pool = Pool(fault.base_url, asyncio.get_running_loop())
    exchange = await pool.request(
        b"POST", b"/v1/chat/completions", JSON, _chat("drop", True), connect_timeout=2
    )
    with pytest.raises(Dropped):
        while await exchange.next_chunk():
            pass
    exchange.finish()
    with pytest.raises(ConnectFailed):
        await _post(
            Pool(f"http://127.0.0.1:{free_port()}", asyncio.get_running_loop()), _chat("ok")
        )
    pool.close()


async def _raw_server(handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_idle_connection_closed_by_the_engine_is_replaced() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def answer_once_then_close(reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive announced, then closed while idle

    server, port = await _raw_server(answer_once_then_close)
    pool = Pool(f"http://127.0.0.1:{port}", asyncio.get_running_loop())
    assert await _post(pool, b"{}") == (200, b"ok")
    await asyncio.sleep(0.2)
    assert await _post(pool, b"{}") == (200, b"ok")  # a new connection, transparently
    pool.close()
    server.close()


async def _server_closing_second_request(delay_s: float) -> tuple[asyncio.Server, int, list[int]]:
    """Answers the first request of a connection; reads the second, waits *delay_s*, closes.

    The list counts the requests each connection received.
    """
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    seen: list[int] = []

    async def handler(reader, writer) -> None:
        seen.append(0)
        mine = len(seen) - 1
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # the body, b"{}"
            seen[mine] += 1
            if seen[mine] == 2:
                await asyncio.sleep(delay_s)
                writer.transport.abort()
                return
            writer.write(answer)
            await writer.drain()

    server, port = await _raw_server(handler)
    return server, port, seen


async def test_reused_connection_closed_at_once_is_resent_silently() -> None:
    server, port, seen = await _server_closing_second_request(0.0)
    pool = Pool(f"http://127.0.0.1:{port}", asyncio.get_running_loop())
    assert await _post(pool, b"{}") == (200, b"ok")
    assert await _post(pool, b"{}") == (200, b"ok")  # on a new connection
    assert seen == [2, 1]
    pool.close()
    server.close()


async def test_reused_connection_closed_later_is_not_resent() -> None:
    """The engine held the request 0.3 s: it may have had it, so the pool does not send it
    again on its own (the proxy counts and retries it as an attempt)."""
    server, port, seen = await _server_closing_second_request(0.3)
    pool = Pool(f"http://127.0.0.1:{port}", asyncio.get_running_loop())
    assert await _post(pool, b"{}") == (200, b"ok")
    with pytest.raises(Dropped, match=r"reused connection 0\.3"):
        await _post(pool, b"{}")
    assert seen == [2]
    pool.close()
    server.close()


async def test_garbage_is_a_bad_response() -> None:
    async def garbage(reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()

    server, port = await _raw_server(garbage)
    with pytest.raises(BadResponse):
        await _post(Pool(f"http://127.0.0.1:{port}", asyncio.get_running_loop()), b"{}")
    server.close()
