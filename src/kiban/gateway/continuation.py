"""Continuing a broken stream on another engine of the route.

When the engine of a chat stream dies or stalls after its first tokens reached
the client, the client still holds a good beginning. Instead of ending the
stream with an error event, kiban asks another engine of the route for the rest:
the same conversation with the text already streamed as the start of the
assistant's reply (each engine kind says how it continues such a prefix:
``Dialect.continuation_fields``), ``max_tokens`` and ``min_tokens`` less the
tokens already sent. The new engine's events go into the same client stream
with the first stream's ``id``, ``created`` and ``model``, without its opening
role-only delta, followed by one ``[DONE]``; the usage it reports is summed
with what the broken engine had sent.

Off (the stream ends with the error event) for anything a prefix cannot carry:
tool calls, structured output, ``n`` > 1, logprobs, a client's own assistant
prefill, and routes with ``continue_streams: false``.

Tokens sent are the engine's own count where its kind declares one
(``EngineKind.token_count``: vLLM's and SGLang's ``continuous_usage_stats``,
llama.cpp's ``timings_per_token``), read from the last event that reached the client:
a loaded vLLM merges several tokens into one event, llama.cpp sends a character of
two tokens as one. An engine without one has its content events counted (the
opening role-only one aside), which may fall short. The client's prompt tokens are
the first engine's (from its per-event usage), else the continuing engine's less
the tokens sent (its prompt holds the prefix).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from kiban.gateway.engine_client import Deadline, EngineError, describe
from kiban.gateway.sse import EventStream, MalformedEvent

if TYPE_CHECKING:
    from kiban.gateway.asgi import Send
    from kiban.gateway.engine_client import EngineConnection
    from kiban.gateway.metrics import Metrics
    from kiban.gateway.proxy import Exchange
    from kiban.gateway.routing import Route
    from kiban.gateway.targets import Target

#: request fields whose answer a text prefix cannot carry on
_OFF_FIELDS = (
    "tools",
    "functions",
    "tool_choice",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "json_schema",
    "grammar",
    "regex",
    "ebnf",
    "logprobs",
    "top_logprobs",
    "continue_final_message",
    "echo",
)
_DONE = b"data: [DONE]\n\n"


def may_continue(ex: Exchange, route: Route) -> bool:
    """Whether *ex*'s stream may go on on another engine of *route* if its engine breaks."""
    if ex.continuable is None:
        ex.continuable = (
            route.config.continue_streams
            and len(route.targets) > 1
            and ex.endpoint == "chat"
            and ex.structured is None
            and continuable(ex.payload)
        )
    return ex.continuable


def continuable(payload: dict[str, Any]) -> bool:
    """Whether a chat request's answer can be continued from a text prefix."""
    for name in _OFF_FIELDS:
        value = payload.get(name)
        unset = value is None or value is False or value == []
        if not unset and not (name == "response_format" and value == {"type": "text"}):
            return False
    n = payload.get("n")
    if n is not None and n != 1:
        return False
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    return messages[-1].get("role") != "assistant"


