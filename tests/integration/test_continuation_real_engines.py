"""A stream continued on a second REAL llama-server after the first is killed by PID mid-answer.

Two llama.cpp servers serve the same tiny model behind `kiban serve`. Engine a
starts a long answer at temperature 0 and is killed once the client holds its
first chunks; kiban asks b for the rest (gateway/continuation.py; llama.cpp's
``continue_final_message`` at the pinned commit). A second llama-server cannot
promise the first one's exact words after the break (it reads the prefix as one
batch where a generated it token by token, and the arithmetic differs), so the
test checks the splice exactly: the client's text is what a sent before the break
plus what b answers when asked directly for the same continuation, nothing twice,
nothing missing, one [DONE], and usage the sum. How far the answer then stays
with an uninterrupted one is printed (docs/reliability.md). The same with two vLLM
engines, where the texts must be equal, is in test_gateway_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import gateway_process

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Tell me about licences."}]
MAX_TOKENS = 3000  # a's answer takes seconds: it is killed long before its end
SAMPLING = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engines(llamacpp_engine_factory, tiny_gguf: Path) -> dict[str, EngineProcess]:
    return {
        name: llamacpp_engine_factory(tiny_gguf, "tiny", ctx=4096, parallel=1)
        for name in ("a", "b")
    }


@pytest.fixture(scope="module")
def gateway(engines, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "gateway": {"health_interval_s": 0.5, "health_timeout_s": 5},
        "engines": [
            {"name": name, "kind": "llamacpp", "url": engine.base_url, "models": ["tiny"]}
            for name, engine in engines.items()
        ],
        "routes": [{"model": "tiny", "engines": ["a", "b"], "strategy": "priority"}],
    }
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), name="continuation")
    yield gw.start(timeout=60)
    gw.stop()


def _ask(engine: EngineProcess, messages: list[dict], max_tokens: int, **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, **SAMPLING, **extra}
    resp = httpx.post(f"{engine.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_llamacpp_stream_continues_on_b_when_a_is_killed(engines, gateway) -> None:
    a, b = engines["a"], engines["b"]
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        # llama.cpp's own count on every event, asked by the client itself: kiban passes it,
        # and it shows where a's text ends (b counts again from its first token)
        "timings_per_token": True,
        **SAMPLING,
    }
    headers = {"X-Request-Id": "continued-llamacpp"}
    events: list = []
    pieces: list[str] = []
    counts: list[int] = []  # timings.predicted_n of each piece's event
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as resp:
        assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a"
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            event = data if data == "[DONE]" else json.loads(data)
            events.append(event)
            delta = event["choices"][0]["delta"] if _choice(event) else {}
            content = delta.get("content")
            if isinstance(content, str) and (content or "role" not in delta):
                pieces.append(content)
                counts.append(event["timings"]["predicted_n"])
                if len(pieces) == 5:
                    a.kill()
    assert not a.running()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert not any("error" in e for e in events[:-1]), events[-2]
    assert len({e["id"] for e in events[:-1]}) == 1

    log = gateway.wait_for_log("continued-llamacpp")
    entry = json.loads(next(ln for ln in log.splitlines() if "continued-llamacpp" in ln))
    (continuation,) = entry["continuations"]
    assert continuation["from"] == "a" and continuation["to"] == "b"
    assert continuation["outcome"] == "continued"
    sent = continuation["continued_at"]  # tokens a had sent before the break
    split = next(i for i in range(1, len(counts)) if counts[i] <= counts[i - 1])
    print(f"a sent {sent} tokens in {split} of {len(pieces)} content events")
    assert sent == counts[split - 1]  # llama.cpp's own count, not kiban's count of events
    assert 5 <= sent < MAX_TOKENS

    before, after = "".join(pieces[:split]), "".join(pieces[split:])
    prefilled = [*MESSAGES, {"role": "assistant", "content": before}]
    # without the prompt cache b reads the prefix as one batch, as it did for kiban (a
    # cached prefix with its last token read alone can tip a near tie the other way)
    direct = _ask(
        b,
        prefilled,
        MAX_TOKENS - sent,
        continue_final_message=True,
        add_generation_prompt=False,
        cache_prompt=False,
    )
    # the answer that is not streamed repeats the prefill (seen; the stream kiban reads
    # leaves it out: tools/server/server-task.cpp, is_continuation)
    assert direct["choices"][0]["message"]["content"] == before + after
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == sent + direct["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    whole = _ask(b, MESSAGES, MAX_TOKENS)["choices"][0]["message"]["content"]
    text = before + after
    same = next((i for i, (x, y) in enumerate(zip(text, whole, strict=False)) if x != y), None)
    print(
        f"continued at {sent} tokens ({len(before)} chars); an uninterrupted answer "
        f"{'matches' if same is None else f'differs from char {same}'} "
        f"({len(text)} vs {len(whole)} chars)"
    )


def _choice(event: object) -> bool:
    return isinstance(event, dict) and bool(event.get("choices"))
