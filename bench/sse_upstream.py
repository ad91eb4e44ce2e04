"""An OpenAI-compatible upstream that answers at once and streams as fast as it can.

``python bench/sse_upstream.py --port P [--tokens N]`` serves until SIGTERM:

* ``POST /v1/chat/completions`` and ``/v1/completions`` with ``"stream": true``
  stream a role chunk, ``max_tokens`` (default ``--tokens``) one-word chunks,
  a finish chunk, a usage chunk (``choices: []``, as vLLM sends for
  ``stream_options.include_usage``) and ``[DONE]``; without ``stream`` a fixed
  completion whose usage says ``max_tokens`` completion tokens;
* ``GET /health`` and ``GET /v1/models``.

Why not nginx for the stream: nginx serves a static SSE body with one
sendfile, so the whole completion reaches the gateway in one or two reads,
which no engine does; stock nginx has no way to flush event by event. This
server writes every event with its own ``send()`` (the way engines do, one
event per token), from bytes framed once at start (HTTP chunked encoding), on
uvloop with httptools parsing the requests: a few microseconds per event,
so the gateway in front of it is what gets measured. ``--interval`` spaces
the events of one stream (0: back to back; streams still interleave).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import httptools
import orjson
import uvloop

MODEL = "bench"
_WORDS = 50
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _framed(payload: bytes) -> bytes:
    """One HTTP chunk holding one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _chunk(chat: bool, delta: str | None, finish: str | None = None) -> bytes:
    choice: dict[str, object]
    if chat:
        body = {"role": "assistant", "content": ""} if delta is None else {"content": delta}
        choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return _framed(
        orjson.dumps(
            {
                "id": "cmpl-bench",
                "object": kind,
                "created": 1700000000,
                "model": MODEL,
                "choices": [choice],
            }
        )
    )


class _Events:
    """Every event of a stream, framed once."""

    def __init__(self, chat: bool) -> None:
        self.first = _chunk(chat, None) if chat else b""
        # distinct words in turn: LiteLLM ends a stream that repeats one chunk 100 times
        self.tokens = [_chunk(chat, f" w{i}") for i in range(_WORDS)]
        self.finish = _chunk(chat, "", "length")
        self.chat = chat

    def usage(self, tokens: int) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
        body = {"id": "cmpl-bench", "object": kind, "created": 1700000000, "model": MODEL}
        return _framed(orjson.dumps({**body, "choices": [], "usage": usage}))

    done = _framed(b"[DONE]") + b"0\r\n\r\n"


def _json_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


def _completion(chat: bool, tokens: int) -> bytes:
    text = "".join(f" w{i % _WORDS}" for i in range(tokens))
    choice: dict[str, object] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    kind = "chat.completion" if chat else "text_completion"
    body = {"id": "cmpl-bench", "object": kind, "created": 1700000000, "model": MODEL}
    return _json_response(orjson.dumps({**body, "choices": [choice], "usage": usage}))


_MODELS = _json_response(
    orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
)
_HEALTH = _json_response(b'{"status":"ok"}')
_NOT_FOUND = _json_response(b'{"error":{"message":"not found"}}', b"404 Not Found")
_BAD_REQUEST = _json_response(b'{"error":{"message":"invalid JSON body"}}', b"400 Bad Request")
_EVENTS = {True: _Events(True), False: _Events(False)}


class _Server(asyncio.Protocol):
    """One client connection; requests are answered in order (keep-alive)."""

    tokens = 512
    interval = 0.0

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.ensure_future(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.queue.put_nowait((method, self.url, b"".join(self.body)))

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while True:
            method, url, body = await self.queue.get()
            path = url.split(b"?", 1)[0]
            if method == b"GET" and path == b"/health":
                transport.write(_HEALTH)
            elif method == b"GET" and path == b"/v1/models":
                transport.write(_MODELS)
            elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
                await self._complete(transport, path == b"/v1/chat/completions", body)
            else:
                transport.write(_NOT_FOUND)

    async def _complete(self, transport: asyncio.Transport, chat: bool, raw: bytes) -> None:
        try:
            body = orjson.loads(raw)
            tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            transport.write(_BAD_REQUEST)
            return
        tokens = tokens or self.tokens
        if not body.get("stream"):
            transport.write(_completion(chat, tokens))
            return
        events = _EVENTS[chat]
        transport.write(_HEAD + events.first)
        words, interval = events.tokens, self.interval
        for i in range(tokens):
            if interval:
                await asyncio.sleep(interval)
            elif self.paused is not None:
                await self.paused
            else:
                await asyncio.sleep(0)  # let the other streams interleave
            transport.write(words[i % _WORDS])
        transport.write(events.finish + events.usage(tokens) + events.done)


async def _main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", port, backlog=2048, reuse_port=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=512, help="chunks when max_tokens is absent")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between events")
    args = parser.parse_args()
    _Server.tokens, _Server.interval = args.tokens, args.interval
    uvloop.run(_main(args.port))


if __name__ == "__main__":
    main()
