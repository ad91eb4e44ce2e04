"""Forwarding one inference request to an engine, with failover before the first byte.

Nothing reaches the client until an engine has answered successfully: for a
non-streaming request the whole body, for a stream its first well-formed event.
Until then a failure goes to the route's failover policy (kiban/gateway/failover.py):
the same engine again, the next one, or the client, bounded by the route's
attempts and retry budget. Every streamed event is parsed before it is relayed
(kiban/gateway/sse.py). A stream whose every choice finished is complete, with or
without the engine's ``[DONE]``; one that breaks after the first event ends in
:meth:`Proxy._stream_broke`: it goes on on another engine where it can
(:mod:`kiban.gateway.continuation`), otherwise it ends with an OpenAI-shaped error
event, never with a silent ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from kiban import api_errors as errors
from kiban.api_errors import APIError, error_event
from kiban.gateway.asgi import Send, send_response, start_response
from kiban.gateway.continuation import Continuer, StreamRecord, may_continue
from kiban.gateway.engine_client import (
    ConnectTimeout,
    Deadline,
    Dropped,
    EngineConnection,
    EngineError,
    describe,
)
from kiban.gateway.engines import Engine
from kiban.gateway.failover import FailoverPlan, Failure
from kiban.gateway.metrics import Metrics
from kiban.gateway.routing import Route
from kiban.gateway.sse import EventStream, MalformedEvent
from kiban.gateway.structured import STRUCTURED_HEADER, StructuredRequest
from kiban.gateway.targets import Target
from kiban.structured.stream import DONE_EVENT
from kiban.structured.verify import OutputFailure

_NOT_FORWARDED = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"accept-encoding",
        b"expect",
    }
)
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class Exchange:
    """One client request on its way through the gateway."""

    request_id: str
    endpoint: str  # "chat", "completions" or "embeddings"
    body: bytes
    payload: dict[str, Any]
    model: str
    stream: bool
    client_headers: list[tuple[bytes, bytes]]
    started: float = field(default_factory=time.perf_counter)
    engine: str | None = None
    status: int = 0
    attempts: int = 0
    retries: list[str] = field(default_factory=list)  # the reason of each retry, in order
    ttft_s: float | None = None
    itl_s: float | None = None  # mean gap between streamed events after the first read
    chunks: int = 0
    usage: dict[str, Any] | None = None
    committed: bool = False  # a byte of the response has reached the client
    error: str | None = None
    structured: StructuredRequest | None = None  # set only when a constraint applies
    drop_usage: bool = False  # kiban asked the engine for the stream's usage, not the client
    continuations: list[dict[str, Any]] | None = None  # broken streams continued (continuation.py)
    continuable: bool | None = None  # whether a broken stream may go on elsewhere (once known)


class Proxy:
    """Sends exchanges to engines over each engine's keep-alive connection pool."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.metrics = metrics
        self.loop = loop
        self.continuer = Continuer(metrics, loop, self._engine_headers)

    async def handle(self, ex: Exchange, route: Route, send: Send, needs_images: bool) -> None:
        candidates = route.candidates(needs_images, ex)
        retries = route.config.retries
        structured = ex.structured
        if structured is not None:
            try:
                candidates = structured.targets(route, candidates)
            except APIError:
                self.metrics.structured_outcome(route.name, "unsupported")
                raise
        queued: Engine | None = None  # an engine whose slot this request already holds
        if not candidates:
            target = await self._wait_in_queue(route, needs_images, structured)
            queued, candidates = target.engine, [target]
        deadline = self.loop.time() + route.config.timeouts.total_s
        plan: Iterable[Target]  # failover's order, or the structured attempts'
        if structured is None:
            plan = failover = FailoverPlan(
                candidates, route.config.failover, retries, deadline, self.loop.time
            )
        else:
            plan = structured_plan = structured.attempts(
                candidates, retries.attempts, deadline, self.loop.time
            )
        route.budget.deposit()
        failures: list[tuple[str, Failure]] = []
        attempted = 0
        try:
            for target in plan:
                engine = target.engine
                if failures:
                    # the route's retry budget guards failing engines; an engine that
                    # answered (an invalid output, a refused schema, a prompt too long
                    # for it) is bounded by the route's engines and structured.retries
                    last = failures[-1][1]
                    if not last.engine_answered and not route.budget.try_withdraw():
                        break
                    if structured is None:
                        pause = failover.wait_s
                    elif last.engine_answered:
                        pause = 0.0
                    else:
                        pause = retries.backoff_s * (0.5 + random.random()) * attempted
                    if pause:
                        await asyncio.sleep(pause)
                if engine is queued:
                    queued = None  # the slot waited for is used now
                elif not engine.try_acquire():
                    continue  # filled up since the plan was made
                if failures:
                    ex.retries.append(failures[-1][1].reason)
                    self.metrics.retried(route.name, failures[-1][1].reason)
                attempted += 1
                try:
                    failure = await self._attempt(ex, route, target, send)
                finally:
                    engine.release()
                if failure is None:
                    return
                failures.append((engine.name, failure))
                self.metrics.engine_failures.labels(route.name, engine.name, failure.reason).inc()
                if structured is None:
                    failover.record(target, failure)
                elif not structured_plan.record(engine.name, failure.reason, failure.output):
                    break
        finally:
            if queued is not None:
                queued.release()
        if not failures:
            raise self._nothing_available(route, needs_images)
        raise self._all_failed(failures, structured)

    async def _wait_in_queue(
        self, route: Route, needs_images: bool, structured: StructuredRequest | None
    ) -> Target:
        """Wait for a slot on a full engine of *route*; 429 when its queue is full or too slow."""
        now = time.monotonic()
        full = [
            t
            for t in route.targets
            if t.engine.healthy
            and t.engine.outstanding >= t.engine.config.max_concurrency
            and (not needs_images or t.engine.accepts_images)
            and t.engine.breaker.allows(now)
        ]
        if full and structured is not None:
            full = structured.targets(route, full)
        if not full:
            raise self._nothing_available(route, needs_images)
        queueable = [t for t in full if t.engine.can_queue()]
        if not queueable:
            raise _saturated(route, full)
        target = min(queueable, key=lambda t: len(t.engine.waiters))
        if not await target.engine.wait_for_slot():
            engine = target.engine
            raise errors.queue_timeout(
                route.name,
                engine.name,
                engine.config.queue_timeout_s,
                engine.config.max_concurrency,
            )
        return target

    async def _attempt(
        self, ex: Exchange, route: Route, target: Target, send: Send
    ) -> Failure | None:
        """One try on *target*, whose slot the caller holds."""
        engine = target.engine
        timeouts = route.config.timeouts
        ex.attempts += 1
        ex.engine = engine.name
        engine.breaker.on_attempt()
        started = time.perf_counter()
        now = self.loop.time()
        total_at = now + timeouts.total_s
        if ex.structured is not None:  # its retries share the route's total timeout
            total_at = min(total_at, ex.structured.deadline)
        ttft_at = now + timeouts.ttft_s if ex.stream else None
        try:
            failure = await self._exchange(ex, target, send, route, ttft_at, total_at)
        except Deadline as deadline:  # before anything reached the client
            failure = Failure("timeout", _timeout_message(engine.name, deadline.what, timeouts))
        if failure is None or failure.engine_answered:
            engine.breaker.on_success()
            engine.observe_latency(time.perf_counter() - started)
        elif failure.reason != "status" or failure.status >= 500:
            engine.breaker.on_failure(time.monotonic())
        if failure is not None and ex.committed:
            return None  # already reported to the client inside the stream
        return failure

    async def _exchange(
        self,
        ex: Exchange,
        target: Target,
        send: Send,
        route: Route,
        ttft_at: float | None,
        total_at: float,
    ) -> Failure | None:
        engine = target.engine
        assert engine.http is not None
        body = ex.body
        counter = engine.dialect.token_count if ex.stream else None
        strip = False
        if ex.structured is not None:
            body = ex.structured.body_for(ex.payload, target)
        else:
            payload = ex.payload
            if target.model != ex.model:
                payload = {**payload, "model": target.model}
            if counter is not None and may_continue(ex, route):
                # a break is then continued from the engine's own count of the tokens sent
                asked = counter.ask(payload)
                payload, strip = (payload, False) if asked is None else (asked, True)
            else:
                counter = None
            if payload is not ex.payload:
                body = orjson.dumps(payload)
        try:
            resp = await engine.http.request(
                b"POST",
                engine.dialect.path_bytes(ex.endpoint),
                self._engine_headers(ex, target),
                body,
                connect_timeout=route.config.timeouts.connect_s,
                first_byte_at=ttft_at,
                total_at=total_at,
            )
        except ConnectTimeout as err:
            return Failure("timeout", f"engine {engine.name!r} did not connect: {err}")
        except Dropped as err:
            return Failure("broken", f"engine {engine.name!r} dropped the request: {err}")
        except EngineError as err:
            return Failure("connect", f"engine {engine.name!r} is unreachable: {describe(err)}")
        try:
            if resp.status >= 400:
                return await self._engine_error(ex, resp, target, send, route)
            if ex.stream:
                count = (counter.key, counter.count) if counter is not None else None
                events = EventStream(count=count, strip=strip, drop_usage=ex.drop_usage)
                return await self._relay_stream(ex, resp, send, route, target, events)
            return await self._relay_body(ex, resp, send, route)
        finally:
            resp.finish()

    @staticmethod
    def _engine_headers(ex: Exchange, target: Target) -> bytes:
        """Header lines for the engine: the client's own (minus hop-by-hop and its key)."""
        rid = ex.request_id.encode()
        lines = [target.engine.request_headers, b"x-request-id: ", rid, b"\r\n"]
        for name, value in ex.client_headers:
            if name not in _NOT_FORWARDED and name != b"x-request-id" and name != b"content-type":
                lines += (name, b": ", value, b"\r\n")
        return b"".join(lines)

    def _response_headers(self, ex: Exchange) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-request-id", ex.request_id.encode()),
            (b"x-kiban-engine", (ex.engine or "").encode()),
        ]
        if ex.structured is not None and ex.structured.how is not None:
            headers.append((STRUCTURED_HEADER, ex.structured.how.encode()))
        return headers

    async def _engine_error(
        self, ex: Exchange, resp: EngineConnection, target: Target, send: Send, route: Route
    ) -> Failure | None:
        try:
            raw = await resp.read()
        except EngineError as exc:
            return Failure("broken", f"engine {target.engine.name!r} broke: {describe(exc)}")
        body = target.engine.dialect.error_to_openai(resp.status, raw)
        headers = [(b"content-type", b"application/json")]
        if resp.retry_after:
            headers.append((b"retry-after", resp.retry_after))
        error = _error_object(body)
        refused = self._context_refusal(target, route, resp.status, error, body)
        if refused is not None:
            return refused
        if ex.structured is not None:
            dialect, message = target.engine.dialect, _error_message(body, error)
            output = dialect.structured_output_error(resp.status, message)
            if output is not None:
                self.metrics.structured_outcome(route.name, output.kind)
                return Failure(
                    "invalid_output",
                    f"engine {target.engine.name!r}: {output.message}",
                    output=output,
                )
            if dialect.refuses_constraint(resp.status, message):
                # the engine could not compile or accept the constraint: less of it may do,
                # or another engine
                self.metrics.structured_outcome(route.name, "engine_rejected")
                return Failure(
                    "rejected",
                    f"engine {target.engine.name!r} refused the "
                    f"{ex.structured.constraint.kind} constraint: {message}",
                    resp.status,
                    body,
                    headers,
                )
        if resp.status >= 500 or resp.status == 429:
            return Failure(
                "status",
                f"engine {target.engine.name!r} answered HTTP {resp.status}",
                resp.status,
                body,
                headers,
                retry_after=resp.retry_after,
            )
        await self._relay_refusal(ex, send, resp.status, body, headers)
        return None

    @staticmethod
    def _context_refusal(
        target: Target, route: Route, status: int, error: dict[str, Any], body: bytes
    ) -> Failure | None:
        """A refusal of the prompt as too long for *target*'s context, when the route's
        policy passes such requests on."""
        engine = target.engine
        if route.config.failover.context_length == "off" or not (
            engine.dialect.refuses_context_length(status, error)
        ):
            return None
        message = error.get("message")
        return Failure(
            "context_length",
            f"engine {engine.name!r} refused the request as too long for its context: {message}",
            status,
            body,
            [(b"content-type", b"application/json")],
        )

    async def _relay_refusal(
        self,
        ex: Exchange,
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        """An engine's 4xx goes to the client as it is (no other engine would do better)."""
        ex.status = status
        await send_response(send, status, body, headers + self._response_headers(ex))
        ex.committed = True

    async def _relay_body(
        self, ex: Exchange, resp: EngineConnection, send: Send, route: Route
    ) -> Failure | None:
        try:
            body = await resp.read()
        except EngineError as exc:
            return Failure("broken", f"engine {ex.engine!r} broke mid-response: {describe(exc)}")
        content_type = resp.content_type or b"application/json"
        parsed: Any = None
        if b"json" in content_type:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as err:
                return Failure("malformed", f"engine {ex.engine!r} sent invalid JSON: {err}")
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
            ex.usage = usage if isinstance(usage, dict) else None
        if ex.structured is not None:
            output = (
                ex.structured.verify_body(body)
                if parsed is None
                else ex.structured.verify_response(parsed)
            )
            self.metrics.structured_outcome(route.name, output.kind if output else "valid")
            if output is not None:
                return Failure(
                    "invalid_output", f"engine {ex.engine!r}: {output.message}", output=output
                )
        ex.status = resp.status
        await send_response(
            send,
            resp.status,
            body,
            [(b"content-type", content_type), *self._response_headers(ex)],
        )
        ex.committed = True
        return None

    async def _relay_stream(
        self,
        ex: Exchange,
        resp: EngineConnection,
        send: Send,
        route: Route,
        target: Target,
        events: EventStream,
    ) -> Failure | None:
        try:  # until the first event nothing has reached the client: a failure may fail over
            out = b""
            while not out and events.error is None:
                chunk = await resp.next_chunk()
                if not chunk:
                    events.close()
                    return Failure("broken", f"engine {ex.engine!r} ended the stream without data")
                out = events.feed(chunk)
        except EngineError as exc:
            return Failure(
                "broken", f"engine {ex.engine!r} broke before streaming: {describe(exc)}"
            )
        except MalformedEvent as err:
            return Failure("malformed", f"engine {ex.engine!r} sent a malformed event: {err}")
        if not out:
            assert events.error is not None
            return await self._stream_refused(ex, send, route, target, events.error)
        resp.cancel_deadline("first byte")
        first_at = last_at = time.perf_counter()
        first_events = events.events
        ex.ttft_s = first_at - ex.started
        ex.status = resp.status
        await start_response(send, resp.status, _STREAM_HEADERS + self._response_headers(ex))
        ex.committed = True
        held = ex.structured.start_stream() if ex.structured is not None else None
        # None for structured output: never both
        record = StreamRecord() if may_continue(ex, route) else None
        feeder = held or record
        if route.config.timeouts.idle_s:
            resp.watch_idle(route.config.timeouts.idle_s)
        try:
            while True:
                if feeder is not None:
                    out = feeder.feed(out)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if events.error is not None:
                    message = events.error.get("message")
                    return await self._stream_broke(
                        ex,
                        send,
                        route,
                        events,
                        Failure("broken", f"engine {ex.engine!r} reported an error: {message}"),
                        "upstream_stream_error",
                        record,
                    )
                chunk = await resp.next_chunk()
                if not chunk:
                    events.close()
                    break
                last_at = time.perf_counter()
                out = events.feed(chunk)
        except EngineError as exc:
            failure = Failure("broken", f"engine {ex.engine!r} broke mid-stream: {describe(exc)}")
            return await self._stream_broke(
                ex, send, route, events, failure, "upstream_stream_broken", record
            )
        except MalformedEvent as err:
            failure = Failure("malformed", f"engine {ex.engine!r} sent a malformed event: {err}")
            return await self._stream_broke(
                ex, send, route, events, failure, "upstream_stream_malformed", record
            )
        except Deadline as deadline:
            timeouts = route.config.timeouts
            failure = Failure("timeout", _timeout_message(ex.engine or "", deadline.what, timeouts))
            code = "upstream_idle_timeout" if deadline.what == "idle" else "upstream_timeout"
            # a stalled engine's answer goes on elsewhere; one whose total time ran out does not
            goes_on = record if deadline.what == "idle" else None
            return await self._stream_broke(ex, send, route, events, failure, code, goes_on)
        ex.chunks = events.events
        if ex.chunks > first_events:
            ex.itl_s = (last_at - first_at) / (ex.chunks - first_events)
        ex.usage = events.usage
        if not events.complete:
            failure = Failure(
                "broken",
                f"engine {ex.engine!r} ended the stream before every choice finished "
                "(no finish_reason and no [DONE])",
            )
            return await self._stream_broke(
                ex, send, route, events, failure, "upstream_stream_incomplete", record
            )
        if held is not None:
            return await self._end_structured_stream(ex, send, route)
        # an engine that finished every choice but sent no [DONE]: kiban ends the stream
        end = b"" if events.done else DONE_EVENT
        await send({"type": "http.response.body", "body": end, "more_body": False})
        return None

    async def _stream_refused(
        self, ex: Exchange, send: Send, route: Route, target: Target, error: dict[str, Any]
    ) -> Failure | None:
        """The engine's first event is an error (lmdeploy and SGLang refuse a stream so):
        handled as the same error in an HTTP status would be."""
        code = error.get("code")
        status = code if type(code) is int and 400 <= code < 600 else 500
        body = orjson.dumps({"error": error})
        refused = self._context_refusal(target, route, status, error, body)
        if refused is not None:
            return refused
        message = f"engine {ex.engine!r} refused the stream: {error.get('message')}"
        if status >= 500 or status == 429:
            return Failure(
                "status", message, status, body, [(b"content-type", b"application/json")]
            )
        await self._relay_refusal(ex, send, status, body, [(b"content-type", b"application/json")])
        return None

    async def _stream_broke(
        self,
        ex: Exchange,
        send: Send,
        route: Route,
        events: EventStream,
        failure: Failure,
        code: str,
        record: StreamRecord | None = None,
    ) -> Failure:
        """A stream that reached the client broke: the engine dropped, went silent, sent a
        malformed event or an error, or stopped before every choice finished.

        The one place where such a stream ends. With a *record* (the request may be
        continued) another engine of the route finishes the answer in the same stream
        (continuation.py); otherwise, or when none can, the client gets an OpenAI-shaped
        error event (never a silent ``[DONE]``). The broken attempt counts as a failure.
        """
        ex.chunks = events.events
        ex.usage = events.usage
        if record is not None:
            record.engine_count(events.generated, events.usage)
            why = await self.continuer.resume(ex, route, record, send, ex.engine or "")
            if why is None:
                return failure
            failure.message = f"{failure.message}; not continued: {why}"
        ex.error = code
        body = error_event(failure.message, "upstream_error", code)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return failure

    async def _end_structured_stream(
        self, ex: Exchange, send: Send, route: Route
    ) -> Failure | None:
        """[DONE] after content that passed verification; an error event otherwise."""
        assert ex.structured is not None
        output = ex.structured.verify_stream()
        self.metrics.structured_outcome(route.name, output.kind if output else "valid")
        if output is None:
            await send({"type": "http.response.body", "body": DONE_EVENT, "more_body": False})
            return None
        ex.error = output.code
        event = error_event(
            f"engine {ex.engine!r}: {output.message}",
            "invalid_response_error",
            output.code,
            _output_extra(output),
        )
        await send({"type": "http.response.body", "body": event, "more_body": False})
        return Failure("invalid_output", output.message, output=output)

    @staticmethod
    def _nothing_available(route: Route, needs_images: bool) -> APIError:
        if needs_images and not any(t.engine.accepts_images for t in route.targets):
            return errors.images_not_supported(route.name)
        healthy = [t for t in route.targets if t.engine.healthy]
        if healthy and all(
            t.engine.outstanding >= t.engine.config.max_concurrency for t in healthy
        ):
            return _saturated(route, healthy)
        names = ", ".join(t.engine.name for t in route.targets)
        return errors.no_healthy_engine(
            f"no healthy engine for model {route.name!r} (engines: {names})"
        )

    @staticmethod
    def _all_failed(
        failures: list[tuple[str, Failure]], structured: StructuredRequest | None = None
    ) -> APIError:
        last = failures[-1][1]
        summary = "; ".join(f.message for _, f in failures)
        param = structured.constraint.source if structured else None
        output = next((f for _, f in reversed(failures) if f.reason == "invalid_output"), None)
        if output is not None and output.output is not None:
            attempts = sum(1 for _, f in failures if f.reason == "invalid_output")
            return errors.invalid_structured_output(
                output.output.code,
                f"no valid structured output after {attempts} attempt(s): {summary}",
                param,
                _output_extra(output.output),
            )
        if all(f.reason == "rejected" for _, f in failures):
            return errors.structured_output_rejected(summary, param)
        if last.reason in ("status", "context_length"):
            return errors.engine_error(last.status, summary, last.headers, last.body)
        if last.reason == "timeout":
            return errors.upstream_timeout(summary)
        return errors.no_healthy_engine(summary)


def _saturated(route: Route, targets: list[Target]) -> APIError:
    busy = [
        f"engine {t.engine.name!r} has {t.engine.outstanding} of max_concurrency "
        f"{t.engine.config.max_concurrency} in flight and {len(t.engine.waiters)} of "
        f"max_queue {t.engine.config.max_queue} waiting"
        for t in targets
    ]
    return errors.engines_saturated(route.name, busy)


def _timeout_message(engine: str, what: str, timeouts: Any) -> str:
    """What a passed deadline means, with the route's setting that decided it."""
    if what == "first byte":
        return (
            f"engine {engine!r} sent no event within the first-token timeout "
            f"({timeouts.ttft_s:g} s): the route's timeouts.ttft_s"
        )
    if what == "idle":
        return (
            f"engine {engine!r} sent nothing for {timeouts.idle_s:g} s mid-stream "
            "(the route's timeouts.idle_s)"
        )
    return (
        f"engine {engine!r} did not answer within the total timeout "
        f"({timeouts.total_s:g} s): the route's timeouts.total_s"
    )


def _output_extra(output: OutputFailure) -> dict[str, object]:
    extra: dict[str, object] = {"failure": output.kind}
    if output.pointer is not None:
        extra["pointer"] = output.pointer
    return extra


def _error_object(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body (empty if it has none)."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_message(body: bytes, error: dict[str, Any]) -> str:
    """The message of an OpenAI-shaped error (the body itself if it has none)."""
    message = error.get("message")
    return message if isinstance(message, str) else body.decode("utf-8", "replace")[:500]