class StreamRecord:
    """What a stream has sent to the client, kept so that another engine can go on from it.

    ``feed`` passes complete events only and holds back the rest, so a break never
    leaves half an event at the client. The text is read from the sent bytes only
    when a break happens: relaying costs no JSON parsing.
    """

    __slots__ = (
        "_parsed_upto",
        "_sent",
        "created",
        "finished",
        "id",
        "model",
        "pending",
        "prompt_tokens",
        "text",
        "tokens",
    )

    def __init__(self) -> None:
        self._sent = bytearray()
        self._parsed_upto = 0
        self.pending = b""
        self.text = ""
        self.tokens = 0
        self.prompt_tokens: int | None = None  # the first engine's, when it said
        self.finished = False  # an event carried a finish_reason: nothing is left to continue
        self.id: Any = None
        self.created: Any = None
        self.model: Any = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events of ``pending + chunk``; the rest waits for the next chunk."""
        out, self.pending = whole_events(self.pending, chunk)
        self._sent += out
        return out

    def read_sent(self) -> None:
        """Take the text, token count and stream identity from the events sent so far."""
        sent = bytes(self._sent[self._parsed_upto :])
        self._parsed_upto = len(self._sent)
        for event in sent.split(b"\n\n"):
            obj = _event_json(event)
            if obj is not None:
                self.note(obj)

    def engine_count(self, generated: int | None, usage: dict[str, Any] | None) -> None:
        """The broken engine's own count of the tokens it sent, and its usage so far (the
        last of each on an event that reached the client), where it gave them."""
        self.read_sent()
        if generated is not None:
            self.tokens = generated
        prompt = usage.get("prompt_tokens") if usage is not None else None
        if type(prompt) is int:
            self.prompt_tokens = prompt

    def note(self, obj: dict[str, Any]) -> None:
        """Count one event that reached the client."""
        if self.id is None:
            self.id, self.created, self.model = obj.get("id"), obj.get("created"), obj.get("model")
        choices = obj.get("choices")
        if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
            self.finished = True
        delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            self.text += content
            if content or "role" not in (delta or {}):  # not the opening role-only event
                self.tokens += 1


def whole_events(pending: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """``(complete events, the rest)`` of what came before (*pending*) and *chunk*."""
    data = pending + chunk if pending else chunk
    end = data.rfind(b"\n\n")
    if end < 0:
        return b"", data
    return data[: end + 2], data[end + 2 :]


class Continuer:
    """Finds an engine to go on with a broken stream and splices its events in."""

    def __init__(
        self,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        headers_for: Callable[[Exchange, Target], bytes],
    ) -> None:
        self.metrics = metrics
        self.loop = loop
        self.headers_for = headers_for

    async def resume(
        self, ex: Exchange, route: Route, record: StreamRecord, send: Send, broken: str
    ) -> str | None:
        """Finish *ex*'s stream on another engine of *route* than *broken*.

        Returns None once the client has the whole answer and ``[DONE]``; otherwise
        why no engine could finish it (the caller then ends the stream with its error
        event).
        """
        record.read_sent()
        left = _tokens_left(ex.payload, record)
        if record.finished or (left is not None and left <= 0):
            self._count(ex, route, broken, "none", record, "failed")
            return "the answer had ended already"
        tried = {broken}
        reasons: list[str] = []
        while True:
            target = self._pick(route, tried)
            if target is None:
                outcome = "unavailable" if not reasons else "failed"
                self._count(ex, route, broken, "none", record, outcome)
                reasons.append(f"no other engine of model {route.name!r} can continue it")
                return "; ".join(reasons)
            engine = target.engine
            tried.add(engine.name)
            before = record.tokens
            engine.breaker.on_attempt()
            ex.attempts += 1
            try:
                why = await self._relay(ex, route, target, record, send)
            finally:
                engine.release()
            if why is None:
                engine.breaker.on_success()
                self._count(ex, route, broken, engine.name, record, "continued", before)
                return None
            if isinstance(why, _Refused):  # it works, but would not take this request
                engine.breaker.on_success()
            else:
                engine.breaker.on_failure(time.monotonic())
                self.metrics.engine_failures.labels(route.name, engine.name, "broken").inc()
            reasons.append(why)
            if record.tokens > before:  # it sent some text: another engine goes on from there
                self._count(ex, route, broken, engine.name, record, "broken", before)
                broken = engine.name

    def _pick(self, route: Route, tried: set[str]) -> Target | None:
        for target in route.candidates():
            engine = target.engine
            if engine.name in tried:
                continue
            if engine.dialect.continuation_fields(engine.config) is None:
                continue
            if engine.try_acquire():
                return target
        return None

    def _count(
        self,
        ex: Exchange,
        route: Route,
        from_engine: str,
        to_engine: str,
        record: StreamRecord,
        outcome: str,
        continued_at: int | None = None,
    ) -> None:
        self.metrics.stream_continuations.labels(route.name, from_engine, to_engine, outcome).inc()
        entry = {
            "from": from_engine,
            "to": to_engine,
            "continued_at": record.tokens if continued_at is None else continued_at,
            "outcome": outcome,
        }
        ex.continuations = [*(ex.continuations or ()), entry]

    async def _relay(
        self, ex: Exchange, route: Route, target: Target, record: StreamRecord, send: Send
    ) -> str | None:
        """One continuation attempt on *target*; None when the stream ended with [DONE]."""
        engine = target.engine
        assert engine.http is not None
        timeouts = route.config.timeouts
        body = continuation_body(ex.payload, target, record)
        now = self.loop.time()
        try:
            resp = await engine.http.request(
                b"POST",
                engine.dialect.path_bytes("chat"),
                self.headers_for(ex, target),
                orjson.dumps(body),
                connect_timeout=timeouts.connect_s,
                first_byte_at=now + timeouts.ttft_s,
                total_at=now + timeouts.total_s,
            )
        except (EngineError, Deadline) as exc:
            return f"engine {engine.name!r} could not continue it: {describe(exc)}"
        try:
            if resp.status >= 400:
                raw = await resp.read()
                text = raw[:300].decode("utf-8", "replace")
                why = f"engine {engine.name!r} answered {resp.status}: {text}"
                return why if resp.status >= 500 or resp.status == 429 else _Refused(why)
            return await self._splice(ex, resp, record, send, target, idle_s=timeouts.idle_s)
        except (EngineError, Deadline) as exc:
            return f"engine {engine.name!r} broke while continuing it: {describe(exc)}"
        except MalformedEvent as err:
            return f"engine {engine.name!r} sent a malformed event while continuing it: {err}"
        finally:
            resp.finish()

    async def _splice(
        self,
        ex: Exchange,
        resp: EngineConnection,
        record: StreamRecord,
        send: Send,
        target: Target,
        idle_s: float | None,
    ) -> str | None:
        """Relay the continuing engine's events as part of the client's stream.

        Its events are checked as the first engine's are (:class:`EventStream`: a
        malformed one raises :class:`MalformedEvent`, a break); it is complete with
        ``[DONE]`` or once every choice finished.
        """
        engine = target.engine.name
        # the client's own choice: kiban asks every engine for usage (stream_usage.py)
        wants_usage = _wants_usage(ex.payload) and not ex.drop_usage
        counter = target.engine.dialect.token_count
        count = (counter.key, counter.count) if counter is not None else None
        strip = counter is not None and counter.ask(ex.payload) is not None
        events = EventStream(count=count, keep=True)
        objects = events.objects
        assert objects is not None
        sent_before = record.tokens
        first = True
        while True:
            chunk = await resp.next_chunk()
            if not chunk:
                events.close()
                break
            if first:
                resp.cancel_deadline("first byte")
                if idle_s:
                    resp.watch_idle(idle_s)
                first = False
            events.feed(chunk)
            out: list[bytes] = []
            for obj in objects:
                if not obj.get("choices"):
                    continue  # the usage event: the summed one goes out before [DONE]
                if record.tokens == sent_before and _role_only(obj):
                    continue
                obj.update(_identity(record))
                generated = _count_of(obj, count)
                if strip and count is not None:
                    obj.pop(count[0], None)
                if "usage" in obj:  # usage on an event the client sees: its own per-event ask
                    usage = obj.pop("usage")
                    if wants_usage and isinstance(usage, dict):
                        obj["usage"] = _summed(usage, record, sent_before)
                record.note(obj)
                if generated is not None:
                    record.tokens = sent_before + generated
                ex.chunks += 1
                out.append(_sse(obj))
            objects.clear()
            if events.done:
                await self._finish(ex, events, record, sent_before, wants_usage, send, out)
                resp.abort()  # not read to its end (reading may be paused): not reusable
                return None
            if out:
                body = b"".join(out)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if events.error is not None:
                return f"engine {engine!r} sent an error mid-stream: {events.error}"
        if events.complete:  # every choice finished: complete without [DONE]
            await self._finish(ex, events, record, sent_before, wants_usage, send, [])
            return None
        return (
            f"engine {engine!r} ended the continued stream before every choice finished "
            "(no finish_reason and no [DONE])"
        )

    @staticmethod
    async def _finish(
        ex: Exchange,
        events: EventStream,
        record: StreamRecord,
        sent_before: int,
        wants_usage: bool,
        send: Send,
        out: list[bytes],
    ) -> None:
        """The last events, the summed usage where the client asked for it, and [DONE]."""
        ex.usage = _summed(events.usage, record, sent_before)
        if wants_usage and ex.usage is not None:
            out.append(_sse({**_identity(record), "choices": [], "usage": ex.usage}))
        out.append(_DONE)
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})


class _Refused(str):
    """Why a continuation failed, when the engine answered with a 4xx (not its fault)."""


def continuation_body(
    payload: dict[str, Any], target: Target, record: StreamRecord
) -> dict[str, Any]:
    """The request that asks *target* for the rest of the answer."""
    fields = target.engine.dialect.continuation_fields(target.engine.config)
    assert fields is not None
    body = {**payload, **fields, "model": target.model}
    body["messages"] = [*payload["messages"], {"role": "assistant", "content": record.text}]
    for name in ("max_tokens", "max_completion_tokens"):
        limit = payload.get(name)
        if isinstance(limit, int):
            body[name] = max(1, limit - record.tokens)
    min_tokens = payload.get("min_tokens")
    if isinstance(min_tokens, int):
        body["min_tokens"] = max(0, min_tokens - record.tokens)
    body["stream"] = True
    body["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    counter = (
        target.engine.dialect.token_count
    )  # its own count of what it sends, should it break too
    return (counter.ask(body) if counter is not None else None) or body


def _tokens_left(payload: dict[str, Any], record: StreamRecord) -> int | None:
    limits = [payload.get(n) for n in ("max_tokens", "max_completion_tokens")]
    given = [limit for limit in limits if isinstance(limit, int)]
    return min(given) - record.tokens if given else None


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _count_of(obj: dict[str, Any], count: tuple[str, str] | None) -> int | None:
    """The engine's count of the tokens generated so far on one event (None: none there)."""
    if count is None:
        return None
    key, name = count
    counted = obj.get(key)
    if not isinstance(counted, dict):
        return None
    n = counted.get(name)
    return n if type(n) is int else None


def _summed(
    usage: dict[str, Any] | None, record: StreamRecord, sent_before: int
) -> dict[str, Any] | None:
    """The client's usage: the continuing engine's, plus the tokens the broken ones sent
    (its prompt held them); the first engine's prompt where it said."""
    if not isinstance(usage, dict):
        return None
    prompt = record.prompt_tokens
    if prompt is None:
        prompt = max(0, int(usage.get("prompt_tokens") or 0) - sent_before)
    completion = int(usage.get("completion_tokens") or 0) + sent_before
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _identity(record: StreamRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "chat.completion.chunk",
        "created": record.created,
        "model": record.model,
    }


def _role_only(obj: dict[str, Any]) -> bool:
    """The opening event of a stream: a role and no content (vLLM ``""``, llama.cpp null)."""
    choices = obj["choices"]
    if len(choices) != 1 or not isinstance(choices[0], dict) or choices[0].get("finish_reason"):
        return False
    delta = choices[0].get("delta") or {}
    return all(key == "role" or not value for key, value in delta.items())


def _event_json(event: bytes) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` event (None for [DONE], comments and anything else)."""
    event = event.strip()
    if not event.startswith(b"data:"):
        return None
    try:
        obj = orjson.loads(event[5:])
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
