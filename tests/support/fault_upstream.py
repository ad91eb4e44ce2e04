"""A fault-injecting OpenAI-compatible upstream, run as its own process on loopback.

The request's ``model`` picks the behaviour, so one server plays many engines:

* ``ok``          a normal chat completion (stream or not); its content echoes
                  the headers, the parsed body and the raw body the upstream
                  received, as JSON;
* ``hang``        accepts the request and never answers;
* ``status-NNN``  answers HTTP NNN with an OpenAI-shaped error (429 adds Retry-After: 7);
                  ``status-NNN-ra-S`` sends Retry-After: S;
* ``content-filter`` answers 400 with OpenAI's ``content_policy_violation``;
* ``ctx-KIND-N``  an engine of KIND (vllm, llamacpp, sglang, lmdeploy, openai) whose
                  context holds N characters of message content: a longer prompt gets
                  that engine's own context-length refusal (lmdeploy's, in a stream, as
                  its first event, as lmdeploy does), a shorter one the ``ok`` answer;
* ``nonjson``     answers 502 with an HTML body;
* ``truncated``   200 with a JSON body cut in the middle;
* ``no-done``     streams two chunks and ends the response without ``[DONE]``;
* ``finished-no-done`` streams two chunks, the last with ``finish_reason``, then a usage
                  chunk, and ends the response without ``[DONE]``;
* ``malformed``   streams one chunk, then an event whose JSON is cut, then the rest;
* ``malformed-first`` the same, the cut event first;
* ``error-event`` streams one chunk, then an error event and ``[DONE]`` (as SGLang does);
* ``close-after-S`` reads the request, waits S seconds and closes the connection;
* ``drop``        streams two chunks and closes the connection mid-response;
* ``slow``        streams one token per ``--slow-interval`` seconds (max_tokens, or 30);
* ``stall``       streams two chunks, then sends nothing more (the connection stays open);
* ``sleep-S``     waits S seconds, then answers as ``ok`` does;
* ``words``       streams a deterministic answer, word i being ``w<i> `` and one token
                  (max_tokens words, one an event, in vLLM 0.32's shape: a role-only
                  opener, the usage event with ``stream_options.include_usage``, and with
                  ``continuous_usage_stats`` too the usage so far on every event, as
                  vllm/entrypoints/openai/chat_completion/serving.py writes them: see
                  ``_words``); it continues a final assistant message the way vLLM does
                  (``continue_final_message`` and ``add_generation_prompt: false``
                  required, else 400) from the word after the prefix's last;
* ``words-cut-K`` the same, closing the connection after K words;
* ``words-stall-K`` the same, silent after K words (the connection stays open);
* ``words-malformed-K`` the same, then an event whose JSON is cut, then the rest;
* ``words-nodone``  the same, ending the response after the usage event without ``[DONE]``;
* ``words-merge-M`` and ``words-merge-M-cut-K``: M words (tokens) in each event, as a
                  loaded vLLM merges the tokens of one engine step into one event.

``POST /fault {"mode": M}`` makes every request behave as model M until
``{"mode": null}`` (an engine that starts failing, then recovers); with
``"times": N`` only the next N requests do;
``GET /stats`` counts the requests received by model.

``python -m tests.support.fault_upstream --port P`` serves until SIGTERM.
GET /health answers 200; GET /v1/models lists the behaviours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

BEHAVIOURS = (
    "ok",
    "hang",
    "nonjson",
    "truncated",
    "no-done",
    "finished-no-done",
    "malformed",
    "malformed-first",
    "error-event",
    "drop",
    "slow",
    "stall",
    "content-filter",
)
#: the words of each engine's context-length refusal, and where they go (the engines'
#: code at the versions kiban pins: see each src/kiban/engines module)
CONTEXT_REFUSALS = {
    "vllm": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is {n} tokens. However, your "
                "prompt contains {m} input tokens, which exceeds this limit even without any "
                "output tokens. Please reduce the length of the input prompt. "
                "(parameter=input_tokens, value={m})",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        },
    ),
    "llamacpp": (
        400,
        {
            "error": {
                "code": 400,
                "message": "request ({m} tokens) exceeds the available context size ({n} "
                "tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": "{m}",
                "n_ctx": "{n}",
            }
        },
    ),
    "sglang": (
        400,
        {
            "object": "error",
            "message": "The input ({m} tokens) is longer than the model's context length "
            "({n} tokens).",
            "type": "BadRequest",
            "param": None,
            "code": 400,
        },
    ),
    "lmdeploy": (
        400,
        {
            "message": "Input length ({m}) must be smaller than the model context length ({n}).",
            "type": "invalid_request_error",
            "code": 400,
            "param": None,
            "object": "error",
        },
    ),
    "openai": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is {n} tokens. However, your "
                "messages resulted in {m} tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
}


def _completion(model: str, content: str) -> dict:
    return {
        "id": "cmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _fill(tree: object, n: int, m: int) -> object:
    if isinstance(tree, dict):
        return {k: _fill(v, n, m) for k, v in tree.items()}
    if isinstance(tree, str):
        text = tree.replace("{n}", str(n)).replace("{m}", str(m))
        return int(text) if text.isdigit() and tree in ("{n}", "{m}") else text
    return tree


def _prompt_chars(body: dict) -> int:
    return sum(len(str(m.get("content", ""))) for m in body.get("messages") or ())


def _chunk(model: str, content: str, finish: str | None = None) -> bytes:
    data = {
        "id": "cmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _stream(
    request: web.Request, model: str, pieces: list[str], interval: float, end: str = "done"
) -> web.StreamResponse:
    """Stream *pieces*; *end* is ``done`` ([DONE]), ``eof`` (no [DONE]) or ``drop``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        finish = "stop" if last and end in ("done", "finished") else None
        await resp.write(_chunk(model, piece, finish))
        if interval and not last:
            await asyncio.sleep(interval)
    if end == "finished":  # every choice finished, then usage, and no [DONE]
        usage = {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
    if end == "drop":
        assert request.transport is not None
        request.transport.close()  # under the client, mid-response
        return resp
    if end == "stall":
        await asyncio.sleep(3600)
    if end == "done":
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _broken_events(request: web.Request, model: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    cut = b'data: {"choices": [{"index": 0, "delta": {"content": "b\n\n'
    if model == "malformed-first":
        await resp.write(cut)
    await resp.write(_chunk(model, "a"))
    if model == "malformed":
        await resp.write(cut)
    if model == "error-event":
        error = {"message": "Generation aborted.", "type": "InternalServerError", "code": 500}
        await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
    await resp.write(_chunk(model, "c", "stop"))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = json.loads(raw)
    model, stream = body.get("model", ""), bool(body.get("stream"))
    counts = request.app["counts"]
    counts[model] = counts.get(model, 0) + 1
    app = request.app
    app["in_flight"] += 1
    app["max_in_flight"] = max(app["max_in_flight"], app["in_flight"])
    mode = app["mode"]
    if mode is not None and app["times"] is not None:
        app["times"] -= 1
        if app["times"] <= 0:
            app["mode"] = app["times"] = None
    try:
        return await _behave(request, mode or model, body, raw, stream)
    finally:
        app["in_flight"] -= 1


async def _behave(
    request: web.Request, model: str, body: dict, raw: bytes, stream: bool
) -> web.StreamResponse:
    slow_interval: float = request.app["slow_interval"]
    if model.startswith("sleep-"):
        await asyncio.sleep(float(model.removeprefix("sleep-")))
        model = "ok"
    if model == "stall":
        return await _stream(request, model, ["a", "b"], 0.0, "stall")
    if model.startswith("words"):
        return await _words(request, model, body)
    if model == "hang":
        await asyncio.sleep(3600)
    if model.startswith("ctx-"):
        kind, limit = model.removeprefix("ctx-").rsplit("-", 1)
        used = _prompt_chars(body)
        if used > int(limit):
            status, shape = CONTEXT_REFUSALS[kind]
            refusal = _fill(shape, int(limit), used)
            if stream and kind == "lmdeploy":  # its first event (chat_completions/serving.py)
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(b"data: " + json.dumps({"error": refusal}).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            return web.json_response(refusal, status=status)
        model = "ok"
    if model.startswith("close-after-"):
        await asyncio.sleep(float(model.removeprefix("close-after-")))
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if model == "content-filter":
        error = {
            "message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
        return web.json_response({"error": error}, status=400)
    if model.startswith("status-"):
        code, _, retry_after = model.removeprefix("status-").partition("-ra-")
        status = int(code)
        headers = {"Retry-After": retry_after or "7"} if status == 429 or retry_after else {}
        error = {"error": {"message": f"injected HTTP {status}", "type": "fault", "code": status}}
        return web.json_response(error, status=status, headers=headers)
    if model == "nonjson":
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
    if model == "truncated":
        return web.Response(
            body=b'{"id": "cmpl-fault", "choices": [{"mess', content_type="application/json"
        )
    if model in ("no-done", "drop", "finished-no-done"):
        end = {"no-done": "eof", "drop": "drop", "finished-no-done": "finished"}[model]
        return await _stream(request, model, ["a", "b"], 0.0, end)
    if model in ("malformed", "malformed-first", "error-event"):
        return await _broken_events(request, model)
    if model == "slow":
        count = body.get("max_tokens") or 30
        return await _stream(request, model, [f"t{i} " for i in range(count)], slow_interval)
    echo = json.dumps({"headers": dict(request.headers), "body": body, "raw": raw.decode()})
    if stream:
        return await _stream(
            request, model, [echo[i : i + 64] for i in range(0, len(echo), 64)], 0.0
        )
    return web.json_response(_completion(model, echo))


async def _words(request: web.Request, model: str, body: dict) -> web.StreamResponse:
    """The ``words`` behaviours (see the module docstring).

    Events are written as vLLM 0.32's serving_chat writes them (pydantic
    ``model_dump_json(exclude_unset=True)``: compact JSON, fields in declaration
    order): ``should_include_usage`` gives per-event usage only with both
    ``include_usage`` and ``continuous_usage_stats``; then the role-only opener carries
    ``completion_tokens`` 0 and each content event the tokens generated so far,
    ``previous_num_tokens`` (all the tokens an event merges); the last usage event
    (``exclude_none`` too) comes before ``[DONE]``.
    """
    messages = body.get("messages") or []
    start = 0
    if messages and messages[-1].get("role") == "assistant":
        if not body.get("continue_final_message") or body.get("add_generation_prompt") is not False:
            error = {"message": "a final assistant message without continue_final_message"}
            return web.json_response({"error": error}, status=400)
        start = len(messages[-1]["content"].split())
    count = body.get("max_tokens") or 30
    rest = model.removeprefix("words").removeprefix("-")
    merge = 1
    if rest.startswith("merge-"):
        merge_text, _, rest = rest.removeprefix("merge-").partition("-")
        merge = int(merge_text)
    end, _, k = rest.partition("-")  # "", "cut", "stall", "malformed" or "nodone"; K
    if k and end != "malformed":
        count = min(count, int(k))
    options = body.get("stream_options") or {}
    continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))
    prompt = 10 + start
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    created = int(time.time())

    def usage(tokens: int) -> dict:
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + tokens,
            "completion_tokens": tokens,
            "completion_tokens_details": None,
        }

    def event(choices: list, tokens: int | None = None, **extra: object) -> bytes:
        data = {"id": f"chatcmpl-{model}", "object": "chat.completion.chunk", "created": created}
        data |= {"model": model, "choices": choices, **extra}
        if tokens is not None and continuous:
            data["usage"] = usage(tokens)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    opener = {"role": "assistant", "content": ""}
    await resp.write(
        event([{"index": 0, "delta": opener, "logprobs": None, "finish_reason": None}], 0)
    )
    sent = 0
    while sent < count:
        words = range(sent, min(sent + merge, count))
        sent = words[-1] + 1
        last = sent == count and end in ("", "malformed", "nodone")
        choice = {
            "index": 0,
            "delta": {"content": "".join(f"w{start + i} " for i in words)},
            "logprobs": None,
            "finish_reason": "length" if last else None,
            "token_ids": None,
        }
        if last:
            choice["stop_reason"] = None
        await resp.write(event([choice], sent))
        if end == "malformed" and sent == int(k):
            await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "w\n\n')
        await asyncio.sleep(0.01)
    if end == "cut":
        assert request.transport is not None
        request.transport.close()
        return resp
    if end == "stall":
        await asyncio.sleep(3600)
    if options.get("include_usage"):
        final = {k: v for k, v in usage(count).items() if v is not None}
        await resp.write(event([], usage=final))
    if end != "nodone":
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    data = [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}]
    usage = {"prompt_tokens": 2, "total_tokens": 2}
    return web.json_response(
        {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
    )


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def models(_request: web.Request) -> web.Response:
    data = [{"id": b, "object": "model"} for b in BEHAVIOURS]
    return web.json_response({"object": "list", "data": data})


async def fault(request: web.Request) -> web.Response:
    order = await request.json()
    request.app["mode"], request.app["times"] = order.get("mode"), order.get("times")
    return web.json_response({"mode": request.app["mode"], "times": request.app["times"]})


async def stats(request: web.Request) -> web.Response:
    counts = request.app["counts"]
    return web.json_response(
        {
            "requests": counts,
            "total": sum(counts.values()),
            "max_in_flight": request.app["max_in_flight"],
        }
    )


def make_app(slow_interval: float = 1.0) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["slow_interval"] = slow_interval
    app["mode"] = app["times"] = None
    app["counts"] = {}
    app["in_flight"] = app["max_in_flight"] = 0
    app.router.add_post("/fault", fault)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow-interval", type=float, default=1.0)
    args = parser.parse_args()
    # a hanging request must not hold up a stop: tests stop this server often
    web.run_app(
        make_app(args.slow_interval),
        host="127.0.0.1",
        port=args.port,
        print=None,
        shutdown_timeout=0.5,
    )


if __name__ == "__main__":
    main()
